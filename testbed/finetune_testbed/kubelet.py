"""A process kubelet: the pods bound to the node agent's nodes really run, as local processes.

`ProcessKubelet` is the node agent (finetune_testbed.nodes: the nodes' own identities, Ready,
Lease heartbeats) plus, per node, what a kubelet does with the pods bound to it:

* a sandbox per pod: its own network namespace on the harness's bridge, its address written
  into `status.podIP` (finetune_testbed.podnet);
* its init containers one after another, then its containers, each the container's
  `command` + `args` run by finetune_testbed.podshim as PID 1 of a PID, mount and UTS
  namespace of its own. The image is stood in for by the project's venv: the container sees
  a `/usr/local/bin` whose `python`, `ray`, `finetune-train`, ... run the venv's (a login
  shell's PATH keeps /usr/local/bin), its own `/tmp` (one Ray session dir per pod), the
  pod's hosts file and resolv.conf, and its volumes (emptyDir; medium Memory on /dev/shm);
* the environment a kubelet gives: `env` values with `$(VAR)` expansion, `valueFrom`
  secretKeyRef / configMapKeyRef (read from the API as the node, which the Node authorizer
  allows for a pod bound to it), fieldRef (metadata.name, .namespace, .uid, labels['k'],
  annotations['k'], spec.nodeName, spec.serviceAccountName, status.podIP, status.hostIP,
  status.podIPs) and resourceFieldRef (limits/requests cpu, memory, ephemeral-storage, with
  divisor), `envFrom`, HOSTNAME and the `kubernetes` Service's KUBERNETES_SERVICE_HOST/PORT;
  a missing Secret or key holds the container in `CreateContainerConfigError`;
* probes: startup, readiness and liveness, exec (run inside the container's namespaces with
  nsenter), httpGet (from the node to the pod's address, as the kubelet does) and tcpSocket,
  with their delays, periods, timeouts and thresholds; a failed liveness probe restarts the
  container;
* truthful status: phase, conditions (PodReadyToStartContainers, Initialized,
  ContainersReady, Ready), container states with exit code and reason (Completed, Error,
  OOMKilled), lastState and restartCount; restarts by `restartPolicy` with the kubelet's
  back-off (10 s doubling to 5 min, CrashLoopBackOff while waiting);
* deletion: SIGTERM to each container's PID 1, SIGKILL after the grace period (the kernel
  then ends the rest of the container), the sandbox removed, then the pod's deletion
  confirmed (grace 0, conditional on its uid).

`oom_kill(pod, container)` models the kernel's OOM killer (cgroup v2, memory.oom.group): the
container's PID 1 gets SIGKILL, so the whole container dies, and the kubelet reports exit
code 137, reason OOMKilled, as it reads from the runtime after a real one. There are no
cgroups here, so memory limits are not enforced; that is the only way OOMKilled appears.

Not modelled: image pulls, projected service-account token volumes, lifecycle hooks,
ephemeral containers, resource enforcement.
"""

from __future__ import annotations

import base64
import datetime
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import podshim
from .kubestack import KubeStack, StackError
from .nodes import NodeAgent
from .podnet import PodNetwork, Sandbox

VENV_BIN = Path(sys.executable).parent
BACKOFF_START, BACKOFF_MAX = 10.0, 300.0
TICK = 0.5


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class ConfigError(Exception):
    """The container's configuration cannot be made (a missing Secret, key, field)."""


# ---------------------------------------------------------------- quantities and env

_SUFFIX = {"n": 1e-9, "u": 1e-6, "m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
           "P": 1e15, "E": 1e18, "Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40,
           "Pi": 2 ** 50, "Ei": 2 ** 60}


def quantity(value: Any) -> float:
    m = re.fullmatch(r"([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([a-zA-Z]*)", str(value).strip())
    if not m or m.group(2) not in _SUFFIX:
        raise ConfigError(f"bad quantity {value!r}")
    return float(m.group(1)) * _SUFFIX[m.group(2)]


