"""A runner's sleep honours a cancellation that a library swallowed (Python 3.11 wait_for)."""

from __future__ import annotations

import asyncio

import pytest

from relay.runners.wake import sleep_until_kick


def test_kick_and_timer():
    async def run() -> None:
        kick = asyncio.Event()
        asyncio.get_running_loop().call_later(0.01, kick.set)
        await sleep_until_kick(kick, 5)
        assert not kick.is_set()
        await sleep_until_kick(kick, 0.01)  # the timer

    asyncio.run(run())


def test_swallowed_cancellation_is_raised_at_the_next_sleep():
    async def runner(swallowed: asyncio.Event) -> None:
        kick = asyncio.Event()
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                swallowed.set()  # what gh-86296 does inside a library: carry on
            await sleep_until_kick(kick, 10)

    async def run() -> None:
        swallowed = asyncio.Event()
        task = asyncio.create_task(runner(swallowed))
        await asyncio.sleep(0)
        task.cancel()
        await swallowed.wait()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 2)

    asyncio.run(run())
