"""`Kube`: a running API emulator and the ways a test talks to it (HTTP client as an identity,
kubeconfig, kubectl, the recorder of calls), and `running_kube`, which starts one.

    with running_kube(tmp_path) as kube:
        kube.create(job_manifest, 'finetunejobs')       # through the HTTP API, as admin
        ...start the operator with kube.url / kube.client_for('operator') or a kubeconfig...
        cluster = kube.wait_for(lambda: kube.get_or_none('ray.io/v1', 'rayclusters', 'job-1', 'default'))
        assert kube.recorder.verbs_by_resource('operator')[('ray.io', 'rayclusters')] >= {'create'}
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from .client import KubeClient
from .emulator import EmulatorThread, KubeEmulator, Recorder, make_emulator, write_kubeconfig
from .ray_head import VENV_BIN

T = TypeVar('T')


@dataclasses.dataclass
class Kube:
    """A running emulator and ways to talk to it. The `client` methods (get, list, create, patch,
    replace, delete, request) are available directly on this object and act as `identity`."""
    url: str
    token: str
    identity: str
    kubeconfig: Path
    emulator: KubeEmulator
    runner: EmulatorThread
    client: KubeClient

    @property
    def recorder(self) -> Recorder:
        return self.emulator.recorder

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def add_identity(self, identity: str) -> str:
        """A new bearer token for `identity` (e.g. 'operator'), for a client to record separately."""
        return self.runner.call(self.emulator.add_token, identity)

    def client_for(self, identity: str) -> KubeClient:
        return KubeClient(self.url, self.add_identity(identity))

    def kubeconfig_for(self, identity: str, path: Path) -> Path:
        return write_kubeconfig(path, self.runner.https_url, self.add_identity(identity))

    def create_namespace(self, name: str) -> dict[str, Any]:
        return self.client.create({'apiVersion': 'v1', 'kind': 'Namespace', 'metadata': {'name': name}}, 'namespaces')

    def create_kopf_peering(self, name: str = 'default', namespace: str | None = None) -> dict[str, Any]:
        """The peering object a non-standalone kopf operator needs (cluster-wide by default)."""
        kind, plural = ('KopfPeering', 'kopfpeerings') if namespace else ('ClusterKopfPeering', 'clusterkopfpeerings')
        return self.client.create({'apiVersion': 'kopf.dev/v1', 'kind': kind, 'metadata': {'name': name}}, plural, namespace)

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """`kubectl` 1.37 from the venv, through this emulator's kubeconfig (HTTPS: client-go
        sends tokens only over TLS). The emulator publishes enough /openapi/v3 for kubectl to
        leave validation to the server (fieldValidation=Strict), so no `--validate=false`."""
        env = {**os.environ, 'KUBECONFIG': str(self.kubeconfig), 'HOME': str(self.kubeconfig.parent)}
        result = subprocess.run([str(VENV_BIN / 'kubectl'), *args], input=input, text=True,
                                capture_output=True, env=env, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f'kubectl {" ".join(args)} failed ({result.returncode}):\n{result.stderr}')
        return result

    def history(self, api_version: str, kind_or_plural: str) -> list[tuple[str, dict[str, Any]]]:
        """Every change to that resource type the server still remembers (see KubeEmulator.history)."""
        rtype = self.emulator.find_type(api_version, kind_or_plural)
        return self.runner.call(self.emulator.history, rtype)

    @staticmethod
    def wait_for(predicate: Callable[[], T], timeout: float = 10, interval: float = 0.05) -> T:
        """The first truthy value of predicate(), polled until timeout (then AssertionError)."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f'timed out after {timeout}s waiting for {predicate}')
            time.sleep(interval)


@contextlib.contextmanager
def running_kube(workdir: Path) -> Iterator[Kube]:
    """A fresh emulator serving built-ins, the FineTuneJob CRD and (when the reference copy
    exists) KubeRay's RayCluster CRD; identity 'admin' holds `token`. Its TLS files and
    kubeconfig go under `workdir`."""
    token = 'admin-' + os.urandom(8).hex()
    emulator = make_emulator({token: 'admin'})
    with EmulatorThread(emulator, tls_dir=workdir / 'tls') as runner:
        kubeconfig = write_kubeconfig(workdir / 'kubeconfig', runner.https_url, token)
        yield Kube(runner.url, token, 'admin', kubeconfig, emulator, runner, KubeClient(runner.url, token))
