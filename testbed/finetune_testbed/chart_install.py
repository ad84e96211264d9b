"""The chart's operator on the real control plane: its RBAC objects as Helm renders them
(tests/chart/render.py's chart, the real Helm SDK), and the operator process started with the
environment the rendered Deployment gives its container and the token of the rendered
ServiceAccount."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


from . import podshim
from .chart import chart
from .kubestack import KUBERNETES_SERVICE_IP, KubeStack, _die_with_parent
from .podnet import Sandbox
from .ports import free_port

RBAC_KINDS = ("ServiceAccount", "Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")


@dataclass
class Release:
    name: str
    namespace: str
    objects: list[dict[str, Any]]

    def of_kind(self, *kinds: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] in kinds]

    @property
    def service_account(self) -> str:
        return self.of_kind("ServiceAccount")[0]["metadata"]["name"]

    def container_env(self) -> dict[str, str]:
        """The operator container's env as the Deployment sets it (plain values; the
        downward-API POD_ID is filled in by `start_operator`)."""
        deployment = self.of_kind("Deployment")[0]
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def render_release(values: dict[str, Any], name: str, namespace: str) -> Release:
    rendered = chart().render(values, name=name, namespace=namespace)
    objects = []
    for path, text in sorted(rendered.items()):
        if path.endswith((".yaml", ".yml")):
            objects.extend(d for d in yaml.safe_load_all(text) if d)
    return Release(name, namespace, objects)


def install_rbac(stack: KubeStack, release: Release) -> None:
    namespaces = {release.namespace} | {o["metadata"]["namespace"]
                                        for o in release.of_kind(*RBAC_KINDS)
                                        if o["metadata"].get("namespace")}
    stack.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}}
                 for n in sorted(namespaces)])
    objs = []
    for o in release.of_kind(*RBAC_KINDS):
        o = {**o, "metadata": {**o["metadata"]}}
        if not o["kind"].startswith("Cluster"):
            # What `helm install --namespace` does with a template that names none.
            o["metadata"].setdefault("namespace", release.namespace)
        objs.append(o)
    stack.apply(objs)


@dataclass
class OperatorProcess:
    proc: subprocess.Popen
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_operator(stack: KubeStack, release: Release, token: str, *,
                   sandbox: Sandbox | None = None,
                   extra_env: dict[str, str] | None = None) -> OperatorProcess:
    """`finetune operator` as the chart's pod runs it, authenticated as its ServiceAccount.

    With `sandbox` (finetune_testbed.podnet) it runs in that network namespace with the
    sandbox's hosts file, as in a pod: it reaches the API server as in-cluster clients do, at
    the `kubernetes` Service's ClusterIP, and the Ray dashboards at what KubeRay publishes."""
    server = f"https://{KUBERNETES_SERVICE_IP}:443" if sandbox else None
    kubeconfig = stack.token_kubeconfig(f"operator-{release.name}", token, server=server)
    # Nor the test's S3 credentials: the chart's pod has none; the operator reads the job's
    # Secret.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KUBE", "FINETUNE_", "AWS_"))}
    env.update(release.container_env())
    env.update({
        "KUBECONFIG": str(kubeconfig),
        "POD_ID": f"{release.name}-operator-0",
        # Fixed container ports in a pod; free ports on a shared machine.
        "FINETUNE_OPERATOR_LIVENESS_PORT": str(free_port()),
        "FINETUNE_OPERATOR_METRICS_PORT": str(free_port()),
        "FINETUNE_OPERATOR_LOG_FORMAT": "text",
    })
    env.update(extra_env or {})
    finetune = Path(sys.executable).with_name("finetune")
    if sandbox is not None:
        workdir = stack.workdir / f"operator-{release.name}-{sandbox.name}"
        proc, _ = podshim.launch(
            netns=sandbox.netns_path, hostname=env["POD_ID"], argv=[str(finetune), "operator"],
            env=env, mounts=[[str(sandbox.hosts), "/etc/hosts"],
                             [str(sandbox.resolv), "/etc/resolv.conf"]], workdir=workdir)
        return OperatorProcess(proc, workdir / "log")
    log = stack.workdir / f"operator-{env['POD_ID']}.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([str(finetune), "operator"], env=env, stdout=fh,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent)
    return OperatorProcess(proc, log)
