"""Prometheus metrics, served on /metrics by prometheus-client's own HTTP server.

A registry of its own (not the process-global one) so that tests can run several operators
in one process and read exact values.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from finetune_api.status import Phase


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Gauge("finetune_jobs", "FineTuneJobs by phase.", ["phase"],
                          registry=self.registry)
        self.reconcile_errors = Counter(
            "finetune_reconcile_errors", "Reconcile passes that raised an error.",
            ["kind"], registry=self.registry)
        self.transitions = Counter(
            "finetune_phase_transitions", "Phase transitions of FineTuneJobs.",
            ["phase"], registry=self.registry)
        self.events_dropped = Counter(
            "finetune_events_dropped", "Events not posted (the API refused, or the queue "
            "was full).", registry=self.registry)
        self.time_to_running = Histogram(
            "finetune_create_to_running_seconds",
            "Seconds from a FineTuneJob's creation to its first Running phase.",
            buckets=(5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, float("inf")),
            registry=self.registry)
        self._phase_of: dict[str, str] = {}
        for phase in Phase.words():
            self.jobs.labels(phase).set(0)

    def observe_phase(self, key: str, phase: str | None) -> None:
        """Record `key`'s (namespace/name) current phase; None forgets the job."""
        old = self._phase_of.pop(key, None)
        if old is not None:
            self.jobs.labels(old).dec()
        if phase is not None:
            self._phase_of[key] = phase
            self.jobs.labels(phase).inc()
            if old != phase:
                self.transitions.labels(phase).inc()

    def serve(self, port: int, addr: str = "0.0.0.0"):
        """Start the /metrics server in a thread; returns (server, thread)."""
        return start_http_server(port, addr=addr, registry=self.registry)
