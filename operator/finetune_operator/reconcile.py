"""One reconcile pass: observe the world, decide once (`phases.decide`), execute, write status once.

The pass is level-based: it reads the FineTuneJob, its Secret, its RayCluster and its Ray
job every time, and everything it must remember between passes lives in the job's status
(phase, rayJobId, retries, conditions, the accepted spec), never only in memory. In-memory
state (`JobMemory`) only saves work: the log cursor, the Ray auth token, the back-off delay,
the operator's own last status write. A restarted operator loses it and carries on.

Deleting a job is a pass like any other: the machine decides what to stop and delete, and
nothing is written to the job that goes. The kopf handlers in `main.py` call the entry
points at the end of this module.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import aiohttp
import kopf

from finetune_api.model import FineTuneJob
from finetune_api.status import ATTEMPT_ENV, FINISHED, JOB_ENV, MlflowSecret, Phase, Reason, S3Secret
from finetune_api.validation import ValidationError

from . import observe, phases, raycluster, tracking
from .events import EventRecorder
from .intake import IntakeGate
from .kube import Conflict, KubeClient, KubeError, secret_value
from .logstore import LogStoreError, S3Credentials, save_log
from .metrics import Metrics
from .phases import ClusterState, Decision, Observed, RayJobState, SecretState
from .rayjobs import DashboardUnreachable, RayJobInfo, RayJobsClient, RayJobsError
from .settings import FINALIZER, JOB_LABEL, Settings
from .status_patch import status_changes

logger = logging.getLogger("finetune_operator")

# Attempts of a deleted job's clean-up before the job is let go (its children carry owner
# references: Kubernetes' garbage collector deletes them then).
CLEANUP_ATTEMPTS = 5
# Seconds a stopped trainer gets to stop cleanly before Ray kills it (trainer_env).
TRAINER_STOP_GRACE_S = 60
# Seconds a RayCluster may take to come up before its pods and KubeRay's Events are read for
# why it does not: the scheduler and KubeRay answer within a second or two, and a young
# cluster's passes (every new job's) read nothing more than the cluster.
BLOCKED_AFTER = 5.0
# After a look that found nothing wrong (pods bound, or KubeRay still on its way to them), the
# next waits this long, doubling up to BLOCKED_MAX_GAP; a look that finds the cluster blocked
# keeps the reconcile interval. Looking every pass cost 1,000 waiting jobs 6 pod lists and up
# to 6 Event lists each per minute, ~200 requests/s that slowed KubeRay's own work on the same
# API server (bench operator_scale --stack real).
BLOCKED_FIRST_GAP = 15.0
BLOCKED_MAX_GAP = 60.0


@dataclass
class JobMemory:
    cursor: tracking.LogCursor | None = None
    # The Ray auth token and the uid of the RayCluster it belongs to: a recreated cluster
    # (same name, new uid) has a new token, and the old one is never sent to it.
    token: str | None = None
    token_uid: str | None = None
    # The tail of the current attempt's log as last read (submission id, text): what is
    # kept of an attempt whose Ray job the cluster forgot (RayJobLost) with its log.
    log_tail: tuple[str, str] | None = None
    backoff_reason: str | None = None
    backoff_delay: float = 0.0
    # The looks at a not-ready RayCluster's pods and Events (observe_blocked): the cluster's
    # uid, when the next may be (monotonic) and the gap before it.
    blocked_uid: str | None = None
    blocked_next: float = 0.0
    blocked_gap: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    seen_generation: int | None = None
    # The job's RayCluster as the watch last showed it (cluster_event); until the watch
    # has said anything, passes GET it.
    cluster: dict[str, Any] | None = None
    cluster_known: bool = False
    # The parsed job and a digest of the document it came from: a pass re-parses only a
    # changed document (parsing normalizes, defaults and checks the whole schema).
    parsed_key: bytes | None = None
    parsed: FineTuneJob | None = None
    # The status as the operator's own last write returned it, and that write's
    # resourceVersion, until the job watch delivers that version (job_event). kopf's
    # copy of the job lags behind the operator's writes under load: a pass that decided from
    # it re-sent the status and re-posted Events for transitions it had already made.
    # Only the operator writes the status, so its own last write is the newest status.
    written_status: dict[str, Any] | None = None
    written_version: str | None = None
    # The deletion clean-up (start_cleanup), once the job is being deleted.
    cleanup: asyncio.Task | None = None
    # The Ray job this operator asked to stop (asked again on each pass until Ray reports it
    # over; said once).
    stopping: str | None = None

    def seen_version(self, resource_version: str | None) -> None:
        """The job watch delivered this version: from it on, kopf's copy is as new."""
        if resource_version is not None and resource_version == self.written_version:
            self.written_status = self.written_version = None


