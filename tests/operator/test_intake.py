"""The intake gate: later passes wait for pending first passes, never longer than the cap."""

from __future__ import annotations

import asyncio

from finetune_operator.intake import IntakeGate


def test_later_passes_wait_until_every_first_pass_is_done():
    async def main():
        gate, order = IntakeGate(), []
        gate.begin()
        gate.begin()

        async def later_pass():
            await gate.wait(limit=5)
            order.append("later")

        waiting = asyncio.create_task(later_pass())
        await asyncio.sleep(0.05)
        order.append("first 1")
        gate.end()
        await asyncio.sleep(0.05)
        assert not waiting.done()  # one first pass is still pending
        order.append("first 2")
        gate.end()
        await asyncio.wait_for(waiting, 1)
        return order, gate.pending

    order, pending = asyncio.run(main())
    assert order == ["first 1", "first 2", "later"] and pending == 0


def test_the_wait_is_capped_and_free_when_idle():
    async def main():
        gate = IntakeGate()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await gate.wait(limit=5)  # nothing pending: no wait at all
        idle = loop.time() - t0
        gate.begin()  # a first pass that never finishes
        t0 = loop.time()
        await gate.wait(limit=0.2)
        return idle, loop.time() - t0

    idle, capped = asyncio.run(main())
    assert idle < 0.05 and 0.15 < capped < 1.0


def test_a_first_pass_that_fails_still_lets_the_others_go():
    async def main():
        gate = IntakeGate()
        try:
            with gate.first_pass():
                assert gate.pending == 1
                raise RuntimeError("the API hiccuped")
        except RuntimeError:
            pass
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await gate.wait(limit=5)
        return gate.pending, loop.time() - t0

    pending, waited = asyncio.run(main())
    assert pending == 0 and waited < 0.05
