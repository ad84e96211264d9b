"""Rendering the chart with the real Helm SDK (helm-python-sdk), shared by the chart tests."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import helm_python
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "charts" / "finetune-operator"
RELEASE = "ft"
NAMESPACE = "finetune-system"
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


@functools.lru_cache(maxsize=1)
def chart() -> helm_python.Chart:
    return helm_python.Chart.load(str(CHART_DIR))


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every object the release would create (CRDs aside), in template order."""
    rendered = chart().render(values or {}, name=RELEASE, namespace=NAMESPACE)
    objects = []
    for path, text in sorted(rendered.items()):
        if not path.endswith((".yaml", ".yml")):  # NOTES.txt is for people
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]