@dataclass
class World:
    """What one pass observed (`obs` is the machine's view of it) and what executing needs."""
    body: dict[str, Any]
    status: dict[str, Any]
    job: FineTuneJob | None
    cluster_name: str
    obs: Observed | None = None
    cluster: dict[str, Any] | None = None
    client: RayJobsClient | None = None
    ray_info: RayJobInfo | None = None
    log: str | None = None
    tracked: tracking.Tracked = field(default_factory=tracking.Tracked)
    # Status fields that executing the decision produced (a failed attempt's log).
    produced: dict[str, Any] = field(default_factory=dict)


def cluster_wants_token(cluster: dict[str, Any]) -> bool:
    """Whether the RayCluster runs Ray with token auth (the operator's always do; the
    observed view of the watch keeps no spec, and such a cluster is the operator's)."""
    auth = (cluster.get("spec") or {}).get("authOptions", {"mode": "token"})
    return (auth or {}).get("mode", "token") == "token"


def _health(cluster: dict[str, Any] | None) -> tuple[Any, ...]:
    """What of a RayCluster, changed, is worth a pass at once: KubeRay reporting it ready (or
    suspended), its head going down or coming back once it was up, a replica failure. Not
    its first conditions while it comes up: a pass then would only rewrite the job's
    Ready reason, one more status write for every new job."""
    if cluster is None:
        return (None, None, False)
    state = (cluster.get("status") or {}).get("state")
    conds = observe.conditions(cluster)
    provisioned = (conds.get(observe.PROVISIONED) or {}).get("status") == "True"
    head = (conds.get(observe.HEAD_POD_READY) or {}).get("status") if provisioned else None
    return (state if state in ("ready", "suspended") else None, head,
            bool(observe.replica_failure(cluster)))


def now_utc() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


async def _hold_until_done(task: asyncio.Task) -> Any:
    """Await `task` through cancellations of the awaiting task. kopf cancels a deleted
    job's daemon, and the await of the clean-up that follows is cancelled again at once
    (kopf 1.45: the shielded await raised CancelledError while the clean-up was pending),
    yet the daemon must outlive the clean-up: once it ends, kopf drops its finalizer and the
    garbage collector deletes the RayCluster under a trainer that is still stopping. Bounded
    by the clean-up's own time limit (start_cleanup), and by kopf's cancellation_timeout
    (main.py) after which kopf leaves the daemon be."""
    while True:
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                raise
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()


