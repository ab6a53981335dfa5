"""How a runner sleeps: until a kick (a hint that work arrived) or its timer, whichever first.

It is also where a runner honours a cancellation that a library swallowed: on Python 3.11,
`asyncio.wait_for` returns the result instead of raising when the awaited reply and the
cancellation land in the same loop step (CPython gh-86296), which aiosmtplib's QUIT can hit at
shutdown. The task still counts the request (`cancelling()`), so the next sleep raises it.
"""

from __future__ import annotations

import asyncio


async def sleep_until_kick(kick: asyncio.Event, seconds: float) -> None:
    """Return on a kick or after `seconds`; the kick is cleared."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
    try:
        async with asyncio.timeout(seconds):
            await kick.wait()
    except TimeoutError:
        pass  # the timer: rescan anyway, the directory is the truth
    kick.clear()
