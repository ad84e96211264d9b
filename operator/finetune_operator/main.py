"""The operator process: every kopf registration and startup setting, in one place.

`run(settings)` is what `finetune operator` calls. `operator(settings, ...)` is the same as a
coroutine, for tests that run the operator in-process against an API emulator.

Handlers:
- login: one aiohttp session, shared by kopf's watches and the operator's own client;
- job events: wake the job's reconciler on a spec change, note which status version the
  watch has caught up with, and start the clean-up when the job is being deleted;
- RayCluster events: the operator's cache of its clusters; KubeRay's ready/failed wakes a job;
- daemon (one per FineTuneJob): the level-based reconcile loop of `reconcile.py`; kopf keeps
  its finalizer on the job until the daemon has exited, which waits for the clean-up (stop the
  Ray job, delete the RayCluster, keep checkpoints);
- probe: liveness; startup/cleanup: the metrics server and HTTP sessions.

There are no create/update/delete handlers on purpose: with any of them kopf stores a
last-handled-configuration annotation on every job (one more PATCH each) and deep-copies each
job twice per event to diff it (bench/operator_scale measured both).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
from typing import Any

import aiohttp
import kopf

from finetune_api import GROUP, PLURAL, VERSION
from finetune_api.model import FineTuneJob
from finetune_api.validation import ValidationError

from . import raycluster
from .kube import KubeClient, KubeError, session_for
from .metrics import Metrics
from .phases import submission_id
from .rayjobs import RayJobsClient, RayJobsError
from .reconcile import Reconciler, job_document
from .settings import ANNOTATION_PREFIX, FINALIZER, JOB_LABEL, Settings

logger = logging.getLogger("finetune_operator")
RESOURCE = (GROUP, VERSION, PLURAL)
# How long kopf keeps a deleted job's finalizer while its clean-up runs. After that the
# job goes anyway; its RayCluster and Secret carry ownerReferences, so Kubernetes'
# garbage collector deletes them (which also ends the Ray job).
CLEANUP_TIMEOUT = 60.0


class NoDiffBase(kopf.AnnotationsDiffBaseStorage):
    """No diff-base: the operator has no create/update/delete handlers to diff for.

    kopf builds an object's "essence" (a deep copy of the whole body, then the same again to
    clear its progress marks) on every watch event of every resource, whether any handler
    needs it or not: the largest item of the operator's own CPU time at 1,000 jobs. Nothing
    here reads it (daemons have no idle timeout), so it is not built.
    """

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> None:  # type: ignore[override]
        return None

    def fetch(self, *, body: kopf.Body) -> None:  # type: ignore[override]
        return None


def configure_kopf(kopf_settings: kopf.OperatorSettings, settings: Settings) -> None:
    # Own names on the objects, so two kopf operators never fight over a finalizer.
    kopf_settings.persistence.finalizer = FINALIZER
    kopf_settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=ANNOTATION_PREFIX)
    kopf_settings.persistence.diffbase_storage = NoDiffBase(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration")
    # The operator posts its own Events (phases.Reason); kopf's log lines must not
    # become Events except for real failures.
    kopf_settings.posting.level = logging.ERROR
    kopf_settings.posting.reporting_component = "finetune-operator"
    # Watches that hang silently are restarted; requests never wait forever.
    kopf_settings.watching.server_timeout = settings.watch_server_timeout
    kopf_settings.watching.client_timeout = settings.watch_client_timeout
    kopf_settings.watching.connect_timeout = 30
    kopf_settings.networking.request_timeout = settings.request_timeout
    kopf_settings.networking.connect_timeout = 30
    # Idle workers go away fast: a reconcile is short, the daemons do the rest.
    # No worker limit (kopf's default): the edge handlers only wake a daemon. A limit of 8
    # workers that each idle 1 s after an object's last event capped intake at ~8 jobs/s.
    # Without a limit every object of a burst has a worker (a task, a queue, its events) that
    # kopf keeps 5 s after the object's last event by default: 1 s took the peak RSS of
    # 1,000 new jobs from ~145 to ~131 MB (bench operator_scale).
    kopf_settings.queueing.worker_limit = None
    kopf_settings.queueing.idle_timeout = 1.0
    kopf_settings.execution.max_workers = 4
    kopf_settings.peering.standalone = settings.peering is None
    if settings.peering is not None:
        kopf_settings.peering.name = settings.peering
        kopf_settings.peering.priority = settings.priority
        kopf_settings.peering.clusterwide = settings.clusterwide
        kopf_settings.peering.mandatory = True


def build_registry() -> kopf.OperatorRegistry:
    """A fresh registry per operator (tests start several in one process)."""
    registry = kopf.OperatorRegistry()

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo,
                      **_: Any) -> None:
        ours: Settings = memo.settings
        memo.http = aiohttp.ClientSession()
        memo.kube = KubeClient(None, timeout=ours.request_timeout)
        memo.metrics = Metrics()
        memo.reconciler = Reconciler(ours, memo.kube, memo.http, memo.metrics)
        memo.metrics_server = None
        if ours.metrics_port:
            memo.metrics_server = memo.metrics.serve(ours.metrics_port)
        logger.info("finetune-operator starting: %s", {
            "namespaces": list(ours.namespaces) or "cluster-wide",
            "peering": ours.peering or "standalone",
            "reconcile_interval": ours.reconcile_interval})

    @kopf.on.cleanup(registry=registry)
    async def cleanup(memo: kopf.Memo, **_: Any) -> None:
        if getattr(memo, "reconciler", None):
            await memo.reconciler.events.close(timeout=5.0)
        if getattr(memo, "metrics_server", None):
            server, thread = memo.metrics_server
            server.shutdown()
            server.server_close()
        if getattr(memo, "http", None):
            await memo.http.close()

    @kopf.on.login(registry=registry)
    async def login(settings: kopf.OperatorSettings, memo: kopf.Memo,
                    **kwargs: Any) -> kopf.AiohttpSession | None:
        info = memo.connection or kopf.login_with_service_account(settings=settings, **kwargs) \
            or kopf.login_with_kubeconfig(settings=settings, **kwargs)
        if info is None:
            raise kopf.LoginError("No Kubernetes credentials: neither a service account "
                                  "nor a kubeconfig was found")
        # One session for kopf's watches and patches and for the operator's own calls.
        session = session_for(info)
        memo.kube.rebind(session, info.server)
        return kopf.AiohttpSession(server=info.server, default_namespace=info.default_namespace,
                                   aiohttp_session=session, priority=info.priority)

    @kopf.on.probe(id="jobs", registry=registry)
    async def probe_jobs(memo: kopf.Memo, **_: Any) -> int:
        return len(memo.reconciler.memory)

    @kopf.on.event(*RESOURCE, registry=registry)
    async def observe_job(type: str, body: kopf.Body, namespace: str, name: str,
                          meta: kopf.Meta, memo: kopf.Memo, **_: Any) -> None:
        key = f"{namespace}/{name}"
        if type == "DELETED":
            mem = memo.reconciler.memory.get(key)
            if mem is not None and (mem.cleanup is None or mem.cleanup.done()):
                memo.reconciler.forget(key)
            return
        if meta.get("deletionTimestamp"):
            # Cleaned up in a task of its own (not in the daemon, which kopf cancels now);
            # the daemon waits for it before it exits, and kopf for the daemon. Once kopf
            # has released its finalizer there is nothing left to do.
            if FINALIZER in (meta.get("finalizers") or []):
                start_cleanup(memo.reconciler, key, dict(body))
            return
        # A new daemon runs its first pass at once; afterwards only a spec change (a new
        # generation) needs an early pass. An event handler stores nothing on the object,
        # unlike create/update handlers (kopf's last-handled-configuration annotation).
        mem = memo.reconciler.mem(key)
        mem.seen_version(meta.get("resourceVersion"))
        generation = meta.get("generation")
        if mem.seen_generation is not None and generation != mem.seen_generation:
            mem.wake.set()
        mem.seen_generation = generation

    @kopf.on.event("ray.io", "v1", "rayclusters", labels={JOB_LABEL: kopf.PRESENT},
                   registry=registry)
    async def watch_cluster(type: str, body: kopf.Body, namespace: str, labels: kopf.Labels,
                            status: kopf.Status, memo: kopf.Memo, **_: Any) -> None:
        # The watch is the operator's view of its RayClusters (an informer): a pass reads the
        # cluster from here instead of GETting it, and KubeRay reporting it ready (or failed)
        # wakes the job at once instead of at its next periodic pass.
        # Only for jobs the operator knows (it has seen their events): a cluster event never
        # brings back the memory of a deleted job. A job whose first pass comes before its
        # cluster's first event GETs the cluster instead.
        mem = memo.reconciler.memory.get(f"{namespace}/{labels[JOB_LABEL]}")
        if mem is None:
            return
        before = ((mem.cluster or {}).get("status") or {}).get("state")
        mem.cluster = None if type == "DELETED" else raycluster.observed_view(body)
        mem.cluster_known = True
        if type == "DELETED" or (status.get("state") != before
                                 and status.get("state") in ("ready", "failed", "suspended")):
            mem.wake.set()

    @kopf.daemon(*RESOURCE, registry=registry, cancellation_timeout=CLEANUP_TIMEOUT,
                 when=lambda meta, **_: not meta.get("deletionTimestamp"))
    async def reconcile_loop(body: kopf.Body, namespace: str, name: str, memo: kopf.Memo,
                             stopped: kopf.DaemonStopped, **_: Any) -> None:
        reconciler: Reconciler = memo.reconciler
        key = f"{namespace}/{name}"
        mem = reconciler.mem(key)
        first = True
        try:
            while not stopped and mem.cleanup is None:
                mem.wake.clear()  # before the pass: a wake that arrives during it is not lost
                if first:
                    first = False
                    with reconciler.intake.first_pass():
                        delay = await reconciler.reconcile(copy.deepcopy(dict(body)))
                else:
                    await reconciler.intake.wait()  # new jobs' first passes go first
                    delay = await reconciler.reconcile(copy.deepcopy(dict(body)))
                try:
                    await asyncio.wait_for(mem.wake.wait(), timeout=delay)
                except TimeoutError:
                    pass
        finally:
            # Stopped for the deletion (cancelled by kopf): hold the finalizer until the
            # clean-up is done. Stopped because the operator exits: leave it running.
            if mem.cleanup is not None and not (stopped.reason or 0) & \
                    kopf.DaemonStoppingReason.OPERATOR_EXITING:
                await asyncio.shield(mem.cleanup)

    return registry


def start_cleanup(reconciler: Reconciler, key: str, body: dict[str, Any]) -> None:
    """Start the deletion clean-up of a job once; the job's memory goes when it is done."""
    mem = reconciler.mem(key)
    if mem.cleanup is not None:
        return

    async def clean_up() -> None:
        for attempt in range(5):
            try:
                await finalize(reconciler, copy.deepcopy(body))
                break
            except (KubeError, aiohttp.ClientError, TimeoutError) as e:
                logger.warning("Clean-up of deleted FineTuneJob %s failed (attempt %d): %s",
                               key, attempt + 1, e)
                await asyncio.sleep(2.0 * (attempt + 1))
        reconciler.forget(key)

    mem.cleanup = asyncio.create_task(clean_up(), name=f"clean-up {key}")
    mem.wake.set()


