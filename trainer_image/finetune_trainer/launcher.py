"""Driver side: preflight, Ray init/join, the TorchTrainer run, events and exit codes.

`run_job(job, fresh=False) -> int` is what `finetune-train` and `finetune run` call.
"""

from __future__ import annotations

import copy
import os
import secrets
import sys
import time

# Every worker's progress line must reach the driver log, even identical-looking ones; the
# log deduplicator reads this when ray is imported/initialised, so set it before.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

from finetune_api.model import FineTuneJob  # noqa: E402

from .errors import (EXIT_BAD_INPUT, EXIT_OK, EXIT_TRAINING_FAILED, BadInputError,  # noqa: E402
                     TrainerError)
from .progress import emit  # noqa: E402
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


def fail(reason: str, message: str, code: int) -> int:
    """One clear line for people, one `failed` event for programs; no traceback."""
    print(f"finetune-train: error: {message}", file=sys.stderr, flush=True)
    emit("failed", reason=reason, message=message)
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
    from .data import check_dataset
    from .model_io import check_model

    spec = job.spec
    settings = S3Settings.from_spec(spec.s3)
    ckpt = resolve(spec.checkpoint.uri, settings)
    check_bucket(ckpt)
    check_model(spec.model.uri, spec.model.revision, settings)
    data = resolve(spec.dataset.uri, settings)
    check_bucket(data)
    check_dataset(data, spec.dataset.format, spec.dataset.text_field)
    if spec.training.precision == "fp16" and spec.resources.gpus_per_worker == 0:
        raise BadInputError("precision fp16 needs GPUs (DeepSpeed and FSDP have no fp16 on CPU); use bf16 or fp32")
    if ckpt.scheme == "file":
        try:
            os.makedirs(ckpt.path, exist_ok=True)
        except OSError as exc:
            raise BadInputError(f"cannot create checkpoint directory {ckpt.path}: {exc.strerror}") from None
    return ckpt


def _init_ray() -> None:
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        # Inside a Ray job on the cluster (or joining one): the driver reserves no CPU.
        ray.init(address=address, log_to_driver=True)
    else:
        # A one-machine run: no dashboard (it costs a CPU core's worth of start-up).
        ray.init(log_to_driver=True, include_dashboard=False)


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
    """The worker's own exception inside Ray Train's wrappers."""
    failures = getattr(exc, "worker_failures", None)
    if failures:
        first = failures[min(failures)]
        return _root_cause(first)
    cause = getattr(exc, "cause", None) or getattr(exc, "controller_failure", None)
    if isinstance(cause, BaseException) and cause is not exc:
        return _root_cause(cause)
    return exc


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
    for section in ("model", "dataset", "checkpoint"):
        uri = doc["spec"][section]["uri"]
        if uri.startswith("file://") and not uri.startswith("file:///"):
            doc["spec"][section]["uri"] = "file://" + os.path.abspath(uri[len("file://"):])
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
    try:
        ckpt = preflight(job)
        run_loc = resolve(job.checkpoint_run_uri, S3Settings.from_spec(job.spec.s3))
        lease = Lease.acquire(run_loc, attempt)
    except TrainerError as exc:
        return fail(exc.reason, str(exc), exc.exit_code)
    try:
        remove_unregistered_checkpoints(run_loc)
        lease.start_refreshing()
        return _train(job, fresh, upload_mode, ckpt, attempt)
    except KeyboardInterrupt:
        if lease.lost:  # the lease thread interrupted us: another run holds the location now
            return fail(TrainerError.reason, lease.lost, EXIT_TRAINING_FAILED)
        raise
    finally:
        lease.release()


def _train(job: FineTuneJob, fresh: bool, upload_mode: str, ckpt: Location, attempt: str) -> int:
    import ray
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .worker_edge import train_worker

    try:
        _gpu_check(job)
        _init_ray()
    except TrainerError as exc:
        return fail(exc.reason, str(exc), exc.exit_code)

    res = job.spec.resources
    use_gpu = res.gpus_per_worker > 0
    per_worker = {"CPU": 1, "GPU": 1} if use_gpu else {"CPU": 1}
    env = {k: os.environ[k] for k in PASSED_ENV if os.environ.get(k)}
    trainer = TorchTrainer(
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
        cause = _root_cause(exc)
        reason = getattr(cause, "reason", None) or TrainerError.reason
        code = getattr(cause, "exit_code", EXIT_TRAINING_FAILED)
        _drain_logs()
        return fail(reason, f"training failed: {type(cause).__name__}: {_one_line(cause)}", code)
    _drain_logs()
    metrics = result.metrics or {}
    outputs = job.outputs
    emit("completed", step=metrics.get("step"), loss=metrics.get("loss"), **outputs)
    wrote = "; ".join(f"{OUTPUT_WORDS[k]}: {v}" for k, v in outputs.items())
    print(f"finetune-train: done in {time.monotonic() - started:.0f}s; checkpoints: {job.checkpoint_run_uri}/ ; "
          f"{wrote}", flush=True)
    return EXIT_OK


def _drain_logs() -> None:
    # Worker output reaches the driver through Ray's log monitor asynchronously; give the
    # last lines (final progress and checkpoint events) a moment to arrive before we print
    # the verdict and exit.
    time.sleep(1.5)
