"""The Flux health expressions of docs/gitops.md (`healthCheckExprs`), evaluated in CEL.

Flux's kustomize-controller (fluxcd/pkg runtime/cel, RFC 0009) evaluates them against the
object itself (its top-level fields are the variables: `status`, `metadata`, ...) in this
order: a status for an older generation (`status.observedGeneration` != `metadata.generation`)
is InProgress; then `inProgress`, `failed`, `current`, the first that holds wins; none holding
is InProgress. An expression that cannot be evaluated leaves the object Unknown (Flux keeps
waiting). The evaluator is the Rust-based `common-expression-language`, which, like Flux's
cel-go, refuses a variable the object does not have.
"""
from __future__ import annotations

from pathlib import Path

import cel
import pytest
import yaml

from finetune_api.schema import PHASES

GITOPS_DOC = Path(__file__).resolve().parents[2] / "docs" / "gitops.md"
FLUX_ORDER = (("inProgress", "InProgress"), ("failed", "Failed"), ("current", "Current"))


def documented_expressions() -> dict[str, str]:
    """The FineTuneJob entry of the doc's `healthCheckExprs` (the YAML block that has it)."""
    blocks = GITOPS_DOC.read_text().split("```yaml\n")[1:]
    (block,) = [b.split("```", 1)[0] for b in blocks if "healthCheckExprs:" in b]
    kustomization = yaml.safe_load(block)
    (entry,) = [e for e in kustomization["spec"]["healthCheckExprs"]
                if e["apiVersion"] == "finetune.dev/v1alpha1" and e["kind"] == "FineTuneJob"]
    return {key: entry[key] for key in ("current", "failed", "inProgress") if key in entry}


EXPRESSIONS = documented_expressions()
PROGRAMS = {key: cel.compile(source) for key, source in EXPRESSIONS.items()}


def flux_health(obj: dict) -> str:
    status, generation = obj.get("status") or {}, obj["metadata"].get("generation")
    if "observedGeneration" in status and status["observedGeneration"] != generation:
        return "InProgress"
    for key, verdict in FLUX_ORDER:
        if key not in PROGRAMS:
            continue
        try:
            result = PROGRAMS[key].execute(obj)
        except RuntimeError:
            return "Unknown"
        assert isinstance(result, bool), f"{key}: {EXPRESSIONS[key]!r} gave {result!r}, not a bool"
        if result:
            return verdict
    return "InProgress"


def job(status: dict | None = None, generation: int = 1) -> dict:
    obj = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
           "metadata": {"name": "llama2-7b-zero3", "namespace": "ml", "generation": generation},
           "spec": {"model": {"uri": "hf://meta-llama/Llama-2-7b-hf"}}}
    if status is not None:
        obj["status"] = status
    return obj


def test_the_doc_has_all_three_expressions():
    assert set(EXPRESSIONS) == {"current", "failed", "inProgress"}


@pytest.mark.parametrize("phase, expected", [
    ("Succeeded", "Current"),
    ("Failed", "Failed"),
    ("Pending", "InProgress"),
    ("Provisioning", "InProgress"),
    ("Running", "InProgress"),
    ("Retrying", "InProgress"),
    # Flux has no "suspended": a suspended job keeps the Kustomization waiting.
    ("Suspended", "InProgress"),
])
def test_phase_maps_to_flux_health(phase, expected):
    assert flux_health(job({"phase": phase, "observedGeneration": 1})) == expected


def test_every_phase_of_the_schema_satisfies_exactly_one_expression():
    for phase in PHASES:
        held = [key for key, program in PROGRAMS.items()
                if program.execute(job({"phase": phase, "observedGeneration": 1}))]
        assert len(held) == 1, (phase, held)


def test_a_status_without_a_phase_is_in_progress():
    assert flux_health(job({})) == "InProgress"
    assert flux_health(job({"conditions": []})) == "InProgress"


def test_a_job_the_operator_has_not_seen_is_never_healthy_or_failed():
    # No status at all (just applied): Flux cannot evaluate `status` and keeps waiting.
    assert flux_health(job()) in ("InProgress", "Unknown")


def test_a_status_for_an_older_generation_is_in_progress():
    assert flux_health(job({"phase": "Succeeded", "observedGeneration": 1}, generation=2)) == "InProgress"
    assert flux_health(job({"phase": "Failed", "observedGeneration": 1}, generation=2)) == "InProgress"


def test_an_unknown_phase_is_neither_healthy_nor_failed():
    assert flux_health(job({"phase": "Exploded", "observedGeneration": 1})) == "InProgress"
