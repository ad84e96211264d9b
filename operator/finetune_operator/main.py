"""The operator process: the wiring of kopf's handlers and settings, in one place.

`run(settings)` is what `finetune operator` calls. `operator(settings, ...)` is the same as a
coroutine, for tests that run the operator in-process against an API emulator.

Each handler is one call; what it does lives with what it calls:
- startup/cleanup: `runtime.Runtime` (HTTP sessions, API client, metrics server, reconciler);
- login: one aiohttp session, shared by kopf's watches and the operator's own client;
- job events (`Reconciler.job_event`): wake the job's daemon on a spec change, note which
  status version the watch has caught up with, and start the clean-up of a deleted job;
- RayCluster events (`Reconciler.cluster_event`): the operator's cache of its clusters;
  KubeRay's ready/failed wakes a job;
- daemon, one per FineTuneJob (`Reconciler.run`): the level-based reconcile loop; kopf keeps
  its finalizer on the job until the daemon has exited, which waits for the clean-up (a pass
  that stops the Ray job and deletes the RayCluster; checkpoints stay);
- probe: liveness.

There are no create/update/delete handlers on purpose: with any of them kopf stores a
last-handled-configuration annotation on every job (one more PATCH each) and deep-copies each
job twice per event to diff it (bench/operator_scale measured both).
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from typing import Any

import kopf

from finetune_api import GROUP, PLURAL, VERSION

from .reconcile import TRAINER_STOP_GRACE_S
from .runtime import Runtime
from .settings import ANNOTATION_PREFIX, FINALIZER, JOB_LABEL, Settings

logger = logging.getLogger("finetune_operator")
RESOURCE = (GROUP, VERSION, PLURAL)
# How long kopf keeps a deleted job's finalizer while its clean-up runs (which gives a
# running trainer Ray's stop grace before its cluster goes). After that the job goes anyway;
# its RayCluster and Secret carry ownerReferences, so Kubernetes' garbage collector deletes
# them (which also ends the Ray job).
CLEANUP_TIMEOUT = TRAINER_STOP_GRACE_S + 30.0


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


# A namespace name, not one of kopf's patterns (globs, "!negations").
EXACT_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


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
    # Exact namespace names (--namespace; the chart's namespaced mode) need no namespace
    # observation: kopf serves them as named. With it, a ServiceAccount that may not list
    # namespaces (namespaced mode grants none) waits through kopf's 9 tries of that 403,
    # ~55 s, before kopf falls back to the same names, and every job created meanwhile waits
    # too (bench operator_scale --stack real). This also skips kopf's runtime CRD watch, which
    # namespaced mode may not do either; its start-up scan still finds the CRDs.
    if settings.namespaces and all(EXACT_NAMESPACE.fullmatch(n) for n in settings.namespaces):
        kopf_settings.scanning.disabled = True
    kopf_settings.peering.standalone = settings.peering is None
    if settings.peering is not None:
        kopf_settings.peering.name = settings.peering
        kopf_settings.peering.priority = settings.priority
        kopf_settings.peering.clusterwide = settings.clusterwide
        kopf_settings.peering.mandatory = True


def build_registry() -> kopf.OperatorRegistry:
    """A fresh registry per operator (tests start several in one process): one line each."""
    registry = kopf.OperatorRegistry()

    @kopf.on.startup(registry=registry)
    async def startup(memo: kopf.Memo, **_: Any) -> None:
        memo.runtime = Runtime(memo.settings, memo.connection)

    @kopf.on.cleanup(registry=registry)
    async def cleanup(memo: kopf.Memo, **_: Any) -> None:
        if getattr(memo, "runtime", None):
            await memo.runtime.close()

    @kopf.on.login(registry=registry)
    async def login(settings: kopf.OperatorSettings, memo: kopf.Memo,
                    **kwargs: Any) -> kopf.AiohttpSession:
        return memo.runtime.login(settings, **kwargs)

    @kopf.on.probe(id="jobs", registry=registry)
    async def probe_jobs(memo: kopf.Memo, **_: Any) -> int:
        return len(memo.runtime.reconciler.memory)

    @kopf.on.event(*RESOURCE, registry=registry)
    async def observe_job(type: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        memo.runtime.reconciler.job_event(type, body)

    @kopf.on.event("ray.io", "v1", "rayclusters", labels={JOB_LABEL: kopf.PRESENT},
                   registry=registry)
    async def watch_cluster(type: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        memo.runtime.reconciler.cluster_event(type, body)

    @kopf.daemon(*RESOURCE, registry=registry, cancellation_timeout=CLEANUP_TIMEOUT,
                 when=lambda meta, **_: not meta.get("deletionTimestamp"))
    async def reconcile_loop(body: kopf.Body, memo: kopf.Memo, stopped: kopf.DaemonStopped,
                             **_: Any) -> None:
        await memo.runtime.reconciler.run(body, stopped)

    return registry


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
