"""The operator process: every kopf registration and startup setting, in one place.

`run(settings)` is what `finetune operator` calls. `operator(settings, ...)` is the same as a
coroutine, for tests that run the operator in-process against an API emulator.

Handlers:
- login: one aiohttp session, shared by kopf's watches and the operator's own client;
- create / resume / spec change: only wake the job's reconciler, never act themselves;
- daemon (one per FineTuneJob): the level-based reconcile loop of `reconcile.py`;
- delete (own finalizer): stop the Ray job and delete the RayCluster, keep checkpoints;
- probe: liveness; startup/cleanup: the metrics server and HTTP sessions.
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


def configure_kopf(kopf_settings: kopf.OperatorSettings, settings: Settings) -> None:
    # Own names on the objects, so two kopf operators never fight over a finalizer.
    kopf_settings.persistence.finalizer = FINALIZER
    kopf_settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=ANNOTATION_PREFIX)
    kopf_settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
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
    # Few workers, and idle ones go away fast: a reconcile is short, the daemons do the rest.
    # No worker limit (kopf's default): the edge handlers only wake a daemon. A limit of 8
    # workers that each idle 1 s after an object's last event capped intake at ~8 jobs/s.
    kopf_settings.queueing.worker_limit = None
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
    async def wake_on_spec_change(type: str, namespace: str, name: str, meta: kopf.Meta,
                                  memo: kopf.Memo, **_: Any) -> None:
        if type == "DELETED":
            return
        # A new daemon runs its first pass at once; afterwards only a spec change (a new
        # generation) needs an early pass. An event handler stores nothing on the object,
        # unlike create/update handlers (kopf's last-handled-configuration annotation).
        mem = memo.reconciler.mem(f"{namespace}/{name}")
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
        key = f"{namespace}/{labels[JOB_LABEL]}"
        if type == "DELETED" and key not in memo.reconciler.memory:
            return  # the job is gone too (forgotten by its delete handler): nothing to keep
        mem = memo.reconciler.mem(key)
        before = ((mem.cluster or {}).get("status") or {}).get("state")
        mem.cluster = None if type == "DELETED" else copy.deepcopy(dict(body))
        mem.cluster_known = True
        if type == "DELETED" or (status.get("state") != before
                                 and status.get("state") in ("ready", "failed", "suspended")):
            mem.wake.set()

    @kopf.daemon(*RESOURCE, registry=registry, cancellation_timeout=5.0,
                 when=lambda meta, **_: not meta.get("deletionTimestamp"))
    async def reconcile_loop(body: kopf.Body, namespace: str, name: str, memo: kopf.Memo,
                             stopped: kopf.DaemonStopped, **_: Any) -> None:
        reconciler: Reconciler = memo.reconciler
        key = f"{namespace}/{name}"
        mem = reconciler.mem(key)
        while not stopped:
            mem.wake.clear()  # before the pass: a wake that arrives during it is not lost
            delay = await reconciler.reconcile(copy.deepcopy(dict(body)))
            try:
                await asyncio.wait_for(mem.wake.wait(), timeout=delay)
            except TimeoutError:
                pass

    @kopf.on.delete(*RESOURCE, registry=registry)
    async def delete(body: kopf.Body, namespace: str, name: str, memo: kopf.Memo,
                     **_: Any) -> None:
        await finalize(memo.reconciler, copy.deepcopy(dict(body)))
        memo.reconciler.forget(f"{namespace}/{name}")

    return registry


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
        try:
            await reconciler.kube.delete_raycluster(ns, raycluster.cluster_name(job)
                                                    if job else name)
        except KubeError as e:
            raise kopf.TemporaryError(f"Could not delete RayCluster {name}: {e}", delay=2)


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


def run(settings: Settings) -> None:
    """`finetune operator`: configure logging and run until SIGINT/SIGTERM."""
    configure_logging(settings)
    asyncio.run(operator(settings))
