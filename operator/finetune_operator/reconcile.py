"""One reconcile pass: observe the world, let `phases.decide` choose, act, write status.

The pass is level-based: it reads the FineTuneJob, its Secret, its RayCluster and its Ray
job every time, and everything it must remember between passes lives in the job's status
(phase, rayJobId, retries, conditions, the accepted spec), never only in memory. In-memory
state (`JobMemory`) only saves work: the log cursor, the Ray auth token, the back-off delay,
the operator's own last status write. A restarted operator loses it and carries on.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import aiohttp
import kopf

from finetune_api.model import FineTuneJob
from finetune_api.validation import ValidationError

from . import phases, raycluster, tracking
from .events import EventRecorder
from .intake import IntakeGate
from .kube import Conflict, KubeClient, KubeError, secret_value
from .logstore import LogStoreError, S3Credentials, save_log
from .metrics import Metrics
from .phases import ClusterState, Decision, Observed, RayJobState, SecretState
from .rayjobs import DashboardUnreachable, RayJobInfo, RayJobsClient, RayJobsError
from .settings import JOB_LABEL, Settings

logger = logging.getLogger("finetune_operator")

# Fields a running job may change: everything else is fixed once the run started.
MUTABLE_SPEC_FIELDS = ("runPolicy",)


@dataclass
class JobMemory:
    cursor: tracking.LogCursor | None = None
    token: str | None = None
    backoff_reason: str | None = None
    backoff_delay: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    seen_generation: int | None = None
    # The job's RayCluster as the watch last showed it (main.watch_cluster); until the watch
    # has said anything, passes GET it.
    cluster: dict[str, Any] | None = None
    cluster_known: bool = False
    # The parsed job and a digest of the document it came from: a pass re-parses only a
    # changed document (parsing normalizes, defaults and checks the whole schema).
    parsed_key: bytes | None = None
    parsed: FineTuneJob | None = None
    # The status as the operator's own last write returned it, and that write's
    # resourceVersion, until the job watch delivers that version (main.observe_job). kopf's
    # copy of the job lags behind the operator's writes under load: a pass that decided from
    # it re-sent the status and re-posted Events for transitions it had already made.
    # Only the operator writes the status, so its own last write is the newest status.
    written_status: dict[str, Any] | None = None
    written_version: str | None = None
    # The deletion clean-up (main.start_cleanup), once the job is being deleted.
    cleanup: asyncio.Task | None = None

    def seen_version(self, resource_version: str | None) -> None:
        """The job watch delivered this version: from it on, kopf's copy is as new."""
        if resource_version is not None and resource_version == self.written_version:
            self.written_status = self.written_version = None


@dataclass
class World:
    """What one pass observed beyond the job itself."""
    cluster: dict[str, Any] | None = None
    ray_info: RayJobInfo | None = None
    log: str | None = None
    tracked: tracking.Tracked = field(default_factory=tracking.Tracked)


def now_utc() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def immutable_view(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in spec.items() if k not in MUTABLE_SPEC_FIELDS}