def _key(body: Mapping[str, Any]) -> str:
    meta = body.get("metadata") or {}
    return f"{meta.get('namespace')}/{meta.get('name')}"


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

    # --- one pass ----------------------------------------------------------------------

    async def reconcile(self, body: dict[str, Any]) -> float:
        """Reconcile one job; returns the seconds until the next pass."""
        key = _key(body)
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
        if not decision.write_status:
            return self.settings.reconcile_interval
        self.metrics.observe_phase(key, decision.phase)
        if decision.requeue_after is not None:
            mem.backoff_reason = None
            return max(0.0, decision.requeue_after)
        if decision.backoff:
            return self._backoff(mem, decision.reason or "backoff")
        mem.backoff_reason = None
        if decision.phase == Phase.RUNNING:
            return self.settings.tracking_interval
        return self.settings.reconcile_interval

    def _backoff(self, mem: JobMemory, reason: str) -> float:
        base = self.settings.reconcile_interval
        if mem.backoff_reason == reason:
            mem.backoff_delay = min(self.settings.max_backoff, mem.backoff_delay * 2)
        else:
            mem.backoff_reason, mem.backoff_delay = reason, base
        return mem.backoff_delay

    async def _reconcile(self, body: dict[str, Any], mem: JobMemory) -> Decision:
        """observe -> decide (once) -> execute -> write the status (once)."""
        world = await self.observe(body, mem)
        assert world.obs is not None
        decision = await self.execute(world, phases.decide(world.obs), mem)
        if decision.write_status:
            await self.write_status(world, decision, mem)
        return decision

    # --- observing ---------------------------------------------------------------------

    async def observe(self, body: dict[str, Any], mem: JobMemory) -> World:
        meta = body.get("metadata") or {}
        status = dict(mem.written_status if mem.written_status is not None
                      else body.get("status") or {})
        generation = int(meta.get("generation") or 1)
        deleting = bool(meta.get("deletionTimestamp"))
        spec, rejected, to_store = observe.accepted_spec(body.get("spec"), status)
        job, invalid = self.parse(body, spec, mem)
        world = World(body=body, status=status, job=job,
                      cluster_name=raycluster.cluster_name(job) if job else meta.get("name"))
        if invalid and not deleting:
            world.obs = Observed(job=None, generation=generation, status=status,
                                 now=now_utc(), invalid_spec=invalid)
            return world

        phase = status.get("phase") or Phase.PENDING
        secret = tracking_secret = SecretState.NOT_NEEDED
        if job is not None and phase not in FINISHED and not deleting:
            secret = await self.observe_secret(job)
            tracking_secret = await self.observe_tracking_secret(job)
        world.cluster = await self.observe_cluster(world, mem, fresh=deleting)
        cluster = observe.cluster_state(world.cluster, meta.get("name"), meta.get("uid"))
        blocked = None
        if job is not None and phase not in FINISHED and not deleting \
                and cluster == ClusterState.PROVISIONING:
            blocked = await self.observe_blocked(world, mem)
        ray_state, ray_message = RayJobState.UNKNOWN, ""
        if job is not None and cluster == ClusterState.READY:
            # A finished or deleted job's too: its cluster goes only once its Ray job is over
            # (phases._take_down); their log is not followed any more.
            ray_state, ray_message = await self.observe_ray_job(
                job, world, mem, follow_log=phase not in FINISHED and not deleting)
        world.obs = Observed(
            job=job, generation=generation, status=status, now=now_utc(), secret=secret,
            tracking_secret=tracking_secret,
            cluster=cluster, ray_job=ray_state, ray_job_message=ray_message,
            rejected_fields=rejected,
            exit_code=world.ray_info.driver_exit_code if world.ray_info else None,
            failure_message=world.tracked.failure, spec_to_store=to_store, deleting=deleting,
            blocked=blocked,
            head_trouble=observe.head_trouble(world.cluster)
            if cluster == ClusterState.HEAD_DOWN else "")
        return world

    def parse(self, body: dict[str, Any], spec: dict[str, Any], mem: JobMemory
              ) -> tuple[FineTuneJob | None, str]:
        """(the job, "") or (None, why the validator refuses it)."""
        document = observe.job_document(body, spec)
        key = hashlib.sha1(json.dumps(document, sort_keys=True).encode()).digest()
        if mem.parsed_key == key and mem.parsed is not None:
            return mem.parsed, ""
        try:
            # Without the CEL rules: the API server ran the same ones on this document
            # when it admitted it (celpy took ~25 % of the operator's CPU at intake).
            job = FineTuneJob.from_document(document, rules=False)
        except ValidationError as e:
            return None, str(e)
        mem.parsed_key, mem.parsed = key, job
        return job, ""

    async def observe_secret(self, job: FineTuneJob) -> SecretState:
        return await self._secret_state(
            job.namespace, job.spec.s3.secret_ref,
            lambda secret: all(secret_value(secret, k) for k in S3Secret.REQUIRED))

    async def observe_tracking_secret(self, job: FineTuneJob) -> SecretState:
        """Every MLflow key is optional, but a Secret with neither a user name and password
        nor a token gives the server nothing: the run would fail at its first metric."""
        def usable(secret: dict[str, Any]) -> bool:
            has = {k for k in MlflowSecret.OPTIONAL if secret_value(secret, k)}
            return {MlflowSecret.USERNAME, MlflowSecret.PASSWORD} <= has or MlflowSecret.TOKEN in has
        mlflow = job.spec.tracking.mlflow
        return await self._secret_state(job.namespace, mlflow.secret_ref if mlflow else "", usable)

    async def _secret_state(self, namespace: str | None, name: str | None,
                            usable: Callable[[dict[str, Any]], bool]) -> SecretState:
        """A Secret the pods read: not needed (no name), missing, lacking keys, or present."""
        if not name:
            return SecretState.NOT_NEEDED
        secret = await self.kube.get_secret(namespace, name)
        if secret is None:
            return SecretState.MISSING
        return SecretState.PRESENT if usable(secret) else SecretState.INCOMPLETE

    async def observe_cluster(self, world: World, mem: JobMemory, *, fresh: bool
                              ) -> dict[str, Any] | None:
        meta = world.body.get("metadata") or {}
        if not fresh and mem.cluster_known:
            return mem.cluster
        if not fresh and not world.status.get("phase") and not world.status.get("rayCluster"):
            # A job the operator never wrote a status for has no cluster yet (unless a pass
            # created one and died before its status write: the create then answers 409 and
            # the next pass looks). No GET in front of every new job's RayCluster POST.
            return None
        return await self.kube.get_raycluster(meta.get("namespace"), world.cluster_name)

    async def observe_blocked(self, world: World, mem: JobMemory) -> tuple[str, str] | None:
        """Why a RayCluster that is not ready cannot come up, if it cannot: KubeRay's
        ReplicaFailure condition, its pods unschedulable (the scheduler's PodScheduled
        message), or KubeRay's Event refusing it. The pods and Events are read only once the
        cluster had time to come up (BLOCKED_AFTER), not on every young cluster's pass, and
        less and less often while they show nothing wrong (BLOCKED_FIRST_GAP)."""
        cluster = world.cluster
        if cluster is None or (cluster.get("metadata") or {}).get("deletionTimestamp"):
            return None
        failure = observe.replica_failure(cluster)
        if failure:
            return Reason.CLUSTER_REFUSED, failure
        meta = cluster.get("metadata") or {}
        created = phases.parse_time(meta.get("creationTimestamp"))
        if created is not None and \
                (now_utc() - created).total_seconds() < BLOCKED_AFTER:
            return None
        if mem.blocked_uid != meta.get("uid"):
            mem.blocked_uid, mem.blocked_next, mem.blocked_gap = meta.get("uid"), 0.0, 0.0
        if time.monotonic() < mem.blocked_next:
            return None
        found = await self._look_blocked(world, cluster, meta)
        mem.blocked_gap = 0.0 if found else min(max(2 * mem.blocked_gap, BLOCKED_FIRST_GAP),
                                                BLOCKED_MAX_GAP)
        mem.blocked_next = time.monotonic() + mem.blocked_gap
        return found

    async def _look_blocked(self, world: World, cluster: dict[str, Any],
                            meta: dict[str, Any]) -> tuple[str, str] | None:
        ns = meta.get("namespace") or (world.body.get("metadata") or {}).get("namespace")
        pods = await self.kube.list_pods(ns, f"{raycluster.RAY_CLUSTER_LABEL}={world.cluster_name}")
        words = observe.unschedulable(pods)
        if words:
            return Reason.UNSCHEDULABLE, words
        if not pods and not observe.conditions(cluster):
            # No pod and no condition: KubeRay may have refused the cluster, which it says
            # only in an Event (its validation runs before it writes any status).
            events = await self.kube.list_events(
                ns, f"involvedObject.kind=RayCluster,involvedObject.name={world.cluster_name}")
            refused = observe.refusal(events, meta.get("uid"))
            if refused:
                return Reason.CLUSTER_REFUSED, refused
        return None

    async def observe_ray_job(self, job: FineTuneJob, world: World, mem: JobMemory,
                              follow_log: bool = True) -> tuple[RayJobState, str]:
        """The current attempt's Ray job on a ready cluster, and its log (progress)."""
        assert world.cluster is not None
        sub_id = world.status.get("rayJobId") or phases.submission_id(job, 1)
        world.client = await self.ray_client(job, world.cluster, mem)
        if world.client is None:
            return RayJobState.UNREACHABLE, (
                "no head address published" if not observe.dashboard_url(world.cluster)
                else "KubeRay has not written this RayCluster's auth token Secret yet")
        try:
            world.ray_info = await world.client.get(sub_id)
            if world.ray_info is None:
                return RayJobState.NOT_FOUND, ""
            state = RayJobState(world.ray_info.status)
            if follow_log:
                await self.read_log(world.client, sub_id, mem, world)
            return state, world.ray_info.message
        except RayJobsError as e:
            # Shown in the Ready condition; a refused token is read again next time
            # (the auth Secret may have been replaced).
            if not isinstance(e, DashboardUnreachable):
                mem.token = mem.token_uid = None
            return RayJobState.UNREACHABLE, str(e)

    async def ray_token(self, job: FineTuneJob, cluster: dict[str, Any], mem: JobMemory
                        ) -> str | None:
        """The token KubeRay generated for this RayCluster (None until its Secret exists).
        Cached per cluster uid: a new cluster (recreated, retried) is read again, and a
        refused token is dropped (observe_ray_job) and read again."""
        if not cluster_wants_token(cluster):
            return None
        uid = (cluster.get("metadata") or {}).get("uid")
        if mem.token is None or mem.token_uid != uid:
            secret = await self.kube.get_secret(job.namespace, raycluster.auth_secret_name(job))
            mem.token = observe.cluster_token(secret, cluster)
            mem.token_uid = uid if mem.token is not None else None
        return mem.token

    async def ray_client(self, job: FineTuneJob, cluster: dict[str, Any],
                         mem: JobMemory) -> RayJobsClient | None:
        """A client of the cluster's dashboard, or None while there is none to call: no
        address published, or no token of this cluster yet (never a call without it)."""
        url = observe.dashboard_url(cluster, self.settings.dashboard_host)
        if url is None:
            return None
        token = await self.ray_token(job, cluster, mem)
        if token is None and cluster_wants_token(cluster):
            return None
        return RayJobsClient(self.http, url, token, timeout=self.settings.dashboard_timeout)

    async def read_log(self, client: RayJobsClient, sub_id: str, mem: JobMemory,
                       world: World) -> None:
        log = await client.logs(sub_id)
        world.log = log
        mem.log_tail = (sub_id, tracking.log_tail(log, self.settings.log_tail_lines))
        if mem.cursor is None or mem.cursor.submission_id != sub_id:
            mem.cursor = tracking.LogCursor(sub_id)
        events = mem.cursor.feed(log)
        world.tracked = tracking.apply_events(events, world.status)
        if mem.cursor.last_failed:
            e = mem.cursor.last_failed
            world.tracked.failure = f"{e.get('reason', 'Failed')}: {e.get('message', '')}"

    # --- acting ------------------------------------------------------------------------

    async def execute(self, world: World, decision: Decision, mem: JobMemory) -> Decision:
        """Carry out the decision's actions, in order; returns the decision in effect (one of
        its after_submit outcomes, when Ray already reports the job it was just given)."""
        job = world.job
        ns = (world.body.get("metadata") or {}).get("namespace")
        for action in decision.actions:
            if isinstance(action, phases.DeleteCluster):
                # The one action on an invalid job (job None): when it is deleted.
                if await self.kube.delete_raycluster(ns, world.cluster_name):
                    logger.info("Deleted RayCluster %s/%s", ns, world.cluster_name)
                continue
            assert job is not None
            match action:
                case phases.CreateCluster():
                    await self.create_cluster(world.body, job, mem)
                case phases.Submit(submission_id=sub_id):
                    assert world.client is not None  # Submit is decided only on a ready cluster
                    await self.submit(world.client, job, sub_id)
                    decision = await self.after_submit(world.client, sub_id, decision)
                case phases.StopJob(submission_id=sub_id):
                    await self.stop(world, job, sub_id, mem)
                case phases.SaveLog(submission_id=sub_id):
                    await self.save_failed_log(job, sub_id, world, mem)
                case phases.DeleteJob():
                    await self.kube.delete_job(ns, job.name)
        return decision

    async def after_submit(self, client: RayJobsClient, sub_id: str,
                           decision: Decision) -> Decision:
        """Ray's answer right after the submission picks the decided outcome, if any."""
        try:
            info = await client.get(sub_id)
        except RayJobsError:
            return decision
        if info is None:
            return decision
        return decision.after_submit.get(RayJobState(info.status), decision)

    async def stop(self, world: World, job: FineTuneJob, sub_id: str, mem: JobMemory) -> None:
        client = world.client
        if client is None and world.cluster is not None:
            client = await self.ray_client(job, world.cluster, mem)
        if client is None:
            return
        try:
            if await client.stop(sub_id) and mem.stopping != sub_id:
                mem.stopping = sub_id
                logger.info("Stopped Ray job %s of %s/%s", sub_id, job.namespace, job.name)
        except RayJobsError as e:
            # Deleting the cluster (which follows) ends the job anyway.
            logger.warning("Could not stop Ray job %s: %s", sub_id, e)

    async def create_cluster(self, body: dict[str, Any], job: FineTuneJob,
                             mem: JobMemory) -> None:
        ns = job.namespace
        # Exactly what `finetune render` prints (namespace, labels, owner reference).
        cluster = raycluster.build_raycluster(job, self.settings)
        try:
            await self.kube.create_raycluster(ns, cluster)
            mem.token = mem.token_uid = None  # KubeRay generates a new token for it
            logger.info("Created RayCluster %s/%s", ns, cluster["metadata"]["name"])
        except Conflict:
            # Created by an earlier pass whose status write was lost (fine), or somebody
            # else's cluster of that name: the next pass GETs it to tell which.
            mem.cluster_known = False

    def trainer_env(self, job: FineTuneJob, sub_id: str) -> dict[str, str]:
        env = self.settings.trainer_env_vars
        env[JOB_ENV] = json.dumps(job.document, sort_keys=True)
        env[ATTEMPT_ENV] = sub_id
        # Ray's job stop (suspend, delete, deadline) sends SIGTERM and SIGKILLs 3 s later by
        # default: too soon for the trainer to abort Ray Train and release its lease, so the
        # next attempt would wait for the lease to go stale. Ray's supervisor reads this from
        # the job's env. The platform's FINETUNE_OPERATOR_TRAINER_ENV may set another value.
        env.setdefault("RAY_JOB_STOP_WAIT_TIME_S", str(TRAINER_STOP_GRACE_S))
        return env

    async def submit(self, client: RayJobsClient, job: FineTuneJob, sub_id: str) -> None:
        metadata = {"finetune.dev/job": job.name, "finetune.dev/namespace": job.namespace or "",
                    "finetune.dev/uid": job.uid or ""}
        # Submit is decided only on a pass whose lookup of this id found no job, so no second
        # lookup here; Ray refuses an id it has, the guard against a double submission.
        try:
            await client.submit(sub_id, self.trainer_env(job, sub_id), metadata)
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
        key_id = secret_value(secret, S3Secret.ACCESS_KEY_ID)
        key = secret_value(secret, S3Secret.SECRET_ACCESS_KEY)
        if not key_id or not key:
            return None
        return S3Credentials(key_id, key, secret_value(secret, S3Secret.SESSION_TOKEN) or None)

    async def save_failed_log(self, job: FineTuneJob, sub_id: str, world: World,
                              mem: JobMemory) -> None:
        log = world.log
        if log is None and mem.log_tail is not None and mem.log_tail[0] == sub_id:
            # The cluster forgot the job and its log: keep what this operator last read.
            log = mem.log_tail[1]
        log = log or ""
        world.produced["logTail"] = tracking.log_tail(log, self.settings.log_tail_lines)
        try:
            uri = await save_log(self.http, job, sub_id, log, await self.s3_credentials(job))
            world.produced["logUri"] = uri
        except LogStoreError as e:
            # Keeping the log is a courtesy: it must never hold up the retry or the failure.
            logger.warning("Could not store the log of %s: %s", sub_id, e)
            world.produced["logUri"] = None

    # --- writing status: the pass's one write ------------------------------------------

    async def write_status(self, world: World, decision: Decision, mem: JobMemory) -> None:
        assert world.obs is not None
        body, status, now = world.body, world.status, world.obs.now
        meta = body["metadata"]
        observed = dict(world.produced)
        observed.update(world.tracked.as_status())
        if not world.obs.invalid_spec:
            # The cluster's name while one exists (or is being created), nothing otherwise.
            creating = any(isinstance(a, phases.CreateCluster) for a in decision.actions)
            deleting = any(isinstance(a, phases.DeleteCluster) for a in decision.actions)
            exists = (world.cluster is not None and not deleting) or creating
            observed["rayCluster"] = world.cluster_name if exists else None
        if decision.phase == Phase.RUNNING and status.get("phase") != Phase.RUNNING \
                and not status.get("startTime"):
            created = phases.parse_time(meta.get("creationTimestamp"))
            if created is not None:
                self.metrics.time_to_running.observe((now - created).total_seconds())
        changes = status_changes(status, decision, generation=world.obs.generation,
                                 now=phases.iso(now), observed=observed,
                                 outputs=world.job.outputs if world.job else None)
        if changes:
            # What the API server returns is the next pass's status.
            written = await self.kube.patch_job_status(meta["namespace"], meta["name"], changes)
            if isinstance(written, dict) and isinstance(written.get("status"), dict):
                mem.written_status = written["status"]
                mem.written_version = (written.get("metadata") or {}).get("resourceVersion")
            if "phase" in changes:
                logger.info("FineTuneJob %s/%s: %s -> %s (%s)", meta["namespace"],
                            meta["name"], status.get("phase") or "-", decision.phase,
                            decision.message)
        for event in decision.events:
            self.events.record(body, type=event.type, reason=event.reason,
                               message=event.message)
        for type_, reason, message in world.tracked.events:
            self.events.record(body, type=type_, reason=reason, message=message)

    # --- kopf's entry points (main.py wires one handler to each) -----------------------

    def job_event(self, type: str, body: Mapping[str, Any]) -> None:
        """A watch event of a FineTuneJob."""
        key, meta = _key(body), body.get("metadata") or {}
        if type == "DELETED":
            mem = self.memory.get(key)
            if mem is not None and (mem.cleanup is None or mem.cleanup.done()):
                self.forget(key)
            return
        if meta.get("deletionTimestamp"):
            # Cleaned up in a task of its own (not in the daemon, which kopf cancels now);
            # the daemon waits for it before it exits, and kopf for the daemon.
            self.clean_up_if_deleted(body)
            return
        # A new daemon runs its first pass at once; afterwards only a spec change (a new
        # generation) needs an early pass. An event handler stores nothing on the object,
        # unlike create/update handlers (kopf's last-handled-configuration annotation).
        mem = self.mem(key)
        mem.seen_version(meta.get("resourceVersion"))
        generation = meta.get("generation")
        if mem.seen_generation is not None and generation != mem.seen_generation:
            mem.wake.set()
        mem.seen_generation = generation

    def cluster_event(self, type: str, body: Mapping[str, Any]) -> None:
        """A watch event of a RayCluster with the job label: the operator's view of its
        clusters (an informer). A pass reads the cluster from here instead of GETting it,
        and KubeRay reporting it ready (or failed) wakes the job at once.

        Only for jobs the operator knows (it has seen their events): a cluster event never
        brings back the memory of a deleted job. A job whose first pass comes before its
        cluster's first event GETs the cluster instead."""
        meta = body.get("metadata") or {}
        job = (meta.get("labels") or {}).get(JOB_LABEL)
        mem = self.memory.get(f"{meta.get('namespace')}/{job}")
        if mem is None:
            return
        before = _health(mem.cluster)
        mem.cluster = None if type == "DELETED" else raycluster.observed_view(dict(body))
        mem.cluster_known = True
        if type == "DELETED" or _health(mem.cluster) != before:
            mem.wake.set()

    async def run(self, body: kopf.Body, stopped: kopf.DaemonStopped) -> None:
        """A job's daemon: a pass, then sleep until the pass's delay or a wake-up."""
        mem = self.mem(_key(body))
        first = True
        try:
            while not stopped and mem.cleanup is None:
                mem.wake.clear()  # before the pass: a wake that arrives during it is not lost
                if first:
                    first = False
                    with self.intake.first_pass():
                        delay = await self.reconcile(copy.deepcopy(dict(body)))
                else:
                    await self.intake.wait()  # new jobs' first passes go first
                    delay = await self.reconcile(copy.deepcopy(dict(body)))
                try:
                    await asyncio.wait_for(mem.wake.wait(), timeout=delay)
                except TimeoutError:
                    pass
        finally:
            # Stopped for the deletion (cancelled by kopf): hold the finalizer until the
            # clean-up is done. kopf may cancel the daemon before the job's deletion event
            # reaches job_event: then the clean-up starts here, from kopf's live body (were
            # the daemon to end first, kopf would drop its finalizer and the garbage
            # collector delete the cluster under a running trainer). Stopped because the
            # operator exits: leave it running.
            if not (stopped.reason or 0) & kopf.DaemonStoppingReason.OPERATOR_EXITING:
                self.clean_up_if_deleted(body)
                if mem.cleanup is not None:
                    await _hold_until_done(mem.cleanup)

    def clean_up_if_deleted(self, body: Mapping[str, Any]) -> None:
        """Start the deletion clean-up of a job being deleted whose finalizer kopf still holds
        (once kopf has released it there is nothing left to do)."""
        meta = body.get("metadata") or {}
        if meta.get("deletionTimestamp") and FINALIZER in (meta.get("finalizers") or []):
            self.start_cleanup(_key(body), dict(body))

    def start_cleanup(self, key: str, body: dict[str, Any]) -> None:
        """Start the deletion clean-up of a job once (a pass that the machine turns into
        stopping the Ray job and deleting the RayCluster); the memory goes when it is done."""
        mem = self.mem(key)
        if mem.cleanup is not None:
            return

        async def clean_up() -> None:
            loop = asyncio.get_running_loop()
            # A running Ray job is stopped first and the cluster deleted once it is over
            # (phases._take_down): passes until then, for at most Ray's stop grace. After
            # that the finalizer goes anyway and the garbage collector deletes the cluster.
            until = loop.time() + TRAINER_STOP_GRACE_S + 10
            try:
                for attempt in range(CLEANUP_ATTEMPTS):
                    try:
                        while True:
                            async with mem.lock:
                                decision = await self._reconcile(copy.deepcopy(body), mem)
                            if not phases.waits_for_stop(decision) or loop.time() > until:
                                break
                            await asyncio.sleep(phases.STOPPING_POLL_S)
                        break
                    except (KubeError, aiohttp.ClientError, TimeoutError) as e:
                        logger.warning("Clean-up of deleted FineTuneJob %s failed "
                                       "(attempt %d): %s", key, attempt + 1, e)
                        await asyncio.sleep(2.0 * (attempt + 1))
            finally:
                self.forget(key)

        mem.cleanup = asyncio.create_task(clean_up(), name=f"clean-up {key}")
        mem.wake.set()
