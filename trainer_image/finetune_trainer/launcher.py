"""Driver side: preflight, Ray init/join, the TorchTrainer run, events and exit codes.

`run_job(job, fresh=False) -> int` is what `finetune-train` and `finetune run` call.
"""

from __future__ import annotations

import copy
import os
import secrets
import signal
import sys
import time

# Every worker's progress line must reach the driver log, even identical-looking ones; the
# log deduplicator reads this when ray is imported/initialised, so set it before.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

from finetune_api.model import FineTuneJob  # noqa: E402

from .errors import (EXIT_BAD_INPUT, EXIT_OK, EXIT_TRAINING_FAILED, BadInputError,  # noqa: E402
                     TrainerError, WorkerDiedError)
from .progress import emit  # noqa: E402
from . import stopping  # noqa: E402
from .storage import Location, S3Settings, check_bucket, resolve  # noqa: E402

# Worker environment passed through from the driver when set (never credentials: workers
# get those from their own pod environment, like the driver).
PASSED_ENV = ("TORCH_EXTENSIONS_DIR", "FINETUNE_CACHE_DIR", "FINETUNE_FAULT_AFTER_STEP", "HF_HOME",
              "HF_HUB_OFFLINE")
# SYNC or ASYNC (Ray Train's checkpoint_upload_mode); DEFAULT_UPLOAD_MODE when unset. In both
# the `checkpoint` event is printed only once Ray Train registered the checkpoint, i.e. every
# rank's upload finished (checkpointing.Announcer): SYNC before the step loop goes on, ASYNC at a
# later step boundary (at the latest before the next checkpoint, the fault hook or the end).
#
# ASYNC is the default, measured (bench/checkpoint_io, ~400 MB ZeRO-3 checkpoint, 2 CPU
# workers, moto S3, 2 cores, two runs): SYNC stalls the loop 4.9-6.3 s per checkpoint (local
# save, both ranks' boto3 uploads, and up to the controller's 2 s poll before it registers the
# checkpoint), ASYNC 0.2-0.8 s; counting the steps slowed while the upload runs beside them,
# ASYNC still loses 3.6 s of training per checkpoint against SYNC's 5.3-5.8 s. On GPU nodes the
# upload competes for idle CPUs instead of the training's, so the gap only widens. What ASYNC
# costs: the `checkpoint` event (status.latestCheckpoint) comes later (3-9 s after the step here,
# SYNC 5-6 s), and a crash during an upload loses that checkpoint, which was never announced:
# a retry resumes from the one before, as announced.
UPLOAD_MODE_ENV = "FINETUNE_CHECKPOINT_UPLOAD_MODE"
# status.output's keys (FineTuneJob.outputs) as the last line names them.
OUTPUT_WORDS = {"modelUri": "final model", "adapterUri": "adapter"}
DEFAULT_UPLOAD_MODE = "ASYNC"

_step_watch = stopping.StepWatch()


def fail(reason: str, message: str, code: int, **where: int) -> int:
    """One clear line for people, one `failed` event for programs; no traceback. `where`:
    the rank and pid of the worker that failed, when known (`finetune run` shows its last
    lines)."""
    print(f"finetune-train: error: {message}", file=sys.stderr, flush=True)
    emit("failed", reason=reason, message=message, **where)
    return code


def _cluster_gpus() -> int:
    """GPUs visible to this run: the Ray cluster's when joining one, else this machine's
    (checked before starting an embedded Ray, so a CPU-only machine fails in a second)."""
    import ray

    if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        _init_ray()
        return int(ray.cluster_resources().get("GPU", 0))
    import torch

    return torch.cuda.device_count()


def preflight(job: FineTuneJob) -> Location:
    """Checks that need no workers: a job that cannot work fails here, before any worker
    starts, with a one-line reason. Returns the checkpoint location."""
    from .data import Records, check_dataset
    from .model_io import check_model

    spec = job.spec
    settings = S3Settings.from_spec(spec.s3)
    ckpt = resolve(spec.checkpoint.uri, settings)
    check_bucket(ckpt)
    check_model(spec.model.uri, spec.model.revision, settings)
    data = resolve(spec.dataset.uri, settings)
    check_bucket(data)
    check_dataset(data, spec.dataset.format, Records.of(spec.dataset))
    if spec.dataset.eval_uri:
        check_dataset(resolve(spec.dataset.eval_uri, settings), spec.dataset.format, Records.of(spec.dataset))
    if spec.tracking.mlflow is not None:
        check_mlflow(spec.tracking.mlflow)
    if spec.training.precision == "fp16" and spec.resources.gpus_per_worker == 0:
        raise BadInputError("precision fp16 needs GPUs (DeepSpeed and FSDP have no fp16 on CPU); use bf16 or fp32")
    if ckpt.scheme == "file":
        try:
            os.makedirs(ckpt.path, exist_ok=True)
        except OSError as exc:
            raise BadInputError(f"cannot create checkpoint directory {ckpt.path}: {exc.strerror}") from None
    return ckpt


