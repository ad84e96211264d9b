"""The process kubelet's own logic (finetune_testbed.kubelet), without a control plane: the
environment it gives a container, and one pod's containers run for real in a sandbox of the
pod network (root only), with what it would write into the pod's status recorded."""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path

import pytest

from finetune_testbed.kubelet import ConfigError, PodWorker, ProcessKubelet, expand
from finetune_testbed.podnet import PodNetwork

SECRET = {"data": {"key": base64.b64encode(b"s3cr3t").decode()}}


def _pod(containers, init=(), restart="Never", **spec):
    return {"metadata": {"name": "p-0", "namespace": "ns", "uid": "u-1",
                         "labels": {"ray.io/group": "workers"}},
            "spec": {"nodeName": "n", "restartPolicy": restart, "containers": list(containers),
                     "initContainers": list(init), **spec},
            "status": {"podIP": "10.244.0.9", "hostIP": "10.244.0.1"}}


class FakeApi:
    """What the node reads and writes: one Secret; the pod status patches are kept."""

    def __init__(self):
        self.patches: list[dict] = []

    def __call__(self, method, path, body=None, content_type=None):
        if method == "GET":
            return (200, SECRET) if path.endswith("/secrets/creds") else (404, {"message": "nf"})
        self.patches.append(body["status"])
        return 200, {"status": body["status"]}


def test_the_environment_a_kubelet_gives():
    kubelet = ProcessKubelet.__new__(ProcessKubelet)
    kubelet.service_host = "10.0.0.1"
    container = {"name": "c", "resources": {"limits": {"cpu": "1500m", "memory": "2Gi"}},
                 "env": [
                     {"name": "A", "value": "a"},
                     {"name": "B", "value": "$(A)-b-$$(A)-$(NOPE)"},
                     {"name": "S", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "key"}}},
                     {"name": "O", "valueFrom": {"secretKeyRef": {"name": "gone", "key": "k",
                                                                  "optional": True}}},
                     {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                     {"name": "G", "valueFrom": {"fieldRef": {
                         "fieldPath": "metadata.labels['ray.io/group']"}}},
                     {"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
                     {"name": "MEM", "valueFrom": {"resourceFieldRef": {
                         "resource": "limits.memory", "divisor": "1Mi"}}}]}
    pod = _pod([container])
    env = kubelet.container_env(pod, container, FakeApi())
    assert env["B"] == "a-b-$(A)-$(NOPE)"
    assert env["S"] == "s3cr3t" and "O" not in env
    assert (env["IP"], env["G"], env["CPU"], env["MEM"]) == ("10.244.0.9", "workers", "2", "2048")
    assert env["KUBERNETES_SERVICE_HOST"] == "10.0.0.1" and env["HOSTNAME"] == "p-0"
    missing = {"name": "c", "env": [{"name": "X", "valueFrom": {"secretKeyRef": {
        "name": "creds", "key": "other"}}}]}
    with pytest.raises(ConfigError, match="couldn't find key other in Secret ns/creds"):
        kubelet.container_env(pod, missing, FakeApi())
    assert expand("$(A)$(A)", {"A": "x"}) == "xx"


