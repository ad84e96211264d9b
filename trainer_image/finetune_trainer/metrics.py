"""Rank 0's training metrics, into the places people read them: a JSONL log, TensorBoard event
files and (when the job names a tracking server) MLflow.

The training loop calls `Metrics.log(step, values)` at one place per step; `values` is a dict of
plain numbers named in snake_case (`loss`, `learning_rate`, `tokens_per_second`, `grad_norm`,
and `eval_loss` whenever the loop has one). Every sink takes every key, so a metric added to
the loop (an eval loss, a new throughput figure) reaches all of them without touching this
module. Names in TensorBoard and MLflow: `eval_<x>` is `eval/<x>`, anything else `train/<key>`.

Where, next to the run's checkpoints (`<checkpoint.uri>/<job name>/`, see `layout`):
- `metrics/<attempt>.jsonl`: one file per attempt (S3 has no append), first line the attempt
  (`resumedFromStep`), then a line per step and per checkpoint. `loss_curve` reads them back.
- `tensorboard/`: one event file per attempt, written with `purge_step` = the attempt's first
  step, so a resumed attempt continues the same curve and hides what the crashed one logged
  past the checkpoint it resumes from.
- MLflow: one run per lineage of attempts. Its id is kept in the checkpoint's trainer state
  (`TrainerState.tracking`), so a resumed attempt logs to the same run and a `--fresh` one
  starts a new run.

On s3:// the files are written to a local directory and uploaded (the project's boto3 upload
with spec.s3's retries) at every checkpoint and at the end, and on the way out of a failed
attempt. A tracking server that stops answering mid-run costs the metrics, not the training:
it is said once, in words, and retried at the next flush.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from .progress import say
from .storage import Location, upload_dir

JSONL_DIR = "metrics"
TENSORBOARD_DIR = "tensorboard"
# MLflow metrics are sent in batches at most this often (and at checkpoints and the end): one
# request per step would cost a round trip per step on a far-away server.
MLFLOW_FLUSH_S = 5.0
MLFLOW_BATCH_MAX = 1000  # MLflow's own limit of metrics per log_batch request
# Tags on the MLflow run: programs (the operator, `finetune plot`) match on them.
TAG_JOB = "finetune.job"
TAG_MODEL_URI = "finetune.modelUri"
TAG_CHECKPOINTS = "finetune.checkpointUri"


def tag_of(key: str) -> str:
    """The TensorBoard tag and MLflow metric key of a metrics-dict key."""
    if key.startswith("eval_"):
        return f"eval/{key[len('eval_'):]}"
    return f"train/{key}"


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class Layout:
    """Where a run's metrics are, relative to its run location (<checkpoint.uri>/<job name>)."""

    run_uri: str

    @property
    def tensorboard_uri(self) -> str:
        return f"{self.run_uri}/{TENSORBOARD_DIR}"

    @property
    def metrics_uri(self) -> str:
        return f"{self.run_uri}/{JSONL_DIR}"


def flatten_params(spec: dict, prefix: str = "") -> dict[str, str]:
    """The spec as MLflow params (`training.learningRate` -> "0.01"). The tracking section is
    left out (where the metrics go is not a parameter of the training); raw dicts such as
    deepspeed.config become one JSON value."""
    out: dict[str, str] = {}
    for key, value in spec.items():
        name = f"{prefix}{key}"
        if not prefix and key == "tracking":
            continue
        if isinstance(value, dict) and key != "config" and value:
            out.update(flatten_params(value, f"{name}."))
        elif isinstance(value, (dict, list)):
            out[name] = json.dumps(value, sort_keys=True)[:6000]
        else:
            out[name] = str(value)[:6000]
    return out


class MlflowSink:
    """One MLflow run through `MlflowClient` (mlflow-skinny): params at creation, metrics in
    batches, the final model URI as a tag. Credentials come from the environment only
    (MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN, from the job's Secret)."""

    def __init__(self, job, run_id: str | None):
        from mlflow.tracking import MlflowClient

        cfg = job.spec.tracking.mlflow
        self.client = MlflowClient(tracking_uri=cfg.uri)
        self.uri = cfg.uri
        self.created = run_id is None
        if run_id is None:
            experiment = self.client.get_experiment_by_name(cfg.experiment)
            experiment_id = (experiment.experiment_id if experiment is not None
                             else self.client.create_experiment(cfg.experiment))
            run = self.client.create_run(experiment_id, run_name=job.name,
                                         tags={TAG_JOB: job.name, TAG_CHECKPOINTS: job.checkpoint_run_uri})
            self.run_id = run.info.run_id
            self.experiment_id = experiment_id
            from mlflow.entities import Param

            params = [Param(k, v) for k, v in flatten_params(job.document["spec"]).items()]
            for i in range(0, len(params), 100):  # MLflow's limit of params per request
                self.client.log_batch(self.run_id, params=params[i:i + 100])
        else:
            self.run_id = run_id
            self.experiment_id = self.client.get_run(run_id).info.experiment_id
            self.client.update_run(run_id, status="RUNNING")
        self._pending: list = []
        self._last_flush = time.monotonic()
        self._warned = False

    @property
    def run_url(self) -> str:
        return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"

    def log(self, step: int, values: dict[str, float], when_ms: int) -> None:
        from mlflow.entities import Metric

        self._pending += [Metric(tag_of(k), v, when_ms, step) for k, v in values.items()]
        if time.monotonic() - self._last_flush >= MLFLOW_FLUSH_S:
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        while self._pending:
            batch = self._pending[:MLFLOW_BATCH_MAX]
            try:
                self.client.log_batch(self.run_id, metrics=batch)
            except Exception as exc:  # the server's trouble must not end the training
                self._warn(exc)
                return
            del self._pending[:len(batch)]

    def close(self, status: str, model_uri: str | None) -> None:
        self.flush()
        try:
            if model_uri:
                self.client.set_tag(self.run_id, TAG_MODEL_URI, model_uri)
            self.client.set_terminated(self.run_id, status=status)
        except Exception as exc:
            self._warn(exc)

    def _warn(self, exc: BaseException) -> None:
        if not self._warned:
            self._warned = True
            text = " ".join(str(exc).split())[:300]
            say(f"finetune-train: warning: MLflow at {self.uri} did not take the metrics ({type(exc).__name__}: "
                f"{text}); training goes on, retrying at the next checkpoint")