def changed_paths(old: Any, new: Any, prefix: str = "spec") -> list[str]:
    """Dotted paths where two spec documents differ (leaves, or whole lists)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out += changed_paths(old.get(key), new.get(key), f"{prefix}.{key}")
        return out
    return [] if old == new else [prefix]


def job_document(body: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """The FineTuneJob as the trainer and the builders see it: metadata + a given spec."""
    meta = body.get("metadata") or {}
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "labels") if k in meta},
        "spec": copy.deepcopy(spec),
    }


def merge_conditions(existing: list[dict[str, Any]], new: list[phases.Condition],
                     generation: int, now: str) -> list[dict[str, Any]]:
    """Replace conditions by type; lastTransitionTime moves only when the status flips."""
    by_type = {c.get("type"): dict(c) for c in existing or []}
    for c in new:
        old = by_type.get(c.type)
        transition = (old.get("lastTransitionTime") if old and old.get("status") == c.status
                      else now)
        by_type[c.type] = {"type": c.type, "status": c.status, "reason": c.reason,
                           "message": c.message, "lastTransitionTime": transition or now,
                           "observedGeneration": generation}
    return list(by_type.values())


class Reconciler:
    def __init__(self, settings: Settings, kube: KubeClient, http: aiohttp.ClientSession,
                 metrics: Metrics | None = None):
        self.settings = settings
        self.kube = kube
        # A session without Kubernetes credentials, for the Ray dashboards and S3.
        self.http = http
        self.metrics = metrics or Metrics()
        self.memory: dict[str, JobMemory] = {}
        # New jobs' first passes go before other jobs' later passes, and before Events.
        self.intake = IntakeGate()
        self.events = EventRecorder(kube, self.metrics, yield_to=self.intake.wait)

    def mem(self, key: str) -> JobMemory:
        return self.memory.setdefault(key, JobMemory())

    def forget(self, key: str) -> None:
        self.memory.pop(key, None)
        self.metrics.observe_phase(key, None)

    # --- the accepted spec -------------------------------------------------------------

    def accepted_spec(self, spec: dict[str, Any], status: dict[str, Any]
                      ) -> tuple[dict[str, Any], tuple[str, ...], bool]:
        """(spec in effect, rejected immutable paths, whether to store it as accepted).

        A job's spec is taken as it is while nothing runs (Pending, Suspended); once a run
        started, changes to anything but runPolicy are rejected and the stored spec
        (status.acceptedSpec) stays in effect, with the current runPolicy.
        """
        spec = dict(spec or {})
        phase = status.get("phase") or phases.PENDING
        raw = status.get("acceptedSpec")
        stored = None
        if raw:
            try:
                stored = json.loads(raw)
            except ValueError:
                stored = None
        if stored is None or phase in (phases.PENDING, phases.SUSPENDED):
            return spec, (), stored != immutable_view(spec)
        rejected = tuple(changed_paths(stored, immutable_view(spec)))
        if not rejected:
            return spec, (), False
        effective = dict(stored)
        for key in MUTABLE_SPEC_FIELDS:
            if key in spec:
                effective[key] = spec[key]
        return effective, rejected, False

    # --- observing ---------------------------------------------------------------------

    async def observe_secret(self, job: FineTuneJob) -> SecretState:
        name = job.spec.s3.secret_ref
        if not name:
            return SecretState.NOT_NEEDED
        secret = await self.kube.get_secret(job.namespace, name)
        if secret is None:
            return SecretState.MISSING
        if any(not secret_value(secret, k) for k in raycluster.S3_SECRET_KEYS):
            return SecretState.INCOMPLETE
        return SecretState.PRESENT

    def cluster_state(self, job: FineTuneJob, cluster: dict[str, Any] | None) -> ClusterState:
        if cluster is None:
            return ClusterState.ABSENT
        meta = cluster.get("metadata") or {}
        owners = [o.get("uid") for o in meta.get("ownerReferences") or []]
        if (meta.get("labels") or {}).get(JOB_LABEL) != job.name or job.uid not in owners:
            return ClusterState.FOREIGN
        if meta.get("deletionTimestamp"):
            # Going away: wait for it to be gone before creating the next one.
            return ClusterState.PROVISIONING
        state = ((cluster.get("status") or {}).get("state") or "").lower()
        if state == "ready":
            return ClusterState.READY
        if state == "failed":
            return ClusterState.FAILED
        return ClusterState.PROVISIONING

    def dashboard_url(self, cluster: dict[str, Any]) -> str | None:
        status = cluster.get("status") or {}
        head = status.get("head") or {}
        host = self.settings.dashboard_host or head.get("serviceIP") or head.get("podIP")
        if not host:
            return None
        port = (status.get("endpoints") or {}).get("dashboard") or raycluster.DASHBOARD_PORT
        return f"http://{host}:{port}"

    async def ray_token(self, job: FineTuneJob, mem: JobMemory) -> str | None:
        # KubeRay's Secret of this cluster; a new cluster (recreated, retried) has a new
        # token, and a refused token is dropped (see _reconcile) and read again.
        if mem.token is None:
            secret = await self.kube.get_secret(job.namespace, raycluster.auth_secret_name(job))
            mem.token = secret_value(secret, raycluster.AUTH_TOKEN_KEY) if secret else None
        return mem.token

    async def ray_client(self, job: FineTuneJob, cluster: dict[str, Any],
                         mem: JobMemory) -> RayJobsClient | None:
        url = self.dashboard_url(cluster)
        if url is None:
            return None
        return RayJobsClient(self.http, url, await self.ray_token(job, mem),
                             timeout=self.settings.dashboard_timeout)

    async def read_log(self, client: RayJobsClient, sub_id: str, mem: JobMemory,
                       world: World, status: dict[str, Any]) -> None:
        log = await client.logs(sub_id)
        world.log = log
        if mem.cursor is None or mem.cursor.submission_id != sub_id:
            mem.cursor = tracking.LogCursor(sub_id)
        events = mem.cursor.feed(log)
        world.tracked = tracking.apply_events(events, status)
        if mem.cursor.last_failed:
            e = mem.cursor.last_failed
            world.tracked.failure = f"{e.get('reason', 'Failed')}: {e.get('message', '')}"

    # --- one pass ----------------------------------------------------------------------

    async def reconcile(self, body: dict[str, Any]) -> float:
        """Reconcile one job; returns the seconds until the next pass."""
        meta = body.get("metadata") or {}
        key = f"{meta.get('namespace')}/{meta.get('name')}"
        mem = self.mem(key)
        async with mem.lock:
            try:
                decision = await self._reconcile(body, mem)
            except (KubeError, aiohttp.ClientError, TimeoutError, RayJobsError) as e:
                # The API or a dashboard hiccuped: nothing was half-written that the next
                # pass cannot redo, so retry with back-off.
                self.metrics.reconcile_errors.labels(type(e).__name__).inc()
                logger.warning("Reconcile of %s failed: %s", key, e)
                return self._backoff(mem, type(e).__name__)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                # A bug or an answer nobody expected: keep the loop alive (a crashed daemon
                # is restarted by kopf only after a long back-off) and make it loud.
                self.metrics.reconcile_errors.labels(type(e).__name__).inc()
                logger.exception("Reconcile of %s failed unexpectedly", key)
                return self._backoff(mem, type(e).__name__)
        if decision is None:
            return self.settings.reconcile_interval
        self.metrics.observe_phase(key, decision.phase)
        if decision.requeue_after is not None:
            mem.backoff_reason = None
            return max(0.0, decision.requeue_after)
        if decision.backoff:
            return self._backoff(mem, decision.reason or "backoff")
        mem.backoff_reason = None
        if decision.phase == phases.RUNNING:
            return self.settings.tracking_interval
        return self.settings.reconcile_interval

    def _backoff(self, mem: JobMemory, reason: str) -> float:
        base = self.settings.reconcile_interval
        if mem.backoff_reason == reason:
            mem.backoff_delay = min(self.settings.max_backoff, mem.backoff_delay * 2)
        else:
            mem.backoff_reason, mem.backoff_delay = reason, base
        return mem.backoff_delay

    async def _reconcile(self, body: dict[str, Any], mem: JobMemory) -> Decision | None:
        meta = body.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            return None
        status = dict(mem.written_status if mem.written_status is not None
                      else body.get("status") or {})
        generation = int(meta.get("generation") or 1)
        spec, rejected, store_accepted = self.accepted_spec(body.get("spec"), status)
        document = job_document(body, spec)
        key = hashlib.sha1(json.dumps(document, sort_keys=True).encode()).digest()
        if mem.parsed_key == key and mem.parsed is not None:
            job = mem.parsed
        else:
            try:
                # Without the CEL rules: the API server ran the same ones on this document
                # when it admitted it (celpy took ~25 % of the operator's CPU at intake).
                job = FineTuneJob.from_document(document, rules=False)
            except ValidationError as e:
                return await self._invalid(body, status, generation, str(e), mem)
            mem.parsed_key, mem.parsed = key, job

        phase = status.get("phase") or phases.PENDING
        world = World()
        secret = SecretState.NOT_NEEDED
        ray_state, ray_message = RayJobState.UNKNOWN, ""
        client: RayJobsClient | None = None
        if phase not in phases.FINISHED:
            secret = await self.observe_secret(job)
        if mem.cluster_known:
            world.cluster = mem.cluster
        elif not status.get("phase") and not status.get("rayCluster"):
            # A job the operator never wrote a status for has no cluster yet (unless a pass
            # created one and died before its status write: the create then answers 409 and
            # the next pass looks). No GET in front of every new job's RayCluster POST.
            world.cluster = None
        else:
            world.cluster = await self.kube.get_raycluster(job.namespace,
                                                           raycluster.cluster_name(job))
        cluster_state = self.cluster_state(job, world.cluster)
        sub_id = status.get("rayJobId") or phases.submission_id(job, 1)
        if phase not in phases.FINISHED and cluster_state == ClusterState.READY:
            client = await self.ray_client(job, world.cluster, mem)
            if client is None:
                ray_state, ray_message = RayJobState.UNREACHABLE, "no head address published"
            else:
                try:
                    world.ray_info = await client.get(sub_id)
                    if world.ray_info is None:
                        ray_state = RayJobState.NOT_FOUND
                    else:
                        ray_state = RayJobState(world.ray_info.status)
                        ray_message = world.ray_info.message
                        await self.read_log(client, sub_id, mem, world, status)
                except RayJobsError as e:
                    # Shown in the Ready condition; a refused token is read again next time
                    # (the auth Secret may have been replaced).
                    ray_state, ray_message = RayJobState.UNREACHABLE, str(e)
                    if not isinstance(e, DashboardUnreachable):
                        mem.token = None

        now = now_utc()
        obs = Observed(job=job, generation=generation, status=status, now=now,
                       secret=secret, cluster=cluster_state, ray_job=ray_state,
                       ray_job_message=ray_message, rejected_fields=rejected,
                       exit_code=world.ray_info.driver_exit_code if world.ray_info else None,
                       failure_message=world.tracked.failure)
        decision = phases.decide(obs)
        patch: dict[str, Any] = {}
        submits = any(isinstance(a, phases.Submit) for a in decision.actions)
        if store_accepted:
            accepted = json.dumps(immutable_view(spec), sort_keys=True)
            if submits:
                # It must be stored before anything is submitted: a pass that submits on a
                # cluster that was already ready (rare: a resumed or retried job) writes it
                # first. Usually it rides on the first status write, a pass before Submit.
                await self._write(meta, {"acceptedSpec": accepted}, mem)
            else:
                patch["acceptedSpec"] = accepted
        await self.execute(body, job, decision, world, client, mem, patch)
        if submits and client is not None:
            decision = await self._after_submit(obs, decision, client, status, generation, now)
        await self.write_status(body, job, status, generation, decision, world, patch, now, mem)
        return decision

    async def _after_submit(self, obs: Observed, decision: Decision, client: RayJobsClient,
                            status: dict[str, Any], generation: int, now: datetime) -> Decision:
        """Ask Ray about the job just submitted and decide again, so that the status goes
        straight to what Ray says (PENDING or RUNNING) in one write instead of two (a
        "Submitted" write, then 0.5 s later the next state). Ray's answer only moves the
        decision forward: anything unexpected keeps the first decision."""
        sub_id = next(a.submission_id for a in decision.actions if isinstance(a, phases.Submit))
        try:
            info = await client.get(sub_id)
        except RayJobsError:
            return decision
        if info is None or not RayJobState(info.status).active:
            return decision
        merged = {**status, **decision.status}
        merged["conditions"] = merge_conditions(status.get("conditions") or [], decision.conditions,
                                                generation, phases.iso(now))
        again = phases.decide(dataclasses.replace(obs, status=merged, ray_job=RayJobState(info.status),
                                                  ray_job_message=info.message))
        if again.actions:
            return decision
        again.status = {**decision.status, **again.status}
        # Submitted and already running: the JobRunning Event names the Ray job, so a
        # JobSubmitted Event of the same instant would only repeat it.
        running = any(e.reason == phases.Reason.JOB_RUNNING for e in again.events)
        again.events = [e for e in decision.events
                        if not (running and e.reason == phases.Reason.JOB_SUBMITTED)
                        ] + again.events
        return again

    async def _invalid(self, body: dict[str, Any], status: dict[str, Any], generation: int,
                       message: str, mem: JobMemory) -> Decision:
        """A spec the API server admitted but the validator refuses (e.g. an old CRD)."""
        decision = Decision(phase=phases.FAILED, message=f"Invalid spec: {message}")
        decision.conditions.append(phases.Condition(phases.COND_SPEC_ACCEPTED, "False",
                                                    "InvalidSpec", decision.message))
        if status.get("phase") != phases.FAILED:
            decision.events.append(phases.Event("Warning", "InvalidSpec", decision.message))
            decision.status["completionTime"] = phases.iso(now_utc())
        await self._patch(body, status, generation, decision, {}, phases.iso(now_utc()), mem)
        decision.requeue_after = 3600.0
        return decision

    # --- acting ------------------------------------------------------------------------

    async def execute(self, body: dict[str, Any], job: FineTuneJob, decision: Decision,
                      world: World, client: RayJobsClient | None, mem: JobMemory,
                      patch: dict[str, Any]) -> None:
        ns = job.namespace
        for action in decision.actions:
            match action:
                case phases.CreateCluster():
                    await self.create_cluster(body, job, mem)
                case phases.DeleteCluster():
                    if await self.kube.delete_raycluster(ns, raycluster.cluster_name(job)):
                        logger.info("Deleted RayCluster %s/%s", ns, job.name)
                case phases.Submit(submission_id=sub_id):
                    assert client is not None  # Submit is decided only on a ready cluster
                    await self.submit(client, job, sub_id)
                case phases.StopJob(submission_id=sub_id):
                    if client is not None:
                        try:
                            await client.stop(sub_id)
                        except RayJobsError as e:
                            # Deleting the cluster (which follows) ends the job anyway.
                            logger.warning("Could not stop Ray job %s: %s", sub_id, e)
                case phases.SaveLog(submission_id=sub_id):
                    await self.save_failed_log(job, sub_id, world, patch)
                case phases.DeleteJob():
                    await self.kube.delete_job(ns, job.name)

    async def create_cluster(self, body: dict[str, Any], job: FineTuneJob,
                             mem: JobMemory) -> None:
        ns = job.namespace
        cluster = raycluster.build_raycluster(job, self.settings)
        kopf.adopt(cluster, owner=body)
        try:
            await self.kube.create_raycluster(ns, cluster)
            mem.token = None  # KubeRay generates a new token for the new cluster
            logger.info("Created RayCluster %s/%s", ns, cluster["metadata"]["name"])
        except Conflict:
            # Created by an earlier pass whose status write was lost (fine), or somebody
            # else's cluster of that name: the next pass GETs it to tell which.
            mem.cluster_known = False

    def trainer_env(self, job: FineTuneJob) -> dict[str, str]:
        env = self.settings.trainer_env_vars
        env["FINETUNE_JOB"] = json.dumps(job.document, sort_keys=True)
        return env

    async def submit(self, client: RayJobsClient, job: FineTuneJob, sub_id: str) -> None:
        metadata = {"finetune.dev/job": job.name, "finetune.dev/namespace": job.namespace or "",
                    "finetune.dev/uid": job.uid or ""}
        # Submit is decided only on a pass whose lookup of this id found no job, so no second
        # lookup here; Ray refuses an id it has, the guard against a double submission.
        try:
            await client.submit(sub_id, self.trainer_env(job), metadata)
        except RayJobsError as e:
            # Lost a race with ourselves (the lookup said no job, then a submit landed):
            # the job exists, which is all the caller wants.
            if "already exists" in str(e):
                return
            raise
        logger.info("Submitted Ray job %s for %s/%s", sub_id, job.namespace, job.name)

    async def s3_credentials(self, job: FineTuneJob) -> S3Credentials | None:
        name = job.spec.s3.secret_ref
        if not name:
            return None
        secret = await self.kube.get_secret(job.namespace, name)
        if secret is None:
            return None
        key_id = secret_value(secret, "AWS_ACCESS_KEY_ID")
        key = secret_value(secret, "AWS_SECRET_ACCESS_KEY")
        if not key_id or not key:
            return None
        return S3Credentials(key_id, key, secret_value(secret, "AWS_SESSION_TOKEN") or None)

    async def save_failed_log(self, job: FineTuneJob, sub_id: str, world: World,
                              patch: dict[str, Any]) -> None:
        log = world.log or ""
        patch["logTail"] = tracking.log_tail(log, self.settings.log_tail_lines)
        try:
            uri = await save_log(self.http, job, sub_id, log, await self.s3_credentials(job))
            patch["logUri"] = uri
        except LogStoreError as e:
            # Keeping the log is a courtesy: it must never hold up the retry or the failure.
            logger.warning("Could not store the log of %s: %s", sub_id, e)
            patch["logUri"] = None

    # --- writing status ----------------------------------------------------------------

    async def write_status(self, body: dict[str, Any], job: FineTuneJob,
                           status: dict[str, Any], generation: int, decision: Decision,
                           world: World, patch: dict[str, Any], now: datetime,
                           mem: JobMemory) -> None:
        patch.update(world.tracked.as_status())
        patch.update(decision.status)
        if decision.phase == phases.SUCCEEDED and status.get("phase") != phases.SUCCEEDED:
            output = dict(status.get("output") or {})
            output.update(patch.get("output") or {})
            output.setdefault("modelUri", job.final_model_uri)
            patch["output"] = output
            progress = dict(status.get("progress") or {})
            progress.update(patch.get("progress") or {})
            progress["percent"] = 100
            if progress.get("totalSteps"):
                progress["step"] = max(progress.get("step") or 0, progress["totalSteps"])
            patch["progress"] = progress
        if decision.phase == phases.RUNNING and status.get("phase") != phases.RUNNING \
                and not status.get("startTime"):
            created = phases.parse_time((body.get("metadata") or {}).get("creationTimestamp"))
            if created is not None:
                self.metrics.time_to_running.observe((now - created).total_seconds())
        # The cluster's name while one exists (or is being created), nothing otherwise.
        creating = any(isinstance(a, phases.CreateCluster) for a in decision.actions)
        deleting = any(isinstance(a, phases.DeleteCluster) for a in decision.actions)
        exists = (world.cluster is not None and not deleting) or creating
        patch["rayCluster"] = raycluster.cluster_name(job) if exists else None
        await self._patch(body, status, generation, decision, patch, phases.iso(now), mem)

    async def _write(self, meta: dict[str, Any], changes: dict[str, Any],
                     mem: JobMemory) -> None:
        """PATCH the status; what the API server returns is the next pass's status."""
        written = await self.kube.patch_job_status(meta["namespace"], meta["name"], changes)
        if isinstance(written, dict) and isinstance(written.get("status"), dict):
            mem.written_status = written["status"]
            mem.written_version = (written.get("metadata") or {}).get("resourceVersion")

    async def _patch(self, body: dict[str, Any], status: dict[str, Any], generation: int,
                     decision: Decision, patch: dict[str, Any], now: str,
                     mem: JobMemory) -> None:
        meta = body["metadata"]
        patch = dict(patch)
        patch["phase"] = decision.phase
        patch["message"] = decision.message
        patch["observedGeneration"] = generation
        if decision.conditions:
            patch["conditions"] = merge_conditions(status.get("conditions") or [],
                                                   decision.conditions, generation, now)
        # Write only what changed: a pass that saw nothing new costs no API write.
        changes = {k: v for k, v in patch.items() if status.get(k) != v
                   and not (v is None and k not in status)}
        if changes:
            await self._write(meta, changes, mem)
            if "phase" in changes:
                logger.info("FineTuneJob %s/%s: %s -> %s (%s)", meta["namespace"],
                            meta["name"], status.get("phase") or "-", decision.phase,
                            decision.message)
        for event in decision.events:
            self.events.record(body, type=event.type, reason=event.reason,
                               message=event.message)