@pytest.fixture
def network(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the pod network needs root (ip netns, ip link)")
    net = PodNetwork(tmp_path).start()
    yield net
    net.stop()


def _run(network, tmp_path, pod):
    kubelet = ProcessKubelet.__new__(ProcessKubelet)
    kubelet.network, kubelet.service_host, kubelet.errors = network, "", []
    kubelet.image_bin = ProcessKubelet._make_image_bin(tmp_path / "img")
    api = FakeApi()
    kubelet._as_node = lambda node: api
    worker = PodWorker(kubelet, pod)
    worker.start()
    return worker, api


def _wait(what, probe, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_pod_runs_in_its_sandbox(network, tmp_path):
    """Init container first; the main containers in the pod's own netns, hostname and /tmp;
    an exec readiness probe in the container; the OOM kill (exit 137, OOMKilled, restarted
    by restartPolicy Always); deletion ends every process of the container."""
    init = {"name": "init", "command": ["sh", "-c", "echo done > /tmp/init-ran"]}
    main = {"name": "main", "command": ["sh", "-c", "hostname > /tmp/host; sleep 1000 & wait"],
            "readinessProbe": {"exec": {"command": ["test", "-f", "/tmp/ready"]},
                               "periodSeconds": 1}}
    worker, api = _run(network, tmp_path, _pod([main], init=[init], restart="Always"))
    try:
        _wait("the main container", lambda: worker.main[0].running())
        tmp = worker.sandbox.dir / "tmp"
        _wait("the init container's file", lambda: (tmp / "init-ran").exists())
        _wait("the hostname file", lambda: (tmp / "host").exists())
        assert (tmp / "host").read_text().strip() == "p-0"
        assert api.patches[-1]["phase"] == "Running"
        assert api.patches[-1]["podIP"] == worker.sandbox.ip
        assert not worker.main[0].ready
        (tmp / "ready").write_text("")
        _wait("Ready", lambda: any(c["type"] == "Ready" and c["status"] == "True"
                                   for c in api.patches[-1]["conditions"]))
        pid1 = worker.main[0].pid1
        worker.oom_kill("main")
        _wait("the restart back-off", lambda: api.patches[-1]["containerStatuses"][0]
              ["restartCount"] == 1)
        st = api.patches[-1]["containerStatuses"][0]
        assert st["lastState"]["terminated"]["exitCode"] == 137
        assert st["lastState"]["terminated"]["reason"] == "OOMKilled"
        assert st["state"]["waiting"]["reason"] == "CrashLoopBackOff"
        assert api.patches[-1]["phase"] == "Running"
        assert not Path(f"/proc/{pid1}").exists()
    finally:
        worker.terminate(grace=1)
    assert worker.sandbox.name not in network.sandboxes


def test_exit_codes_and_restart_policy(network, tmp_path):
    """restartPolicy Never: a container's exit code and reason end the pod Failed."""
    ok = {"name": "ok", "command": ["true"]}
    bad = {"name": "bad", "command": ["sh", "-c", "exit 3"]}
    worker, api = _run(network, tmp_path, _pod([ok, bad]))
    try:
        _wait("the pod to end", lambda: api.patches and api.patches[-1]["phase"] == "Failed")
        states = {c["name"]: c["state"]["terminated"] for c in
                  api.patches[-1]["containerStatuses"]}
        assert (states["ok"]["exitCode"], states["ok"]["reason"]) == (0, "Completed")
        assert (states["bad"]["exitCode"], states["bad"]["reason"]) == (3, "Error")
    finally:
        worker.terminate(grace=1)


def test_services_resolve_and_proxy(network, tmp_path):
    """The harness's cluster DNS and kube-proxy: a pod reaches a ClusterIP Service by its
    name through the userspace proxy, and a headless one's name is its endpoints' address."""
    import sys

    from finetune_testbed import podshim
    from finetune_testbed.podnet import ServiceProxy

    client, server = (network.create_sandbox("ns", n) for n in ("client", "server"))
    services = {"items": [
        {"metadata": {"namespace": "ns", "name": "web"},
         "spec": {"clusterIP": "10.0.0.77", "ports": [{"name": "http", "port": 80}]}},
        {"metadata": {"namespace": "ns", "name": "head"},
         "spec": {"clusterIP": "None", "ports": [{"name": "http", "port": 8080}]}}]}
    slices = {"items": [
        {"metadata": {"namespace": "ns", "labels": {"kubernetes.io/service-name": svc}},
         "endpoints": [{"addresses": [server.ip], "conditions": {"ready": True}}],
         "ports": [{"name": "http", "port": 8080}]} for svc in ("web", "head")]}

    def api(method, path, body=None):
        return 200, services if path == "/api/v1/services" else slices
    proxy = ServiceProxy(network, api, "https://127.0.0.1:6443")
    proxy.sync()
    hosts = client.hosts.read_text()
    assert "10.0.0.77\tweb web.ns web.ns.svc web.ns.svc.cluster.local" in hosts
    assert f"{server.ip}\thead head.ns head.ns.svc head.ns.svc.cluster.local" in hosts

    def run(sb, argv, name):
        return podshim.launch(netns=sb.netns_path, hostname=name, argv=argv,
                              env={"PATH": "/usr/bin:/bin"},
                              mounts=[[str(sb.hosts), "/etc/hosts"],
                                      [str(sb.resolv), "/etc/resolv.conf"]],
                              workdir=tmp_path / name)[0]
    web = run(server, [sys.executable, "-m", "http.server", "8080", "-d", str(tmp_path)], "srv")
    try:
        fetch = ("import sys, time, urllib.request\n"
                 "for _ in range(100):\n"
                 "    try:\n"
                 "        urllib.request.urlopen(sys.argv[1], timeout=5).read(); break\n"
                 "    except OSError: time.sleep(0.1)\n"
                 "else: sys.exit(1)\n")
        for url in ("http://web.ns.svc.cluster.local/", "http://head.ns.svc:8080/"):
            got = run(client, [sys.executable, "-c", fetch, url], "cli")
            assert got.wait(timeout=60) == 0, (tmp_path / "cli" / "log").read_text()
    finally:
        # PID 1 of its namespace, without a SIGTERM handler: only SIGKILL ends it (the
        # shim's death reaches it by PR_SET_PDEATHSIG).
        web.kill()
        web.wait(timeout=10)
        proxy.stop()
