"""New jobs first: a job's later passes wait while other jobs' first passes are pending.

A job's first pass creates its RayCluster, and provisioning that cluster (pods scheduled,
GPU nodes scaled up, images pulled) is what a job waits for longest. When many jobs arrive
at once (a GitOps sync, a sweep submitted by a script), passes that only move older jobs
along (submit to a ready cluster, a tracking poll) yield to the new jobs' first passes, so
that every cluster is requested as early as it can be. Measured with
`python -m bench operator_scale` (1,000 jobs at once): the time until every RayCluster
exists and the p99 create->cluster latency both drop, at the cost of Running coming a
moment later for the first jobs of the burst.

The wait is capped, so a first pass stuck on a slow API call holds nobody up for long, and
under a steady trickle of new jobs it is mostly not there at all.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

MAX_WAIT = 5.0  # seconds a later pass yields at most


class IntakeGate:
    def __init__(self) -> None:
        self.pending = 0  # daemons started whose first pass has not finished
        self._idle = asyncio.Event()
        self._idle.set()

    def begin(self) -> None:
        """A job's daemon started: its first pass is pending."""
        self.pending += 1
        self._idle.clear()

    def end(self) -> None:
        """That first pass finished (or the daemon stopped before it did)."""
        self.pending -= 1
        if self.pending <= 0:
            self.pending = 0
            self._idle.set()

    @contextlib.contextmanager
    def first_pass(self) -> Iterator[None]:
        """Around a job's first pass: pending while it runs, however it ends."""
        self.begin()
        try:
            yield
        finally:
            self.end()

    async def wait(self, limit: float = MAX_WAIT) -> None:
        """Before a later pass: until no first pass is pending, `limit` seconds at most."""
        if self._idle.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), limit)