async def finalize(reconciler: Reconciler, body: dict[str, Any]) -> None:
    """Stop the Ray job and delete the RayCluster; checkpoints stay where they are."""
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    try:
        job = FineTuneJob.from_document(job_document(body, body.get("spec") or {}))
    except ValidationError:
        job = None
    cluster = await reconciler.kube.get_raycluster(ns, name)
    if cluster is not None and job is not None and \
            reconciler.cluster_state(job, cluster).value == "ready":
        sub_id = (body.get("status") or {}).get("rayJobId") or submission_id(job, 1)
        try:
            client: RayJobsClient | None = await reconciler.ray_client(
                job, cluster, reconciler.mem(f"{ns}/{name}"))
            if client is not None and await client.stop(sub_id):
                logger.info("Stopped Ray job %s of deleted FineTuneJob %s/%s", sub_id, ns, name)
        except RayJobsError as e:
            # The cluster goes next, which ends the job anyway.
            logger.warning("Could not stop Ray job %s: %s", sub_id, e)
    owned = cluster is not None and any(
        o.get("uid") == meta.get("uid")
        for o in (cluster.get("metadata") or {}).get("ownerReferences") or [])
    if owned:
        await reconciler.kube.delete_raycluster(ns, raycluster.cluster_name(job) if job else name)