# The preflight's question to the tracking server: MLflow's client would otherwise retry a
# refused connection 7 times with back-off (minutes) before saying anything.
MLFLOW_PREFLIGHT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}


def check_mlflow(mlflow_spec) -> None:
    """The tracking server answers (with the credentials in the environment, if any)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    saved = {k: os.environ.get(k) for k in MLFLOW_PREFLIGHT_ENV}
    os.environ.update(MLFLOW_PREFLIGHT_ENV)
    try:
        MlflowClient(tracking_uri=mlflow_spec.uri).get_experiment_by_name(mlflow_spec.experiment)
    except (MlflowException, OSError) as exc:
        text = " ".join(str(exc).split())
        hint = ("; check spec.tracking.mlflow.secretRef's keys" if any(c in text for c in ("401", "403"))
                else "")
        raise BadInputError(f"spec.tracking.mlflow.uri: the MLflow tracking server {mlflow_spec.uri} did not "
                            f"answer: {text[:300]}{hint}") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _init_ray() -> None:
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        # Inside a Ray job on the cluster (or joining one): the driver reserves no CPU.
        ray.init(address=address, log_to_driver=True)
    else:
        # A one-machine run: a Ray of its own ("local": never looks for other Ray instances
        # on the machine, which without it prints a "Found multiple active Ray instances"
        # traceback), and no dashboard (it costs a CPU core's worth of start-up).
        ray.init(address="local", log_to_driver=True, include_dashboard=False)
    _step_watch.attach()


def _gpu_check(job: FineTuneJob) -> None:
    res = job.spec.resources
    if res.gpus_per_worker <= 0:
        return
    have = _cluster_gpus()
    if have < res.training_processes:
        raise BadInputError(f"the job asks for {res.training_processes} GPU(s) "
                            f"({res.workers} workers x {res.gpus_per_worker}) but the Ray cluster has {have}"
                            + ("; precision fp16 cannot run without GPUs" if job.spec.training.precision == "fp16" else ""))


def _root_cause(exc: BaseException) -> BaseException:
    """The worker's own exception inside Ray Train's wrappers. Of several ranks' failures, a
    worker that died (killed, OOM, crashed) is the cause; the other ranks' errors (gloo's
    "Connection reset by peer") are its symptoms."""
    failures = getattr(exc, "worker_failures", None)
    if failures:
        died = sorted(rank for rank, failure in failures.items() if _dead_worker(failure) is not None)
        if died:
            return WorkerDiedError.of(died[0], _dead_worker(failures[died[0]]))
        rank = min(failures)
        cause = _root_cause(failures[rank])
        if getattr(cause, "rank", None) is None:
            try:
                cause.rank = rank
            except AttributeError:
                pass
        return cause
    cause = getattr(exc, "cause", None) or getattr(exc, "controller_failure", None)
    if isinstance(cause, BaseException) and cause is not exc:
        inner = _root_cause(cause)
        if getattr(inner, "pid", None) is None and isinstance(getattr(exc, "pid", None), int):
            try:
                inner.pid = exc.pid  # RayTaskError: the process the exception came from
            except AttributeError:
                pass
        return inner
    return exc


def _dead_worker(failure: BaseException):
    """Ray's ActorDiedError when a rank's failure is its process's death (Ray Train reports
    it as a failed health check of the worker), else None."""
    from ray.exceptions import RayActorError

    for candidate in (failure, getattr(failure, "health_check_failure", None)):
        if isinstance(candidate, RayActorError):
            return candidate
    return None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    # RayTaskError strings start with a header and end with the real message.
    last = next((line for line in reversed(text) if line.strip()), type(exc).__name__)
    return " ".join(last.split())[:500]


def with_absolute_file_uris(job: FineTuneJob) -> FineTuneJob:
    """file://relative/path means relative to where the job was started; Ray workers run
    in a directory of their own, so they must get the absolute path."""
    doc = copy.deepcopy(job.document)
    changed = False
    for section, key in (("model", "uri"), ("dataset", "uri"), ("dataset", "evalUri"), ("checkpoint", "uri")):
        uri = doc["spec"][section].get(key)
        if uri and uri.startswith("file://") and not uri.startswith("file:///"):
            doc["spec"][section][key] = "file://" + os.path.abspath(uri[len("file://"):])
            changed = True
    return FineTuneJob.from_document(doc) if changed else job


def attempt_name() -> str:
    """The name of this attempt (in its checkpoints' names and its lease): UTC to the second
    and 24 random bits, so attempts started in the same second never collide."""
    return f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


def run_job(job: FineTuneJob, fresh: bool = False) -> int:
    """Run the job to completion on Ray Train; returns the process exit code.

    The run holds the lease on its checkpoint location (lease.py) from before Ray starts to
    the end, and removes what failed attempts left there (cleanup.py) before training."""
    from .cleanup import remove_unregistered_checkpoints
    from .lease import Lease

    job = with_absolute_file_uris(job)
    upload_mode = (os.environ.get(UPLOAD_MODE_ENV) or DEFAULT_UPLOAD_MODE).upper()
    if upload_mode not in ("SYNC", "ASYNC"):
        return fail(BadInputError.reason, f"{UPLOAD_MODE_ENV}={upload_mode!r}: expected SYNC or ASYNC", EXIT_BAD_INPUT)
    attempt = attempt_name()
    stopping.install()
    run_loc = None
    try:
        ckpt = preflight(job)
        run_loc = resolve(job.checkpoint_run_uri, S3Settings.from_spec(job.spec.s3))
        lease = Lease.acquire(run_loc, attempt)
    except TrainerError as exc:
        return fail(exc.reason, str(exc), exc.exit_code)
    except stopping.Stopped as stop:  # before training: nothing to shut down
        resume_from = stopping.resume_step(run_loc) if run_loc is not None else 0
        return stopped(stop, resume_from, resume_from)
    try:
        remove_unregistered_checkpoints(run_loc)
        # The lease thread interrupts the main thread (as SIGINT would) when another run took
        # the location over.
        lease.start_refreshing()
        return _train(job, fresh, upload_mode, ckpt, attempt)
    except (KeyboardInterrupt, stopping.Stopped) as stop:
        stopping.shield()
        if lease.lost:  # the lease thread interrupted us: another run holds the location now
            _shutdown_ray()
            return fail(TrainerError.reason, lease.lost, EXIT_TRAINING_FAILED)
        if isinstance(stop, KeyboardInterrupt):
            stop = stopping.Stopped(signal.SIGINT)
        _shutdown_ray()
        return stopped(stop, _step_watch.step, stopping.resume_step(run_loc))
    finally:
        lease.release()


def stopped(stop: stopping.Stopped, step: int, resume_from: int) -> int:
    """One line for people, one `failed` event (reason Stopped) for programs."""
    from finetune_api.status import Reason

    message = f"stopped at step {step}; rerun to resume from step {resume_from}"
    try:
        print(f"finetune-train: {message}", file=sys.stderr, flush=True)
        emit("failed", reason=Reason.STOPPED, message=message, signal=signal.Signals(stop.signum).name,
             step=step, resumeFromStep=resume_from)
    except BrokenPipeError:
        # `finetune run` was killed: nobody reads our output any more. Point it at /dev/null so
        # that the flushes at exit do not fail too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.dup2(devnull, sys.stderr.fileno())
    return stop.exit_code


def _shutdown_ray() -> None:
    """Ray's own shutdown: an embedded Ray stops its GCS, raylet, agents and workers; a joined
    cluster's driver disconnects, and the job's actors, which it owns, end with it."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _train(job: FineTuneJob, fresh: bool, upload_mode: str, ckpt: Location, attempt: str) -> int:
    import ray
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .worker_edge import train_worker

    try:
        _gpu_check(job)
    except TrainerError as exc:
        return fail(exc.reason, str(exc), exc.exit_code)
    try:
        _init_ray()
    except Exception as exc:  # Ray's start-up (an overloaded machine, an unreachable cluster)
        _shutdown_ray()
        where = os.environ.get("RAY_ADDRESS") or "this machine"
        return fail(TrainerError.reason, f"could not start or join Ray ({where}): {_one_line(exc)}",
                    EXIT_TRAINING_FAILED)
    stopping.take_back()

    res = job.spec.resources
    use_gpu = res.gpus_per_worker > 0
    per_worker = {"CPU": 1, "GPU": 1} if use_gpu else {"CPU": 1}
    env = {k: os.environ[k] for k in PASSED_ENV if os.environ.get(k)}
    trainer = _trainer_class(TorchTrainer, own_ray=not os.environ.get("RAY_ADDRESS"))(
        train_worker,
        train_loop_config={"job": job.document, "fresh": fresh, "upload_mode": upload_mode, "attempt": attempt},
        scaling_config=ScalingConfig(num_workers=res.training_processes, use_gpu=use_gpu,
                                     resources_per_worker=per_worker,
                                     # CPU: one process per worker pod, spread over the pods.
                                     # GPU: pack a pod's GPUs together (HYBRID_SHARD shards there).
                                     placement_strategy="PACK" if use_gpu else "SPREAD"),
        run_config=RunConfig(
            name=job.run_name,
            storage_path=ckpt.path,
            storage_filesystem=ckpt.filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=job.spec.checkpoint.keep),
            # Retries belong to the operator (runPolicy.backoffLimit), which reruns the job
            # and so resumes from the latest complete checkpoint.
            failure_config=FailureConfig(max_failures=0),
            worker_runtime_env={"env_vars": env} if env else None,
        ),
    )
    started = time.monotonic()
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray Train wraps the worker's exception
        stopping.fit_done()
        if stopping.requested() is not None:
            # The stop signal's exception, raised inside Ray's C code, can come out as another
            # (a SystemError "returned a result with an exception set"): still our stop.
            raise stopping.Stopped(stopping.requested()) from exc
        cause = _root_cause(exc)
        reason = getattr(cause, "reason", None) or TrainerError.reason
        code = getattr(cause, "exit_code", EXIT_TRAINING_FAILED)
        _drain_logs()
        where = {k: v for k in ("rank", "pid") if isinstance(v := getattr(cause, k, None), int)}
        if isinstance(cause, WorkerDiedError):
            return fail(reason, f"training failed: {cause}", code, **where)
        return fail(reason, f"training failed: {type(cause).__name__}: {_one_line(cause)}", code, **where)
    stopping.fit_done()
    _drain_logs()
    metrics = result.metrics or {}
    outputs = job.outputs
    curve = draw_loss_curve(job)
    extra = {"evalLoss": metrics["eval_loss"]} if metrics.get("eval_loss") is not None else {}
    if curve:
        extra["lossCurveUri"] = curve
    emit("completed", step=metrics.get("step"), loss=metrics.get("loss"), **outputs, **extra)
    wrote = "; ".join(f"{OUTPUT_WORDS[k]}: {v}" for k, v in outputs.items())
    print(f"finetune-train: done in {time.monotonic() - started:.0f}s; checkpoints: {job.checkpoint_run_uri}/ ; "
          f"{wrote}" + (f" ; loss curve: {curve}" if curve else ""), flush=True)
    return EXIT_OK


