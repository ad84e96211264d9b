"""The operator running in-process (kopf, its own thread and loop) against the API emulator.

The test bed (finetune_testbed, loaded by tests/conftest.py) provides the emulator (`kube`),
the KubeRay stand-in (`kuberay`), one real Ray head with token auth (`ray_head`) and moto S3;
`tests/conftest.py` provides the tiny model. These fixtures only add the operator and FineTuneJob documents on those assets.
"""

from __future__ import annotations

import asyncio
import base64
import os
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import kopf
import pytest

from finetune_testbed.ports import free_port
from finetune_testbed.ray_head import start_ray_head, stop_ray_head
from finetune_testbed import tiny_jobs

from finetune_operator.main import operator
from finetune_operator.settings import Settings

REPO = Path(__file__).resolve().parents[2]
NAMESPACE = "default"
S3_SECRET = "s3-credentials"


@pytest.fixture(scope="session")
def ray_head(s3_server):
    """One Ray head for the session, started after s3_server so that it (and the trainer it
    runs) inherits the moto credentials from the environment, as pods get them from the
    job's Secret in a cluster."""
    head = start_ray_head(timeout=300)
    try:
        yield head
    finally:
        stop_ray_head(head)


class OperatorThread:
    """`finetune_operator.main.operator` on a thread of its own, stoppable like SIGTERM."""

    def __init__(self, settings: Settings, connection: kopf.ConnectionInfo):
        self.settings, self.connection = settings, connection
        self.stop_flag = threading.Event()
        self.ready_flag = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="operator", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(operator(self.settings, connection=self.connection,
                                 stop_flag=self.stop_flag, ready_flag=self.ready_flag))
        except BaseException as e:  # surfaced by stop()
            self.error = e

    def start(self) -> "OperatorThread":
        self.thread.start()
        if not self.ready_flag.wait(30):
            raise RuntimeError(f"the operator did not start: {self.error!r}")
        return self

    def stop(self) -> None:
        self.stop_flag.set()
        self.thread.join(60)
        assert not self.thread.is_alive(), "the operator did not stop"
        if self.error is not None and not isinstance(self.error, asyncio.CancelledError):
            raise self.error

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.settings.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.read().decode()


@pytest.fixture
def start_operator(kube):
    """Start (and on teardown stop) operators; each call is a fresh process-like instance.
    Tests whose RayClusters must become ready ask for `kuberay` too."""
    started: list[OperatorThread] = []
    tokens: dict[str, str] = {}

    def start(identity: str = "operator", **overrides: Any) -> OperatorThread:
        if identity not in tokens:
            tokens[identity] = kube.add_identity(identity)
        token = tokens[identity]
        values = dict(namespaces=(NAMESPACE,), reconcile_interval=1.0, tracking_interval=1.0, max_backoff=4.0,
                      liveness_port=0, metrics_port=free_port(), log_format="plain",
                      trainer_env=(f"TORCH_EXTENSIONS_DIR={REPO / '.cache' / 'torch_extensions'}",
                                   "RAY_DEDUP_LOGS=0"))
        values.update(overrides)
        op = OperatorThread(Settings(**values),
                            kopf.ConnectionInfo(server=kube.url, token=token)).start()
        started.append(op)
        return op

    yield start
    for op in started:
        if op.thread.is_alive():
            op.stop()


@pytest.fixture
def s3_secret(kube, s3_server):
    def make(name: str = S3_SECRET) -> None:
        kube.create({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                     "metadata": {"name": name, "namespace": NAMESPACE},
                     "data": {k: base64.b64encode(os.environ[k].encode()).decode()
                              for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}},
                    "secrets")
    return make


@pytest.fixture
def tiny_job(s3_server, tiny_assets):
    """A FineTuneJob on the tiny model in moto S3: a few CPU steps, checkpoints in S3."""
    def make(name: str, **spec_overrides: Any) -> dict[str, Any]:
        own = {"resources": {"nodeSelector": {"pool": "cpu-small"}}, "s3": {"secretRef": S3_SECRET}}
        doc = tiny_jobs.tiny_job(name, model_uri=tiny_assets.model_uri, dataset_uri=tiny_assets.dataset_uri,
                                 bucket=s3_server.bucket, endpoint=s3_server.endpoint,
                                 namespace=NAMESPACE, spec=tiny_jobs.deep_update(own, spec_overrides),
                                 checkpoint_prefix="op")
        doc["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "team-queue"}
        return doc
    return make


def wait_until(predicate, timeout: float, interval: float = 0.5, what: Any = ""):
    """The first truthy predicate(); `what` (a string, or a callable evaluated at the
    timeout so it can show the state at that moment) explains a timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    explain = what() if callable(what) else what
    raise AssertionError(f"timed out after {timeout}s waiting for {explain or predicate}")
