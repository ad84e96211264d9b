"""Kubernetes Events, posted in the background, one at a time, in the order recorded.

A pass records its Events and moves on; it does not wait for the Events API. As client-go's
event recorder, posting is best effort: a failed POST is logged and dropped, and so is an
Event that finds the queue full, so a slow or refusing Events API never holds up a
reconcile. Events also come last in a burst of new jobs: the poster yields to the new jobs'
first passes (`yield_to`, the intake gate), which create their RayClusters, and catches up
when the burst is over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from .kube import KubeClient, KubeError
from .metrics import Metrics

logger = logging.getLogger("finetune_operator")

QUEUE_SIZE = 10_000  # ~10 Events for each of 1,000 jobs in one burst


class EventRecorder:
    def __init__(self, kube: KubeClient, metrics: Metrics, queue_size: int = QUEUE_SIZE,
                 yield_to: Callable[[], Awaitable[None]] | None = None):
        self.kube = kube
        self.yield_to = yield_to  # awaited before each POST
        self.metrics = metrics
        self._queue: asyncio.Queue[tuple[dict[str, Any], str, str, str]] = \
            asyncio.Queue(queue_size)
        self._poster: asyncio.Task[None] | None = None

    def record(self, involved: dict[str, Any], *, type: str, reason: str,
               message: str) -> None:
        """Queue an Event about `involved` (a FineTuneJob body); returns at once."""
        meta = involved.get("metadata") or {}
        # Only what the Event names: the body itself may change or go before it is posted.
        ref = {"apiVersion": involved.get("apiVersion"), "kind": involved.get("kind"),
               "metadata": {key: meta.get(key) for key in ("name", "namespace", "uid")}}
        try:
            self._queue.put_nowait((ref, type, reason, message))
        except asyncio.QueueFull:
            self.metrics.events_dropped.inc()
            logger.warning("Event queue full; dropped %s for %s/%s", reason,
                           meta.get("namespace"), meta.get("name"))
            return
        if self._poster is None or self._poster.done():
            self._poster = asyncio.create_task(self._post_all(), name="event poster")

    async def _post_all(self) -> None:
        while True:
            ref, type, reason, message = await self._queue.get()
            try:
                if self.yield_to is not None:
                    await self.yield_to()
                await self.kube.post_event(ref, type=type, reason=reason, message=message)
            except (KubeError, aiohttp.ClientError, TimeoutError) as e:
                self.metrics.events_dropped.inc()
                logger.warning("Could not post event %s: %s", reason, e)
            finally:
                self._queue.task_done()

    async def flush(self) -> None:
        """Wait until every Event recorded so far was posted (or dropped)."""
        await self._queue.join()

    async def close(self, timeout: float) -> None:
        """Post what is queued, for at most `timeout` seconds, then stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.flush(), timeout)
        if self._poster is not None:
            self._poster.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poster
