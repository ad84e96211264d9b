"""The chart's RBAC against the API calls a client made, both ways.

`check_rbac(calls, objects, service_account)` takes the calls a client made (as the
emulator's `Recorder` holds them: ApiCall(verb, group, resource, subresource, namespace), or
plain tuples) and the rendered chart, and reports

* missing: a call no bound Role/ClusterRole grants (the operator would get 403), unless
  TOLERATED_DENIALS says why the operator does fine without it;
* unused: a granted (verb, group, resource) no call used, unless ALLOWED_UNUSED says why;
* stale allowances: allow-list entries that no longer match anything, so they cannot rot.

An e2e test calls `assert_calls_granted(kube.recorder.calls_of("operator"), values)` with the
chart values its operator ran under (values matching its Settings): the rules are the chart's
as Helm renders it, so a grant the chart lacks fails the test. A run that exercised every path
calls `assert_rbac_matches` on its calls, which also fails on grants nobody used.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from .chart import NAMESPACE, render

Key = tuple[str, str, str]  # (verb, group, "resource" or "resource/subresource")

# Granted on purpose although no API call uses them.
ALLOWED_UNUSED: dict[Key, str] = {
    ("update", "finetune.dev", "finetunejobs/finalizers"):
        "admission (OwnerReferencesPermissionEnforcement) checks it when the operator creates a "
        "RayCluster or Secret with an ownerReference with blockOwnerDeletion; no call is made",
}

# Calls the operator makes but is deliberately not granted: kopf handles the 403.
TOLERATED_DENIALS: dict[Key, str] = {
    ("list", "", "namespaces"):
        "namespaced mode: kopf falls back to the configured namespaces (observation.py)",
    ("watch", "", "namespaces"):
        "namespaced mode: kopf stops noticing namespace changes, which exact names do not need",
    ("list", "apiextensions.k8s.io", "customresourcedefinitions"):
        "namespaced mode: no cluster-scoped grant; kopf keeps its start-up API discovery",
    ("watch", "apiextensions.k8s.io", "customresourcedefinitions"):
        "namespaced mode: no cluster-scoped grant; kopf keeps its start-up API discovery",
}


@dataclasses.dataclass(frozen=True)
class Call:
    verb: str
    group: str
    resource: str
    subresource: str = ""
    namespace: str | None = None

    @property
    def key(self) -> Key:
        name = f"{self.resource}/{self.subresource}" if self.subresource else self.resource
        return (self.verb, self.group, name)


@dataclasses.dataclass(frozen=True)
class Grant:
    verb: str
    group: str
    resource: str
    namespace: str | None  # None: a ClusterRole bound cluster-wide

    @property
    def key(self) -> Key:
        return (self.verb, self.group, self.resource)

    def covers(self, call: Call) -> bool:
        return self.key == call.key and self.namespace in (None, call.namespace)


@dataclasses.dataclass
class RbacReport:
    missing: list[Call]
    unused: list[Key]
    stale_allowances: list[Key]

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unused or self.stale_allowances)

    def __str__(self) -> str:
        lines = [f"missing (the operator calls, RBAC denies): {c}" for c in self.missing]
        lines += [f"unused (granted, never called): {k}" for k in self.unused]
        lines += [f"stale allow-list entry: {k}" for k in self.stale_allowances]
        return "\n".join(lines) or "RBAC matches the calls"


def as_call(raw: Any) -> Call:
    """A Call from an emulator ApiCall, a Call, a dict or a (verb, group, resource,
    subresource[, namespace]) sequence."""
    if isinstance(raw, Call):
        return raw
    if isinstance(raw, Mapping):
        return Call(**raw)
    if hasattr(raw, "verb") and hasattr(raw, "resource"):
        return Call(raw.verb, raw.group, raw.resource, raw.subresource or "",
                    getattr(raw, "namespace", None))
    return Call(*raw)


def grants(objects: list[dict[str, Any]], service_account: str,
           sa_namespace: str = NAMESPACE) -> set[Grant]:
    """What the service account may do: the rules of the roles bound to it, expanded."""
    roles = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o
             for o in objects if o["kind"] in ("Role", "ClusterRole")}
    out: set[Grant] = set()
    for binding in objects:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if not any(s["kind"] == "ServiceAccount" and s["name"] == service_account
                   and s.get("namespace") == sa_namespace for s in binding["subjects"]):
            continue
        scope = binding["metadata"].get("namespace") if binding["kind"] == "RoleBinding" else None
        ref = binding["roleRef"]
        role_ns = scope if ref["kind"] == "Role" else None
        role = roles.get((ref["kind"], role_ns, ref["name"]))
        assert role is not None, f"{binding['kind']} {binding['metadata']['name']} binds " \
                                 f"{ref['kind']} {ref['name']}, which the chart does not create"
        for rule in role["rules"]:
            assert not rule.get("resourceNames"), "resourceNames are not modelled here"
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        out.add(Grant(verb, group, resource, scope))
    return out


def check_rbac(calls: Iterable[Any], objects: list[dict[str, Any]], service_account: str, *,
               allowed_unused: Mapping[Key, str] = ALLOWED_UNUSED,
               tolerated_denials: Mapping[Key, str] = TOLERATED_DENIALS) -> RbacReport:
    recorded = {as_call(c) for c in calls}
    granted = grants(objects, service_account)
    denied = [c for c in recorded if not any(g.covers(c) for g in granted)]
    missing = sorted((c for c in denied if c.key not in tolerated_denials),
                     key=lambda c: (c.key, c.namespace or ""))
    used_keys = {c.key for c in recorded}
    granted_keys = {g.key for g in granted}
    unused = sorted(k for k in granted_keys - used_keys if k not in allowed_unused)
    # An allowance is stale when its permission is not granted at all or is used after all.
    # Tolerated denials are per deployment mode, so only the unused allow-list is checked.
    stale = sorted(k for k in allowed_unused if k not in granted_keys or k in used_keys)
    return RbacReport(missing, unused, stale)


def service_account_name(objects: list[dict[str, Any]]) -> str:
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    return deployment["spec"]["template"]["spec"]["serviceAccountName"]


def assert_rbac_matches(calls: Iterable[Any], values: dict[str, Any] | None = None) -> None:
    """For e2e tests: the chart rendered with `values` grants exactly what `calls` used."""
    objects = render(values)
    report = check_rbac(calls, objects, service_account_name(objects))
    assert report.ok, str(report)


def assert_calls_granted(calls: Iterable[Any], values: dict[str, Any] | None = None) -> None:
    """For one e2e test: every call it recorded is granted (a single scenario exercises only
    some grants, so unused ones are checked by `assert_rbac_matches` over a whole session)."""
    objects = render(values)
    report = check_rbac(calls, objects, service_account_name(objects))
    assert not report.missing, str(report)
