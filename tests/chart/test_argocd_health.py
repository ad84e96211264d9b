"""The Argo CD health check (charts/finetune-operator/files/argocd-health.lua), run in Lua.

Argo CD's contract: the script sees the live object as the global `obj` and returns a table
with `status` (Healthy, Progressing, Degraded, Suspended, Missing, Unknown) and `message`.
"""
from __future__ import annotations

import pytest
from lupa import LuaRuntime

from finetune_api.schema import PHASES

from .render import CHART_DIR

SCRIPT = (CHART_DIR / "files" / "argocd-health.lua").read_text()
ARGO_STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}


def health(obj: dict) -> dict:
    lua = LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    # Argo CD runs the script as a chunk; `return hs` ends it.
    result = lua.execute(SCRIPT)
    return {"status": result["status"], "message": result["message"]}


def job(status: dict | None = None, generation: int = 1) -> dict:
    obj = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
           "metadata": {"name": "llama", "namespace": "ml", "generation": generation},
           "spec": {"model": {"uri": "hf://meta-llama/Llama-2-7b-hf"}}}
    if status is not None:
        obj["status"] = status
    return obj


@pytest.mark.parametrize("phase, expected", [
    ("Succeeded", "Healthy"),
    ("Pending", "Progressing"),
    ("Provisioning", "Progressing"),
    ("Running", "Progressing"),
    ("Retrying", "Progressing"),
    ("Suspended", "Suspended"),
    ("Failed", "Degraded"),
])
def test_phase_maps_to_health(phase, expected):
    result = health(job({"phase": phase, "observedGeneration": 1}))
    assert result["status"] == expected


def test_every_phase_of_the_schema_is_mapped():
    for phase in PHASES:
        assert health(job({"phase": phase}))["status"] in ARGO_STATUSES - {"Unknown"}, phase


def test_failed_carries_the_status_message():
    result = health(job({"phase": "Failed", "observedGeneration": 1,
                         "message": "BackoffLimitExceeded: 3 attempts failed"}))
    assert result == {"status": "Degraded",
                      "message": "BackoffLimitExceeded: 3 attempts failed"}


def test_missing_status_waits_for_the_operator():
    for obj in (job(), job({}), job({"phase": ""})):
        result = health(obj)
        assert result["status"] == "Progressing"
        assert "waiting for the operator" in result["message"].lower()


def test_a_status_for_an_older_generation_is_progressing():
    result = health(job({"phase": "Succeeded", "observedGeneration": 1}, generation=2))
    assert result["status"] == "Progressing"
    assert "generation 2" in result["message"]


def test_running_shows_progress():
    result = health(job({"phase": "Running", "message": "Training",
                         "progress": {"percent": 42, "step": 420, "totalSteps": 1000}}))
    assert result == {"status": "Progressing", "message": "Training (42%)"}


def test_unknown_phase_is_not_guessed():
    result = health(job({"phase": "Exploded"}))
    assert result["status"] == "Unknown" and "Exploded" in result["message"]


def test_documented_argocd_cm_snippet_embeds_this_script():
    # docs/gitops.md shows the argocd-cm key with the script: it must be this very script.
    from .render import REPO
    doc = (REPO / "docs" / "gitops.md").read_text()
    assert "resource.customizations.health.finetune.dev_FineTuneJob: |" in doc
    block = doc.split("resource.customizations.health.finetune.dev_FineTuneJob: |", 1)[1]
    lines = []
    for line in block.splitlines()[1:]:
        if line.strip() == "```":
            break
        lines.append(line[4:] if line.startswith("    ") else line.strip())
    assert "\n".join(lines).strip() == SCRIPT.strip()
