"""Prometheus metrics: jobs by phase follow each job's latest phase."""

from __future__ import annotations

from prometheus_client import generate_latest

from finetune_api.status import Phase
from finetune_operator.metrics import Metrics


def value(m: Metrics, name: str, **labels: str) -> float:
    return m.registry.get_sample_value(name, labels) or 0.0


def test_jobs_by_phase_move_with_the_job():
    m = Metrics()
    m.observe_phase("ns/a", "Pending")
    m.observe_phase("ns/b", "Pending")
    m.observe_phase("ns/a", "Running")
    assert value(m, "finetune_jobs", phase="Pending") == 1
    assert value(m, "finetune_jobs", phase="Running") == 1
    m.observe_phase("ns/a", "Running")          # no change, no double count
    assert value(m, "finetune_jobs", phase="Running") == 1
    m.observe_phase("ns/a", None)               # deleted
    assert value(m, "finetune_jobs", phase="Running") == 0
    assert value(m, "finetune_phase_transitions_total", phase="Running") == 1


def test_exposition_has_every_phase_and_the_histogram():
    m = Metrics()
    m.time_to_running.observe(42)
    m.reconcile_errors.labels("KubeError").inc()
    text = generate_latest(m.registry).decode()
    for phase in Phase.words():  # every phase of the vocabulary, from its first pass on
        assert f'finetune_jobs{{phase="{phase}"}}' in text
    assert "finetune_create_to_running_seconds_bucket" in text
    assert 'finetune_reconcile_errors_total{kind="KubeError"} 1.0' in text
