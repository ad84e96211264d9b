"""The operator as the chart deploys it, running jobs on real pods: what the real-pods tests
share. The chart's RBAC and ServiceAccount token, a network namespace on the pod network, and
the job's namespace with its S3 Secret (the pods get the keys only through secretKeyRef)."""

from __future__ import annotations

import base64
import contextlib
import os
import re
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator

from finetune_testbed.chart_install import OperatorProcess, install_rbac, render_release, start_operator
from finetune_testbed.rbac import TOLERATED_DENIALS
from finetune_testbed.tiny_jobs import deep_update, tiny_job
from .conftest import PROCESS_POOL

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TORCH_EXTENSIONS = os.environ.get("TORCH_EXTENSIONS_DIR",
                                  os.path.join(REPO, ".cache", "torch_extensions"))
S3_SECRET = "s3-credentials"


@dataclass
class OnPods:
    ns: str
    operator: OperatorProcess
    start: Callable[[], OperatorProcess]
    restarts: int = 0

    def crash_operator(self) -> None:
        """SIGKILL the operator, as a node loss or an OOM kill would, and start a new one in
        the same sandbox with the same token (its log goes on in the same file)."""
        self.operator.proc.kill()
        self.operator.proc.wait()
        self.operator = self.start()
        self.restarts += 1

    def job(self, name: str, s3_server, tiny_assets, spec: dict | None = None) -> dict:
        """The tiny job on the process kubelet's pool, its S3 keys from the namespace's Secret."""
        own = {"resources": {"nodeSelector": {"finetune.dev/pool": PROCESS_POOL}},
               "s3": {"secretRef": S3_SECRET}}
        return tiny_job(name, model_uri=tiny_assets.model_uri, dataset_uri=tiny_assets.dataset_uri,
                        bucket=s3_server.bucket, endpoint=s3_server.endpoint, namespace=self.ns,
                        spec=deep_update(own, spec or {}), checkpoint_prefix="pods")

    def forbidden(self) -> list[str]:
        """The operator's 403s beyond the denials the chart documents for namespaced mode."""
        tolerated = {resource for (_, _, resource) in TOLERATED_DENIALS}
        return [line for line in self.operator.text().splitlines()
                if re.search(r"\b(403|Forbidden|forbidden)\b", line)
                and not any(r in line for r in tolerated)]


def metrics_attempts(s3_server, run_prefix: str) -> list:
    """Each attempt's metrics log (metrics/<attempt>.jsonl) as the loss curve reads it, in the
    order of their resume steps."""
    from finetune_trainer.loss_curve import parse_attempt

    out = []
    for key in s3_server.keys(f"{run_prefix}/metrics/"):
        if key.endswith(".jsonl"):
            body = s3_server.client.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read()
            out.append(parse_attempt(key.rsplit("/", 1)[1][:-len(".jsonl")], body.decode()))
    return sorted(out, key=lambda a: a.resumed_from)


def s3_secret(ns: str) -> dict:
    """The job namespace's S3 Secret, with the test's moto keys."""
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": S3_SECRET, "namespace": ns},
            "data": {k: base64.b64encode(os.environ[k].encode()).decode()
                     for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}}


@contextlib.contextmanager
def operator_on_pods(kubestack, kubelet, prefix: str, with_secret: bool = True) -> Iterator[OnPods]:
    suffix = uuid.uuid4().hex[:5]
    ns = f"{prefix}-{suffix}"
    release = render_release({"rbac": {"mode": "namespaced"}, "watchNamespaces": [ns]},
                             name=f"ft{suffix}", namespace=f"ft-system-{suffix}")
    install_rbac(kubestack, release)
    kubestack.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    if with_secret:
        kubestack.apply(s3_secret(ns))
    token = kubestack.service_account_token(release.namespace, release.service_account)
    sandbox = kubelet.network.create_sandbox(release.namespace, f"{release.name}-operator")

    def start() -> OperatorProcess:
        return start_operator(kubestack, release, token, sandbox=sandbox, extra_env={
            "FINETUNE_OPERATOR_RECONCILE_INTERVAL": "2",
            "FINETUNE_OPERATOR_TRACKING_INTERVAL": "2",
            # DeepSpeed's CPU ops are compiled once per machine; the pods share the build.
            "FINETUNE_OPERATOR_TRAINER_ENV":
                f"TORCH_EXTENSIONS_DIR={TORCH_EXTENSIONS};RAY_DEDUP_LOGS=0"})
    env = OnPods(ns, start(), start)
    try:
        yield env
    finally:
        env.operator.stop()
        kubelet.network.delete_sandbox(sandbox.name)
