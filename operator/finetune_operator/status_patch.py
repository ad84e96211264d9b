"""A pass's decision as the one status write: pure, so every rule is a unit test."""

from __future__ import annotations

from typing import Any

from finetune_api.status import Phase

from . import phases


def merge_conditions(existing: list[dict[str, Any]], new: list[phases.Condition],
                     generation: int, now: str) -> list[dict[str, Any]]:
    """Replace conditions by type; lastTransitionTime moves only when the status flips."""
    by_type = {c.get("type"): dict(c) for c in existing or []}
    for c in new:
        old = by_type.get(c.type)
        transition = (old.get("lastTransitionTime") if old and old.get("status") == c.status
                      else now)
        by_type[c.type] = {"type": c.type, "status": c.status, "reason": c.reason,
                           "message": c.message, "lastTransitionTime": transition or now,
                           "observedGeneration": generation}
    return list(by_type.values())


def status_changes(status: dict[str, Any], decision: phases.Decision, *, generation: int,
                   now: str, observed: dict[str, Any] | None = None,
                   outputs: dict[str, str] | None = None) -> dict[str, Any]:
    """The fields of status a pass writes: only those that differ from `status`.

    `observed` holds what the pass saw and did beside the decision (the trainer's progress,
    the RayCluster's name, a failed attempt's log); the decision's own fields win over it.
    `outputs` is what the job writes (FineTuneJob.outputs: modelUri, adapterUri), recorded
    when it succeeds unless the trainer's `completed` event already named them.
    """
    patch = dict(observed or {})
    patch.update(decision.status)
    if decision.phase == Phase.SUCCEEDED and status.get("phase") != Phase.SUCCEEDED:
        output = dict(status.get("output") or {})
        output.update(patch.get("output") or {})
        for key, uri in (outputs or {}).items():
            output.setdefault(key, uri)
        patch["output"] = output
        progress = dict(status.get("progress") or {})
        progress.update(patch.get("progress") or {})
        progress["percent"] = 100
        if progress.get("totalSteps"):
            progress["step"] = max(progress.get("step") or 0, progress["totalSteps"])
        patch["progress"] = progress
    patch["phase"] = decision.phase
    patch["message"] = decision.message
    patch["observedGeneration"] = generation
    if decision.conditions:
        patch["conditions"] = merge_conditions(status.get("conditions") or [],
                                               decision.conditions, generation, now)
    # Write only what changed: a pass that saw nothing new costs no API write.
    return {k: v for k, v in patch.items()
            if status.get(k) != v and not (v is None and k not in status)}
