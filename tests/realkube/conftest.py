"""The `kubestack` fixture: one real control plane (etcd, kube-apiserver, controller-manager,
scheduler, KubeRay) per test session, from finetune_testbed.kubestack.

Without the binaries (`kubestack/build.sh` not run) these tests skip on a developer's machine;
in CI (`CI=true`, where .ci/run builds them first) a missing binary is a failure.
"""

from __future__ import annotations

import os
import uuid

import pytest

from finetune_testbed import kubestack as stack_mod
from finetune_testbed.nodes import GPU_POOL, NodeAgent, cpu_node, gpu_node
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