def _trainer_class(base, own_ray: bool):
    """The TorchTrainer with our stop handler (stopping.py); on a Ray of our own, also without
    Ray Train's PlacementGroupCleaner. That actor removes the run's placement group should the
    controller die without doing so, which matters on a shared cluster only: an embedded Ray
    dies with its driver. It watches the controller through the state API, which needs the
    dashboard (off here) and finds the cluster's address by searching the machine, so on one
    machine it printed a "Failed to query Ray Train Controller actor state" warning every few
    seconds, and a "Found multiple active Ray instances" traceback when another Ray ran there."""
    trainer_cls = stopping.stoppable_trainer(base)
    if not own_ray:
        return trainer_cls
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    class OneMachineTrainer(trainer_cls):
        def _create_default_callbacks(self):
            return [cb for cb in super()._create_default_callbacks()
                    if not isinstance(cb, PlacementGroupCleanerCallback)]

    OneMachineTrainer.__name__ = OneMachineTrainer.__qualname__ = base.__name__
    return OneMachineTrainer
def draw_loss_curve(job: FineTuneJob) -> str | None:
    """The run's loss curve PNG next to its checkpoints; its URI, or None (said) when it could
    not be drawn: the model is there, a missing picture must not fail the run."""
    from .loss_curve import render

    try:
        return render(resolve(job.checkpoint_run_uri, S3Settings.from_spec(job.spec.s3)), f"{job.name}: loss")
    except Exception as exc:
        print(f"finetune-train: warning: no loss curve: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return None


def _drain_logs() -> None:
    # Worker output reaches the driver through Ray's log monitor asynchronously; give the
    # last lines (final progress and checkpoint events) a moment to arrive before we print
    # the verdict and exit.
    time.sleep(1.5)
