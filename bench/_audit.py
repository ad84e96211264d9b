"""A kube-apiserver's audit log read as the API emulator's request recorder is read.

The real API server has no per-client counters; its audit log (a Metadata-level policy,
KubeStack.start(audit_policy=...)) names each request's user, verb and object. `AuditCounter`
follows the log as it grows and keeps per-identity counts in the shape of the emulator's
`/debug/recorder` snapshot ({identity: [[verb, group, resource, subresource, namespace,
count], ...]}), so operator_scale's `calls_by_verb` and `writes_settled` read both alike.
"""
from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any


def policy(usernames: list[str]) -> dict[str, Any]:
    """Metadata for the named users, nothing for the rest: the control plane's own chatter
    (leases, the scheduler, KubeRay) would cost the API server CPU in both operators' runs and
    tell nothing. RequestReceived is left out: one event per request (two for a watch)."""
    return {"apiVersion": "audit.k8s.io/v1", "kind": "Policy",
            "omitStages": ["RequestReceived"],
            "rules": [{"level": "Metadata", "users": list(usernames)}, {"level": "None"}]}


def counted(event: dict[str, Any]) -> bool:
    """Once per request: a watch when its response starts (it ends when the watch does), any
    other request when it completes."""
    if event.get("verb") == "watch":
        return event.get("stage") == "ResponseStarted"
    return event.get("stage") in ("ResponseComplete", "Panic")


class AuditCounter:
    def __init__(self, path: Path, identities: dict[str, str]) -> None:
        """`identities`: username -> the name the figures use (e.g. 'ours', 'floor')."""
        self.path, self.identities = path, identities
        self.offset = 0
        self.calls: dict[str, collections.Counter] = {i: collections.Counter()
                                                      for i in identities.values()}
        self.errors: dict[str, collections.Counter] = {i: collections.Counter()
                                                       for i in identities.values()}

    def _read(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        # The API server writes whole lines; a line still being written waits for the next read.
        end = data.rfind(b"\n") + 1
        self.offset += end
        for line in data[:end].splitlines():
            event = json.loads(line)
            who = self.identities.get((event.get("user") or {}).get("username"))
            if who is None or not counted(event):
                continue
            ref = event.get("objectRef") or {}
            key = (event["verb"], ref.get("apiGroup", ""), ref.get("resource", ""),
                   ref.get("subresource", ""), ref.get("namespace", ""))
            self.calls[who][key] += 1
            code = (event.get("responseStatus") or {}).get("code", 0)
            if code >= 400:
                self.errors[who][f"{event['verb']} {ref.get('resource', '')} {code}"] += 1

    def snapshot(self) -> dict[str, list]:
        """Counts so far, in the emulator recorder's shape."""
        self._read()
        return {who: [[*key, n] for key, n in counter.items()]
                for who, counter in self.calls.items()}

    def error_counts(self) -> dict[str, dict[str, int]]:
        self._read()
        return {who: dict(c) for who, c in self.errors.items()}