async def operator(settings: Settings, *, connection: kopf.ConnectionInfo | None = None,
                   stop_flag: asyncio.Event | threading.Event | None = None,
                   ready_flag: asyncio.Event | threading.Event | None = None) -> None:
    """Run the operator in the current event loop until `stop_flag` is set."""
    memo = kopf.Memo(settings=settings, connection=connection)
    kopf_settings = kopf.OperatorSettings()
    configure_kopf(kopf_settings, settings)
    await kopf.operator(
        registry=build_registry(),
        settings=kopf_settings,
        memo=memo,
        standalone=settings.peering is None,
        peering_name=settings.peering,
        priority=settings.priority,
        clusterwide=settings.clusterwide,
        namespaces=list(settings.namespaces),
        liveness_endpoint=(f"http://0.0.0.0:{settings.liveness_port}/healthz"
                           if settings.liveness_port else None),
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )


def configure_logging(settings: Settings) -> None:
    kopf.configure(verbose=settings.verbose,
                   log_format=kopf.LogFormat.JSON if settings.log_format == "json"
                   else kopf.LogFormat.FULL)
    # aiohttp's access log and Ray-less noise stay out of the operator's log.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if not settings.verbose:
        # kopf logs "Handler ... succeeded." for every watch event of every job (8 of the 13
        # lines per job up to Running); the operator's own log says what happened to a job.
        # kopf's warnings and errors stay.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)


def run(settings: Settings) -> None:
    """`finetune operator`: configure logging and run until SIGINT/SIGTERM."""
    configure_logging(settings)
    asyncio.run(operator(settings))
