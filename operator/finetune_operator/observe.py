"""Pure helpers of observing: what the reconciler makes of the objects it read.

No I/O here (the reconciler reads the objects, these functions interpret them), so each
rule is a row in tests/operator/test_reconcile_helpers.py.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from finetune_api.status import Phase

from .phases import ClusterState
from .raycluster import DASHBOARD_PORT
from .settings import JOB_LABEL

# Fields a running job may change: everything else is fixed once the run started.
MUTABLE_SPEC_FIELDS = ("runPolicy",)


def immutable_view(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in spec.items() if k not in MUTABLE_SPEC_FIELDS}


def changed_paths(old: Any, new: Any, prefix: str = "spec") -> list[str]:
    """Dotted paths where two spec documents differ (leaves, or whole lists)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out += changed_paths(old.get(key), new.get(key), f"{prefix}.{key}")
        return out
    return [] if old == new else [prefix]


def accepted_spec(spec: dict[str, Any] | None, status: dict[str, Any]
                  ) -> tuple[dict[str, Any], tuple[str, ...], str | None]:
    """(spec in effect, rejected immutable paths, status.acceptedSpec to store or None).

    A job's spec is taken as it is while nothing runs (Pending, Suspended); once a run
    started, changes to anything but runPolicy are rejected and the stored spec
    (status.acceptedSpec) stays in effect, with the current runPolicy.
    """
    spec = dict(spec or {})
    phase = status.get("phase") or Phase.PENDING
    raw = status.get("acceptedSpec")
    stored = None
    if raw:
        try:
            stored = json.loads(raw)
        except ValueError:
            stored = None
    if stored is None or phase in (Phase.PENDING, Phase.SUSPENDED):
        view = immutable_view(spec)
        return spec, (), (json.dumps(view, sort_keys=True) if stored != view else None)
    rejected = tuple(changed_paths(stored, immutable_view(spec)))
    if not rejected:
        return spec, (), None
    effective = dict(stored)
    for key in MUTABLE_SPEC_FIELDS:
        if key in spec:
            effective[key] = spec[key]
    return effective, rejected, None


def job_document(body: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """The FineTuneJob as the trainer and the builders see it: metadata + a given spec."""
    meta = body.get("metadata") or {}
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "labels") if k in meta},
        "spec": copy.deepcopy(spec),
    }


def cluster_state(cluster: dict[str, Any] | None, job_name: str, job_uid: str | None
                  ) -> ClusterState:
    """What a RayCluster of the job's name is to the job."""
    if cluster is None:
        return ClusterState.ABSENT
    meta = cluster.get("metadata") or {}
    owners = [o.get("uid") for o in meta.get("ownerReferences") or []]
    if (meta.get("labels") or {}).get(JOB_LABEL) != job_name or job_uid not in owners:
        return ClusterState.FOREIGN
    if meta.get("deletionTimestamp"):
        # Going away: wait for it to be gone before creating the next one.
        return ClusterState.PROVISIONING
    state = ((cluster.get("status") or {}).get("state") or "").lower()
    if state == "ready":
        return ClusterState.READY
    if state == "failed":
        return ClusterState.FAILED
    return ClusterState.PROVISIONING


def dashboard_url(cluster: dict[str, Any], host: str | None = None) -> str | None:
    """The Ray dashboard as KubeRay publishes it; `host` overrides the head's address
    (an operator outside the cluster: tests, port-forwards)."""
    status = cluster.get("status") or {}
    head = status.get("head") or {}
    host = host or head.get("serviceIP") or head.get("podIP")
    if not host:
        return None
    port = (status.get("endpoints") or {}).get("dashboard") or DASHBOARD_PORT
    return f"http://{host}:{port}"
