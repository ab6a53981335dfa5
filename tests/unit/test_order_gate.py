"""The replay runner's OrderGate: a message's DATA waits for the one before it in its mailbox's
lane, and what that one came to decides whether the ones behind it go (issue 13)."""

from __future__ import annotations

import asyncio

from relay.runners.queue_runner import Verdict
from relay.runners.replay import HELD_BACK, OrderGate


def chain(n: int) -> list[OrderGate]:
    gates: list[OrderGate] = []
    for _ in range(n):
        gates.append(OrderGate(gates[-1] if gates else None))
    return gates


async def pending(gate: OrderGate) -> asyncio.Task:
    task = asyncio.ensure_future(gate.wait())
    for _ in range(5):          # let it run up to its await
        await asyncio.sleep(0)
    return task


def test_each_waits_for_the_one_before_and_goes_after_a_250():
    async def scenario():
        first, second, third = chain(3)
        assert await first.wait() is None           # the first in line never waits
        waiting = await pending(second)
        assert not waiting.done()
        first.decided(Verdict.DELIVERED)
        assert await waiting is None
        second.decided(Verdict.REFUSED)             # a 5xx is not a reason to hold the rest
        assert await third.wait() is None
    asyncio.run(scenario())


def test_a_mailbox_told_to_wait_holds_back_everything_behind_it():
    async def scenario():
        first, second, third = chain(3)
        first.decided(Verdict.RETRY)
        held = await second.wait()
        assert held is not None and held.stage == HELD_BACK and held.temporary
        second.decided(Verdict.UNTRIED)
        assert (await third.wait()).stage == HELD_BACK
    asyncio.run(scenario())


def test_one_decided_early_does_not_let_the_next_overtake_the_one_before():
    async def scenario():
        first, second, third = chain(3)
        second.decided(Verdict.REFUSED)             # a 5xx to its RCPT, before the first's DATA
        waiting = await pending(third)
        assert not waiting.done()                   # the first is still unanswered
        first.decided(Verdict.STOP)                 # ... and then stopped the sweep
        assert (await waiting).stage == HELD_BACK
    asyncio.run(scenario())


def test_the_first_decision_counts_and_not_sent_goes_on():
    async def scenario():
        first, second = chain(2)
        first.decided(None)                         # another worker had it, or it was set aside
        first.decided(Verdict.STOP)                 # a later call changes nothing
        assert await second.wait() is None
    asyncio.run(scenario())


def test_the_next_one_wakes_on_the_first_turn_of_the_loop_after_the_decision():
    """Per mailbox the dots go one after another: each wake-up through an extra future (a
    shield) would cost every message one more turn of a busy loop."""
    async def scenario():
        first, second = chain(2)
        waiting = await pending(second)
        first.decided(Verdict.DELIVERED)
        await asyncio.sleep(0)                      # one turn of the loop
        assert waiting.done() and waiting.result() is None
    asyncio.run(scenario())


def test_a_cancelled_wait_leaves_the_chain_as_it_was():
    async def scenario():
        first, second, third = chain(3)
        waiting = await pending(second)
        waiting.cancel()                            # the sweep is being torn down
        await asyncio.gather(waiting, return_exceptions=True)
        first.decided(Verdict.DELIVERED)            # the one before is unharmed
        assert first.mine.result() is True
        second.decided(Verdict.STOP)                # as `_drain_lane` says for a cancelled one
        assert (await third.wait()).stage == HELD_BACK
    asyncio.run(scenario())