def _resource_field(pod: dict, ref: dict) -> str:
    container = next((c for c in pod["spec"]["containers"]
                      if c["name"] == ref.get("containerName")), None) \
        if ref.get("containerName") else None
    if container is None:
        raise ConfigError("resourceFieldRef needs the container it names")
    kind, _, res = ref["resource"].partition(".")
    resources = container.get("resources") or {}
    value = (resources.get(kind) or {}).get(res)
    if value is None and kind == "requests":
        value = (resources.get("limits") or {}).get(res)
    if value is None:
        # Unset limits read as the node's allocatable (the kubelet's rule).
        value = {"cpu": "16", "memory": "64Gi", "ephemeral-storage": "100Gi"}.get(res, "0")
    divisor = quantity(ref.get("divisor") or ("1" if res != "cpu" else "1"))
    # Rounded up to a whole multiple of the divisor, as the downward API does.
    return str(int(math.ceil(quantity(value) / divisor)))


def _field(pod: dict, path: str) -> str:
    meta, spec, status = pod["metadata"], pod["spec"], pod.get("status") or {}
    m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if m:
        return (meta.get(m.group(1)) or {}).get(m.group(2), "")
    simple = {"metadata.name": meta["name"], "metadata.namespace": meta["namespace"],
              "metadata.uid": meta["uid"], "spec.nodeName": spec.get("nodeName", ""),
              "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
              "status.podIP": status.get("podIP", ""), "status.hostIP": status.get("hostIP", ""),
              "status.podIPs": ",".join(i["ip"] for i in status.get("podIPs") or [])}
    if path not in simple:
        raise ConfigError(f"unsupported fieldRef {path}")
    return simple[path]


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: $$ escapes, unknown references stay as written."""
    return _VAR_REF.sub(lambda m: "$" if m.group(0) == "$$" else
                        env.get(m.group(1), m.group(0)), text)


# ---------------------------------------------------------------- one container

@dataclass
class Probe:
    spec: dict
    successes: int = 0
    failures: int = 0
    next_at: float = 0.0
    passed: bool = False


@dataclass
class ContainerRun:
    spec: dict
    init: bool = False
    proc: subprocess.Popen | None = None
    pid1: int | None = None
    started_at: str = ""
    started_mono: float = 0.0
    container_id: str = ""
    restarts: int = 0
    state: dict = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last: dict | None = None
    ready: bool = False
    started: bool = False
    restart_at: float = 0.0
    backoff: float = BACKOFF_START
    oom: bool = False
    done: bool = False          # terminated and not to be restarted
    probes: dict[str, Probe] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec["name"]

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class PodWorker(threading.Thread):
    """Runs one pod until it is deleted (or its node stops)."""

    def __init__(self, kubelet: "ProcessKubelet", pod: dict):
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.kubelet = kubelet
        self.pod = pod
        self.uid = meta["uid"]
        self.req = kubelet._as_node(pod["spec"]["nodeName"])
        self.sandbox: Sandbox | None = None
        self.init = [ContainerRun(c, init=True) for c in pod["spec"].get("initContainers", [])]
        self.main = [ContainerRun(c) for c in pod["spec"]["containers"]]
        self.start_time = _now()
        self.initialized = not self.init
        self.stopping = threading.Event()
        self.stopped = threading.Event()
        self.grace = float(pod["spec"].get("terminationGracePeriodSeconds", 30))
        self.lock = threading.Lock()
        self._last_status: str = ""
        self.errors: list[str] = []
        self.warnings: list[str] = []

    # -- life

    @property
    def restart_policy(self) -> str:
        return self.pod["spec"].get("restartPolicy", "Always")

    def run(self) -> None:
        try:
            meta = self.pod["metadata"]
            self.sandbox = self.kubelet.network.create_sandbox(meta["namespace"], meta["name"])
            self.pod.setdefault("status", {}).update(
                {"podIP": self.sandbox.ip, "hostIP": self.kubelet.network.gateway,
                 "podIPs": [{"ip": self.sandbox.ip}]})
            while not self.stopping.is_set():
                self.step()
                try:
                    self.report()
                except (StackError, OSError) as exc:
                    # As a kubelet does: log it and write the status again next time.
                    self.warnings.append(repr(exc))
                self.stopping.wait(TICK)
        except Exception as exc:  # the test reads kubelet.errors
            self.errors.append(f"{self.name}: {exc!r}")
            self.kubelet.errors.append(f"{self.name}: {exc!r}")
        finally:
            self.stopped.set()

    @property
    def name(self) -> str:
        return f"{self.pod['metadata']['namespace']}/{self.pod['metadata']['name']}"

    def step(self) -> None:
        now = time.monotonic()
        if not self.initialized:
            for c in self.init:
                if c.done:
                    continue
                self._drive(c, now)
                if not c.done:
                    return
                if c.state["terminated"]["exitCode"] != 0:
                    return  # restartPolicy Never: the pod failed (phase in _phase)
            self.initialized = True
        for c in self.main:
            if not c.done:
                self._drive(c, now)

    def _drive(self, c: ContainerRun, now: float) -> None:
        """Start, watch, probe and restart one container."""
        if c.proc is None:
            if now < c.restart_at:
                return
            self._start(c)
            return
        code = c.proc.poll()
        if code is None:
            self._probe(c, now)
            return
        # It ended.
        reason = "OOMKilled" if c.oom else ("Completed" if code == 0 else "Error")
        c.oom = False
        c.state = {"terminated": {"exitCode": code, "reason": reason,
                                  "startedAt": c.started_at, "finishedAt": _now(),
                                  "containerID": c.container_id}}
        c.proc, c.pid1, c.ready, c.started = None, None, False, False
        policy = self.restart_policy
        restart = policy == "Always" or (policy == "OnFailure" and code != 0)
        if c.init and code == 0:
            restart = False
        if self.stopping.is_set() or not restart:
            c.done = True
            return
        # The kubelet's back-off; it resets once a container ran 10 minutes.
        if now - c.started_mono > 600:
            c.backoff = BACKOFF_START
        c.last = c.state
        c.restart_at = now + c.backoff
        c.state = {"waiting": {"reason": "CrashLoopBackOff",
                               "message": f"back-off {int(c.backoff)}s restarting failed "
                                          f"container={c.name} pod={self.pod['metadata']['name']}"
                                          f"_{self.pod['metadata']['namespace']}"
                                          f"({self.uid})"}}
        c.backoff = min(c.backoff * 2, BACKOFF_MAX)
        c.restarts += 1

    def _start(self, c: ContainerRun) -> None:
        assert self.sandbox is not None
        try:
            env = self.kubelet.container_env(self.pod, c.spec, self.req)
        except ConfigError as exc:
            c.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}}
            c.restart_at = time.monotonic() + 2
            return
        argv = [expand(a, env) for a in (c.spec.get("command") or []) +
                (c.spec.get("args") or [])]
        if not argv:
            c.state = {"waiting": {"reason": "CreateContainerError",
                                   "message": "no command: the stand-in image has no "
                                              "entrypoint"}}
            c.done = True
            return
        c.container_id = f"kubestack://{uuid.uuid4().hex}"
        cdir = self.sandbox.dir / c.name
        tmp = self.sandbox.dir / "tmp"
        tmp.mkdir(exist_ok=True)
        tmp.chmod(0o1777)
        mounts = [[str(self.kubelet.image_bin), "/usr/local/bin"],
                  [str(self.sandbox.hosts), "/etc/hosts"],
                  [str(self.sandbox.resolv), "/etc/resolv.conf"]]
        mounts += self._volume_mounts(c.spec)
        # Last: the harness's own files (these sources) may live under the host's /tmp.
        mounts.append([str(tmp), "/tmp"])
        c.proc, c.pid1 = podshim.launch(
            netns=self.sandbox.netns_path, hostname=self.pod["metadata"]["name"],
            argv=argv, env=env, mounts=mounts, workdir=cdir,
            cwd=c.spec.get("workingDir") or "/")
        c.started_at, c.started_mono = _now(), time.monotonic()
        c.state = {"running": {"startedAt": c.started_at}}
        c.ready = False
        c.started = "startupProbe" not in c.spec
        c.probes = {kind: Probe(c.spec[kind], next_at=time.monotonic() + float(
            c.spec[kind].get("initialDelaySeconds", 0)))
            for kind in ("startupProbe", "readinessProbe", "livenessProbe") if kind in c.spec}
        if not c.init and "readinessProbe" not in c.spec and c.started:
            c.ready = True

    def _volume_mounts(self, spec: dict) -> list[list[str]]:
        assert self.sandbox is not None
        volumes = {v["name"]: v for v in self.pod["spec"].get("volumes", [])}
        mounts = []
        for vm in spec.get("volumeMounts", []):
            vol = volumes.get(vm["name"], {})
            if "emptyDir" in vol:
                if (vol["emptyDir"] or {}).get("medium") == "Memory":
                    src = self.kubelet.network.memory_volume(self.sandbox, vm["name"])
                else:
                    src = self.sandbox.dir / "volumes" / vm["name"]
                    src.mkdir(parents=True, exist_ok=True)
                mounts.append([str(src), vm["mountPath"]])
            # Other volume kinds (projected tokens, Secrets, ConfigMaps) are not modelled.
        return mounts

    # -- probes

    def _probe(self, c: ContainerRun, now: float) -> None:
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = c.probes.get(kind)
            if probe is None or now < probe.next_at:
                continue
            if kind != "startupProbe" and not c.started:
                continue
            if kind == "startupProbe" and c.started:
                continue
            spec = probe.spec
            probe.next_at = now + float(spec.get("periodSeconds", 10))
            ok = self._run_probe(c, spec)
            if ok:
                probe.successes, probe.failures = probe.successes + 1, 0
            else:
                probe.failures, probe.successes = probe.failures + 1, 0
            success_needed = int(spec.get("successThreshold", 1))
            failure_limit = int(spec.get("failureThreshold", 3))
            if kind == "startupProbe":
                if probe.successes >= 1:
                    c.started = True
                    if "readinessProbe" not in c.spec:
                        c.ready = True
                elif probe.failures >= failure_limit:
                    self._kill(c, graceful=True)
            elif kind == "readinessProbe":
                if probe.successes >= success_needed:
                    c.ready = True
                elif probe.failures >= failure_limit:
                    c.ready = False
            elif kind == "livenessProbe" and probe.failures >= failure_limit:
                self._kill(c, graceful=True)

    def _run_probe(self, c: ContainerRun, spec: dict) -> bool:
        timeout = float(spec.get("timeoutSeconds", 1))
        if "exec" in spec:
            if c.pid1 is None:
                return False
            cmd = ["nsenter", "--target", str(c.pid1), "--net", "--mount", "--uts", "--pid",
                   "--", *spec["exec"]["command"]]
            try:
                out = subprocess.run(cmd, capture_output=True, timeout=timeout,
                                     env=self._probe_env(c))
            except subprocess.TimeoutExpired:
                return False
            return out.returncode == 0
        assert self.sandbox is not None
        if "httpGet" in spec:
            get = spec["httpGet"]
            port = self._port(c, get["port"])
            host = get.get("host") or self.sandbox.ip
            scheme = get.get("scheme", "HTTP").lower()
            try:
                req = urllib.request.Request(
                    f"{scheme}://{host}:{port}{get.get('path', '/')}",
                    headers={h["name"]: h["value"] for h in get.get("httpHeaders", [])})
                with urllib.request.urlopen(req, timeout=timeout) as resp:
                    return 200 <= resp.status < 400
            except urllib.error.HTTPError as err:
                return 200 <= err.code < 400
            except OSError:
                return False
        if "tcpSocket" in spec:
            import socket
            port = self._port(c, spec["tcpSocket"]["port"])
            try:
                socket.create_connection((self.sandbox.ip, port), timeout=timeout).close()
                return True
            except OSError:
                return False
        return False

    def _probe_env(self, c: ContainerRun) -> dict[str, str]:
        # An exec probe runs with the container's environment (the runtime's exec does).
        try:
            return self.kubelet.container_env(self.pod, c.spec, self.req)
        except ConfigError:
            return {"PATH": "/usr/local/bin:/usr/bin:/bin"}

    @staticmethod
    def _port(c: ContainerRun, port: Any) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for p in c.spec.get("ports", []):
            if p.get("name") == port:
                return int(p["containerPort"])
        raise ConfigError(f"no container port named {port}")

    # -- signals

    def _kill(self, c: ContainerRun, graceful: bool) -> None:
        """Stop one container: SIGTERM (the shim forwards it to PID 1), SIGKILL after the
        grace period. The container is restarted by the loop per restartPolicy."""
        if not c.running():
            return
        if graceful:
            c.proc.send_signal(signal.SIGTERM)
            try:
                c.proc.wait(timeout=self.grace)
                return
            except subprocess.TimeoutExpired:
                pass
        if c.pid1:
            try:
                os.kill(c.pid1, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            c.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            c.proc.kill()
            c.proc.wait()

    def oom_kill(self, container: str) -> None:
        with self.lock:
            c = next(c for c in self.main if c.name == container)
            c.oom = True
            if c.pid1:
                os.kill(c.pid1, signal.SIGKILL)

    def terminate(self, grace: float) -> None:
        """The pod was deleted: every container gets SIGTERM, then SIGKILL after `grace`."""
        self.stopping.set()
        self.stopped.wait(timeout=30)
        running = [c for c in self.init + self.main if c.running()]
        for c in running:
            c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for c in running:
            try:
                c.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for c in running:
            if c.running():
                self._kill(c, graceful=False)
        if self.sandbox:
            self.kubelet.network.delete_sandbox(self.sandbox.name)

    # -- status

    def _phase(self) -> str:
        if any(c.done and c.state.get("terminated", {}).get("exitCode") for c in self.init):
            return "Failed"
        if not self.initialized or not any(c.container_id for c in self.main):
            return "Pending"
        if all(c.done for c in self.main):
            if all(c.state.get("terminated", {}).get("exitCode") == 0 for c in self.main):
                return "Succeeded"
            return "Failed"
        return "Running"

    def _container_status(self, c: ContainerRun) -> dict:
        status = {"name": c.name, "image": c.spec.get("image", ""),
                  "imageID": f"kubestack://{c.spec.get('image', '')}",
                  "ready": c.ready if not c.init else bool(c.done and not c.state.get(
                      "terminated", {}).get("exitCode")),
                  "restartCount": c.restarts, "state": c.state,
                  "started": c.running() and c.started}
        if c.container_id:
            status["containerID"] = c.container_id
        if c.last:
            status["lastState"] = c.last
        return status

    def report(self) -> None:
        phase = self._phase()
        ready = self.initialized and all(c.ready and c.running() for c in self.main)
        terminal = phase in ("Succeeded", "Failed")

        def cond(kind: str, ok: bool, reason: str = "") -> dict:
            c = {"type": kind, "status": "True" if ok else "False"}
            if not ok and reason:
                c["reason"] = reason
            return c
        conditions = [cond("PodReadyToStartContainers", self.sandbox is not None and
                           not terminal),
                      cond("Initialized", self.initialized, "ContainersNotInitialized"),
                      cond("ContainersReady", ready, "PodCompleted" if terminal
                           else "ContainersNotReady"),
                      cond("Ready", ready, "PodCompleted" if terminal else "ContainersNotReady")]
        status = {"phase": phase, "startTime": self.start_time,
                  "hostIP": self.kubelet.network.gateway,
                  "hostIPs": [{"ip": self.kubelet.network.gateway}],
                  "podIP": self.sandbox.ip if self.sandbox else None,
                  "podIPs": [{"ip": self.sandbox.ip}] if self.sandbox else [],
                  "conditions": conditions,
                  "containerStatuses": [self._container_status(c) for c in self.main]}
        if self.init:
            status["initContainerStatuses"] = [self._container_status(c) for c in self.init]
        key = json.dumps(status, sort_keys=True)
        if key == self._last_status:
            return
        # Transition times only on a change of a condition's status, as the kubelet writes.
        previous = {c["type"]: c for c in (self.pod.get("status") or {}).get("conditions", [])}
        for c in conditions:
            old = previous.get(c["type"])
            c["lastTransitionTime"] = old.get("lastTransitionTime") if old and \
                old.get("status") == c["status"] and old.get("lastTransitionTime") else _now()
        meta = self.pod["metadata"]
        code, body = self.req(
            "PATCH", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status",
            {"metadata": {"uid": self.uid}, "status": status},
            content_type="application/strategic-merge-patch+json")
        if code == 200:
            self._last_status = key
            self.pod["status"] = body.get("status", status)
        elif code == 404:
            self.stopping.set()
        else:
            raise StackError(f"status of {self.name}: {code} {body.get('message')}")


# ---------------------------------------------------------------- the kubelet

class ProcessKubelet(NodeAgent):
    """The node agent whose nodes run their pods (see the module's docstring)."""

    def __init__(self, stack: KubeStack, network: PodNetwork, image_bin: Path | None = None):
        super().__init__(stack)
        self.network = network
        self.workers: dict[str, PodWorker] = {}
        self._deleting: set[str] = set()
        self.node_ip = network.gateway
        self.image_bin = image_bin or self._make_image_bin(stack.workdir / "image-bin")
        self.service_host = ""

    @staticmethod
    def _make_image_bin(path: Path) -> Path:
        """The stand-in image's /usr/local/bin: each venv executable, run from the venv."""
        path.mkdir(parents=True, exist_ok=True)
        for exe in VENV_BIN.iterdir():
            if exe.name.startswith(("activate", "Activate")) or not os.access(exe, os.X_OK) \
                    or exe.is_dir():
                continue
            wrapper = path / exe.name
            wrapper.write_text(f"#!/bin/sh\nexec {exe} \"$@\"\n")
            wrapper.chmod(0o755)
        return path

    # -- env

    def container_env(self, pod: dict, spec: dict, req) -> dict[str, str]:
        ns = pod["metadata"]["namespace"]
        env: dict[str, str] = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:"
                                       "/sbin:/bin",
                               "HOSTNAME": pod["metadata"]["name"][:63],
                               # The stand-in image's home: the container's own /tmp, not
                               # the host's /root (whose profile edits PATH).
                               "HOME": "/tmp"}
        if self.service_host:
            env.update({"KUBERNETES_SERVICE_HOST": self.service_host,
                        "KUBERNETES_SERVICE_PORT": "443",
                        "KUBERNETES_SERVICE_PORT_HTTPS": "443"})
        for src in spec.get("envFrom", []):
            prefix = src.get("prefix", "")
            if "secretRef" in src:
                data = self._object(req, ns, "secrets", src["secretRef"]["name"],
                                    src["secretRef"].get("optional", False))
                env.update({prefix + k: base64.b64decode(v).decode()
                            for k, v in (data.get("data") or {}).items()})
            if "configMapRef" in src:
                data = self._object(req, ns, "configmaps", src["configMapRef"]["name"],
                                    src["configMapRef"].get("optional", False))
                env.update({prefix + k: v for k, v in (data.get("data") or {}).items()})
        for var in spec.get("env", []):
            if "valueFrom" not in var:
                env[var["name"]] = expand(var.get("value", ""), env)
                continue
            source = var["valueFrom"]
            if "secretKeyRef" in source or "configMapKeyRef" in source:
                secret = "secretKeyRef" in source
                ref = source["secretKeyRef" if secret else "configMapKeyRef"]
                obj = self._object(req, ns, "secrets" if secret else "configmaps",
                                   ref["name"], ref.get("optional", False))
                values = obj.get("data") or {}
                if ref["key"] not in values:
                    if ref.get("optional"):
                        continue
                    raise ConfigError(f"couldn't find key {ref['key']} in "
                                      f"{'Secret' if secret else 'ConfigMap'} {ns}/{ref['name']}")
                value = values[ref["key"]]
                env[var["name"]] = base64.b64decode(value).decode() if secret else value
            elif "fieldRef" in source:
                env[var["name"]] = _field(pod, source["fieldRef"]["fieldPath"])
            elif "resourceFieldRef" in source:
                ref = dict(source["resourceFieldRef"])
                ref.setdefault("containerName", spec["name"])
                env[var["name"]] = _resource_field(pod, ref)
        return env

    @staticmethod
    def _object(req, ns: str, kind: str, name: str, optional: bool) -> dict:
        code, body = req("GET", f"/api/v1/namespaces/{ns}/{kind}/{name}")
        if code == 200:
            return body
        if code == 404 and optional:
            return {}
        label = "secret" if kind == "secrets" else "configmap"
        raise ConfigError(f'{label} "{name}" not found' if code == 404 else
                          f"reading {label} {name}: {code} {body.get('message')}")

    # -- pods

    def _finish_deletions(self, name: str, req) -> None:
        """Called each second per node (NodeAgent._run): start new pods, stop deleted ones."""
        status, body = req("GET", f"/api/v1/pods?fieldSelector=spec.nodeName%3D{name}")
        if status != 200:
            raise StackError(f"node {name} listing its pods: {status} {body.get('message')}")
        seen = set()
        for pod in body.get("items", []):
            meta = pod["metadata"]
            uid = meta["uid"]
            seen.add(uid)
            worker = self.workers.get(uid)
            if meta.get("deletionTimestamp"):
                if uid in self._deleting:
                    continue
                if worker is None:
                    self._confirm_deletion(req, meta)
                    continue
                self._deleting.add(uid)
                grace = float(meta.get("deletionGracePeriodSeconds",
                                       pod["spec"].get("terminationGracePeriodSeconds", 30)))
                threading.Thread(target=self._delete, args=(worker, grace, req, meta),
                                 daemon=True, name=f"delete-{meta['name']}").start()
                continue
            if worker is None and (pod.get("status") or {}).get("phase") not in (
                    "Succeeded", "Failed"):
                worker = PodWorker(self, pod)
                self.workers[uid] = worker
                worker.start()
        for uid, worker in list(self.workers.items()):
            if worker.pod["spec"]["nodeName"] == name and uid not in seen:
                # Force-deleted (grace 0) or gone with its node: stop it at once.
                self.workers.pop(uid)
                if not worker.stopping.is_set():
                    threading.Thread(target=worker.terminate, args=(0,), daemon=True).start()

    def _delete(self, worker: PodWorker, grace: float, req, meta: dict) -> None:
        try:
            worker.terminate(grace)
        finally:
            self.workers.pop(meta["uid"], None)
            self._confirm_deletion(req, meta)
            self._deleting.discard(meta["uid"])

    @staticmethod
    def _confirm_deletion(req, meta: dict) -> None:
        req("DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
            {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0,
             "preconditions": {"uid": meta["uid"]}})

    def worker(self, namespace: str, name: str) -> PodWorker:
        for w in list(self.workers.values()):
            meta = w.pod["metadata"]
            if (meta["namespace"], meta["name"]) == (namespace, name):
                return w
        raise KeyError(f"no pod {namespace}/{name} runs on this kubelet")

    def oom_kill(self, namespace: str, name: str, container: str) -> None:
        self.worker(namespace, name).oom_kill(container)

    def stop(self) -> None:
        super().stop()
        workers = list(self.workers.values())
        self.workers.clear()
        threads = [threading.Thread(target=w.terminate, args=(0,)) for w in workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
