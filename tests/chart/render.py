"""The chart as the chart tests render it (finetune_testbed.chart), and the modes they cover."""
from __future__ import annotations

from typing import Any

from finetune_testbed.chart import CHART_DIR, NAMESPACE, RELEASE, chart, render  # noqa: F401
from finetune_testbed.paths import REPO_ROOT as REPO  # noqa: F401

KUBE_VERSION = "1.33.0"

# The modes a release can be installed in; every test that checks all manifests runs on each.
MODES: dict[str, dict[str, Any]] = {
    "default": {},
    "cluster-wide": {"rbac": {"mode": "cluster"}},
    "namespaced": {"rbac": {"mode": "namespaced"}, "watchNamespaces": ["team-a", "team-b"]},
    "peering-2-replicas": {"replicaCount": 2, "peering": {"enabled": True}},
    "namespaced-peering": {"rbac": {"mode": "namespaced"}, "watchNamespaces": ["team-a"],
                           "replicaCount": 3, "peering": {"enabled": True}},
    "metrics-off": {"metrics": {"enabled": False}},
    "servicemonitor": {"metrics": {"serviceMonitor": {"enabled": True,
                                                      "labels": {"release": "prometheus"}}}},
    "networkpolicy": {"networkPolicy": {"enabled": True}},
    "everything": {"replicaCount": 2, "peering": {"enabled": True},
                   "metrics": {"serviceMonitor": {"enabled": True}},
                   "networkPolicy": {"enabled": True, "metricsFrom": [
                       {"namespaceSelector": {"matchLabels": {
                           "kubernetes.io/metadata.name": "monitoring"}}}]},
                   "imagePullSecrets": [{"name": "regcred"}],
                   "image": {"digest": "sha256:" + "a" * 64}},
}


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]
