"""The `kubestack` fixture: one real control plane (etcd, kube-apiserver, controller-manager,
scheduler, KubeRay) per test session, from finetune_testbed.kubestack; `node_pool`: nodes
whose pods never run (their states written by tests); `kubelet`: a node whose pods really run
(finetune_testbed.kubelet), on the pod network with the harness's kube-proxy and DNS.

Without the binaries (`kubestack/build.sh` not run) these tests skip on a developer's machine;
in CI (`CI=true`, where .ci/run builds them first) a missing binary is a failure.
"""

from __future__ import annotations

import os
import uuid

import pytest

from finetune_testbed import kubestack as stack_mod
from finetune_testbed.kubelet import ProcessKubelet
from finetune_testbed.nodes import GPU_POOL, NodeAgent, cpu_node, gpu_node
from finetune_testbed.podnet import PodNetwork, ServiceProxy
from realkube.waiting import wait_for


@pytest.fixture(scope="session")
def kubestack():
    directory = stack_mod.bin_dir()
    if not stack_mod.binaries_present(directory):
        message = f"kubestack binaries not built ({directory}): run kubestack/build.sh"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    stack = stack_mod.KubeStack.start(directory)
    yield stack
    stack.stop()


@pytest.fixture(scope="session")
def node_pool(kubestack):
    """Two 8-GPU nodes of pool a100 (tainted nvidia.com/gpu) and one CPU node, Ready."""
    agent = NodeAgent(kubestack).start()
    suffix = uuid.uuid4().hex[:4]
    names = [f"gpu-{suffix}-{i}" for i in range(2)]
    for name in names:
        agent.add(gpu_node(name, GPU_POOL, gpus=8))
    agent.add(cpu_node(f"cpu-{suffix}-0"))

    def ready() -> bool:
        # TaintNodesByCondition admission marks a new node not-ready; the node lifecycle
        # controller lifts the taint once it sees the node Ready.
        for name in agent.nodes:
            taints = kubestack.get("node", name)["spec"].get("taints") or []
            if any(t["key"].startswith("node.kubernetes.io/") for t in taints):
                return False
        return True
    wait_for("the node lifecycle controller to find the nodes Ready", ready, timeout=120)
    yield agent, names
    agent.stop()
    assert not agent.errors, agent.errors
    for name in list(agent.nodes):
        agent.remove(name)


# The process kubelet's node pool (finetune.dev/pool); jobs select it for their workers.
PROCESS_POOL = "cpu-proc"


@pytest.fixture(scope="session")
def pod_network(kubestack):
    """The pod bridge and the harness's kube-proxy and cluster DNS (finetune_testbed.podnet)."""
    if os.geteuid() != 0:
        pytest.skip("the pod network needs root (ip netns, ip link)")
    network = PodNetwork(kubestack.workdir, avoid=(stack_mod.SERVICE_CIDR,)).start()
    proxy = ServiceProxy(network, kubestack.request, kubestack.server).start()
    yield network, proxy
    proxy.stop()
    network.stop()
    assert not proxy.errors, proxy.errors


@pytest.fixture(scope="session")
def kubelet_node(kubestack, pod_network):
    network, _ = pod_network
    kubelet = ProcessKubelet(kubestack, network).start()
    kubelet.service_host = stack_mod.KUBERNETES_SERVICE_IP
    name = f"proc-{uuid.uuid4().hex[:4]}-0"
    kubelet.add(cpu_node(name, pool=PROCESS_POOL))

    def ready() -> bool:
        taints = kubestack.get("node", name)["spec"].get("taints") or []
        return not any(t["key"].startswith("node.kubernetes.io/") for t in taints)
    wait_for("the node lifecycle controller to find the kubelet's node Ready", ready,
             timeout=120)
    # Cordoned between the tests that use it (`kubelet`): other tests' pods, whose states
    # they write themselves, must not land where pods really run.
    _cordon(kubestack, name, True)
    yield kubelet
    kubelet.stop()
    errors = kubelet.errors + [e for w in kubelet.workers.values() for e in w.errors]
    for node in list(kubelet.nodes):
        kubelet.remove(node)
    assert not errors, errors


def _cordon(stack, node: str, unschedulable: bool) -> None:
    stack.request("PATCH", f"/api/v1/nodes/{node}",
                  {"spec": {"unschedulable": True if unschedulable else None}},
                  content_type="application/merge-patch+json")


@pytest.fixture
def kubelet(kubestack, kubelet_node):
    """The process kubelet's node, the only schedulable one during the test: the other
    nodes (whose pods never run) are cordoned, so a head pod, which selects no pool,
    lands where it runs."""
    cordoned = []
    for node in kubestack.get("nodes")["items"]:
        name = node["metadata"]["name"]
        if name not in kubelet_node.nodes and not node["spec"].get("unschedulable"):
            _cordon(kubestack, name, True)
            cordoned.append(name)
    for name in kubelet_node.nodes:
        _cordon(kubestack, name, False)
    yield kubelet_node
    for name in kubelet_node.nodes:
        _cordon(kubestack, name, True)
    for name in cordoned:
        _cordon(kubestack, name, False)


@pytest.fixture(scope="session")
def s3_server(pod_network):
    """moto on the pod network's gateway, where pods reach it. Its fake credentials are in
    this process's environment only; pods get them from the job's Secret."""
    from finetune_testbed.s3 import moto_server

    network, _ = pod_network
    with moto_server(host=network.gateway) as server:
        yield server
