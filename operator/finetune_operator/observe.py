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
from .kube import secret_value
from .raycluster import AUTH_TOKEN_KEY, DASHBOARD_PORT
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


# KubeRay's RayCluster conditions (>= 1.2; it never writes `state: failed` any more).
HEAD_POD_READY = "HeadPodReady"
PROVISIONED = "RayClusterProvisioned"
REPLICA_FAILURE = "ReplicaFailure"
# KubeRay's Event reasons for a RayCluster it refuses to reconcile (validation, no status).
REFUSAL_EVENTS = ("InvalidRayClusterMetadata", "InvalidRayClusterSpec",
                  "InvalidRayClusterStatus")


def conditions(cluster: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    return {c.get("type"): c for c in ((cluster or {}).get("status") or {}).get("conditions")
            or []}


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
    conds = conditions(cluster)
    head = conds.get(HEAD_POD_READY)
    if head is not None and head.get("status") != "True":
        # `state` stays `ready` when the head dies (restarted in its pod, or replaced by a
        # new pod): the condition is what tells. Before the cluster was ever up it is only
        # still coming up.
        if (conds.get(PROVISIONED) or {}).get("status") == "True":
            return ClusterState.HEAD_DOWN
        return ClusterState.PROVISIONING
    state = ((cluster.get("status") or {}).get("state") or "").lower()
    if state == "ready":
        return ClusterState.READY
    return ClusterState.PROVISIONING


def head_trouble(cluster: dict[str, Any]) -> str:
    """KubeRay's words on a head that is not ready."""
    head = conditions(cluster).get(HEAD_POD_READY) or {}
    return ": ".join(w for w in (head.get("reason"), head.get("message")) if w)


def replica_failure(cluster: dict[str, Any] | None) -> str:
    """KubeRay's ReplicaFailure condition (it could not create or delete a pod), or ""."""
    failure = conditions(cluster).get(REPLICA_FAILURE) or {}
    if failure.get("status") != "True":
        return ""
    return ": ".join(w for w in (failure.get("reason"), failure.get("message")) if w)


def unschedulable(pods: list[dict[str, Any]]) -> str:
    """The scheduler's own words on the first pod of the cluster it cannot place, or ""."""
    for pod in sorted(pods, key=lambda p: (p.get("metadata") or {}).get("name") or ""):
        for c in (pod.get("status") or {}).get("conditions") or []:
            if c.get("type") == "PodScheduled" and c.get("status") == "False" \
                    and c.get("reason") == "Unschedulable":
                return f"pod {pod['metadata'].get('name')}: {c.get('message') or 'Unschedulable'}"
    return ""


def refusal(events: list[dict[str, Any]], cluster_uid: str | None) -> str:
    """KubeRay's latest Event refusing this RayCluster (by uid: not an earlier one's), or ""."""
    mine = [e for e in events if e.get("reason") in REFUSAL_EVENTS
            and (e.get("involvedObject") or {}).get("uid") == cluster_uid]
    if not mine:
        return ""
    last = max(mine, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
    return f"{last.get('reason')}: {last.get('message') or ''}".strip()


def cluster_token(secret: dict[str, Any] | None, cluster: dict[str, Any]) -> str | None:
    """The auth token KubeRay generated for this very RayCluster: its Secret is owned by the
    cluster. A Secret owned by another uid is an earlier cluster's of the same name, which
    the garbage collector has not removed yet: its token is never sent to the new one."""
    if secret is None:
        return None
    uid = (cluster.get("metadata") or {}).get("uid")
    owners = (secret.get("metadata") or {}).get("ownerReferences") or []
    if not any(o.get("uid") == uid for o in owners):
        return None
    return secret_value(secret, AUTH_TOKEN_KEY)


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