class Metrics:
    """Rank 0's sinks for one attempt. `tracking` is the checkpoint's TrainerState.tracking
    (the MLflow run of the lineage, if any); `state()` is what the next checkpoint keeps."""

    def __init__(self, job, run_loc: Location, attempt: str, start_step: int, total_steps: int,
                 tracking: dict | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.job = job
        self.run_loc = run_loc
        self.layout = Layout(job.checkpoint_run_uri)
        self.attempt = attempt
        # file://: straight into the run folder (readable while it runs); s3://: a local copy
        # uploaded at checkpoints and at the end.
        self.staging = tempfile.mkdtemp(prefix="finetune-metrics-") if run_loc.scheme == "s3" else None
        self.root = self.staging or run_loc.path
        os.makedirs(os.path.join(self.root, JSONL_DIR), exist_ok=True)
        self.jsonl_path = os.path.join(self.root, JSONL_DIR, f"{attempt}.jsonl")
        self._jsonl = open(self.jsonl_path, "a")
        self._write({"kind": "attempt", "attempt": attempt, "resumedFromStep": start_step,
                     "totalSteps": total_steps, "time": round(time.time(), 3)})
        self.tb = SummaryWriter(os.path.join(self.root, TENSORBOARD_DIR), purge_step=start_step + 1,
                                filename_suffix=f".{attempt}", flush_secs=30)
        self.mlflow: MlflowSink | None = None
        if job.spec.tracking.mlflow is not None:
            self.mlflow = MlflowSink(job, (tracking or {}).get("mlflowRunId"))
        self.sync()

    def describe(self) -> dict[str, Any]:
        """Where this run's metrics are (the `tracking` event's fields)."""
        out: dict[str, Any] = {"tensorboardUri": self.layout.tensorboard_uri, "metricsUri": self.layout.metrics_uri}
        if self.mlflow is not None:
            out.update(mlflowRunId=self.mlflow.run_id, mlflowExperimentId=self.mlflow.experiment_id,
                       mlflowRunUrl=self.mlflow.run_url, mlflowRunCreated=self.mlflow.created)
        return out

    def state(self) -> dict:
        return {"mlflowRunId": self.mlflow.run_id} if self.mlflow is not None else {}

    def _write(self, record: dict) -> None:
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self._jsonl.flush()

    def log(self, step: int, values: dict[str, Any]) -> None:
        clean = {k: v for k, v in ((k, _finite(v)) for k, v in values.items()) if v is not None}
        now = time.time()
        self._write({"kind": "step", "step": step, "time": round(now, 3), **clean})
        for key, value in clean.items():
            self.tb.add_scalar(tag_of(key), value, step, walltime=now)
        if self.mlflow is not None:
            self.mlflow.log(step, clean, int(now * 1000))

    def checkpoint(self, step: int) -> None:
        self._write({"kind": "checkpoint", "step": step, "time": round(time.time(), 3)})
        self.sync()

    def sync(self) -> None:
        """Everything logged so far, in storage (and at the tracking server)."""
        self.tb.flush()
        if self.mlflow is not None:
            self.mlflow.flush()
        if self.staging is not None:
            upload_dir(self.staging, self.run_loc)

    def close(self, model_uri: str | None = None) -> None:
        """The end of the attempt: model_uri when it produced the final model, None when it
        failed (the MLflow run is marked FAILED; a resumed attempt sets it RUNNING again)."""
        self.tb.close()
        self._jsonl.close()
        if self.mlflow is not None:
            self.mlflow.close("FINISHED" if model_uri else "FAILED", model_uri)
        try:
            if self.staging is not None:
                upload_dir(self.staging, self.run_loc)
        finally:
            if self.staging is not None:
                shutil.rmtree(self.staging, ignore_errors=True)
