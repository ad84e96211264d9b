"""The background Event poster: order kept, passes never wait, failures counted, not fatal."""

from __future__ import annotations

import asyncio

import aiohttp

from finetune_operator.events import EventRecorder
from finetune_operator.kube import KubeError
from finetune_operator.metrics import Metrics

JOB = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
       "metadata": {"name": "j", "namespace": "ns", "uid": "u-1", "labels": {"a": "b"}},
       "spec": {"big": "x" * 1000}}


class SlowEventsApi:
    """post_event as KubeClient has it; refuses reasons starting with 'Bad', answers slowly."""

    def __init__(self, delay: float = 0.05) -> None:
        self.delay = delay
        self.posted: list[tuple[dict, str, str]] = []

    async def post_event(self, involved, *, type, reason, message):
        await asyncio.sleep(self.delay)
        if reason.startswith("Bad"):
            raise KubeError(422, "refused")
        if reason.startswith("Gone"):
            raise aiohttp.ClientConnectionError("reset")
        self.posted.append((involved, reason, message))


def dropped(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("finetune_events_dropped_total") or 0.0


def test_record_returns_at_once_and_events_go_in_order():
    async def main():
        api, metrics = SlowEventsApi(), Metrics()
        recorder = EventRecorder(api, metrics)  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        started = loop.time()
        for reason in ("One", "BadTwo", "Three", "GoneFour", "Five"):
            recorder.record(JOB, type="Normal", reason=reason, message=f"m {reason}")
        assert loop.time() - started < api.delay  # no pass waits for the Events API
        assert api.posted == []
        await recorder.close(timeout=5)
        return api, metrics

    api, metrics = asyncio.run(main())
    assert [reason for _, reason, _ in api.posted] == ["One", "Three", "Five"]
    assert dropped(metrics) == 2  # the refused and the failed one; the poster carried on
    involved = api.posted[0][0]
    # Only the reference travels: not the spec, not labels.
    assert involved == {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
                        "metadata": {"name": "j", "namespace": "ns", "uid": "u-1"}}


def test_a_full_queue_drops_and_counts_instead_of_blocking():
    async def main():
        api, metrics = SlowEventsApi(delay=0.01), Metrics()
        recorder = EventRecorder(api, metrics, queue_size=3)  # type: ignore[arg-type]
        for i in range(5):
            recorder.record(JOB, type="Normal", reason=f"R{i}", message="")
        await recorder.close(timeout=5)
        return api, metrics

    api, metrics = asyncio.run(main())
    assert [reason for _, reason, _ in api.posted] == ["R0", "R1", "R2"]
    assert dropped(metrics) == 2


def test_close_gives_up_after_its_timeout():
    async def main():
        api = SlowEventsApi(delay=10)
        recorder = EventRecorder(api, Metrics())  # type: ignore[arg-type]
        recorder.record(JOB, type="Normal", reason="Slow", message="")
        loop = asyncio.get_running_loop()
        started = loop.time()
        await recorder.close(timeout=0.2)
        return loop.time() - started, api

    took, api = asyncio.run(main())
    assert took < 2 and api.posted == []


def test_events_wait_for_the_first_passes_they_yield_to():
    from finetune_operator.intake import IntakeGate

    async def main():
        api, gate = SlowEventsApi(delay=0.0), IntakeGate()
        recorder = EventRecorder(api, Metrics(), yield_to=gate.wait)  # type: ignore[arg-type]
        gate.begin()  # a new job's first pass is pending
        recorder.record(JOB, type="Normal", reason="Later", message="")
        await asyncio.sleep(0.1)
        held = list(api.posted)
        gate.end()
        await recorder.close(timeout=5)
        return held, api.posted

    held, posted = asyncio.run(main())
    assert held == [] and [reason for _, reason, _ in posted] == ["Later"]
