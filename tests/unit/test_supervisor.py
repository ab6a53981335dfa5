"""Runner supervision (relay/app.py `supervise`): a failed runner is logged and restarted."""

from __future__ import annotations

import asyncio
import logging

import pytest

from relay.app import supervise


def failures(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "app.runner_failed" in r.getMessage()]


def test_a_failing_runner_is_restarted_with_growing_capped_delays(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="relay.app")
    starts = []
    sleeps = []
    real_sleep = asyncio.sleep

    async def fake_sleep(seconds):
        sleeps.append(seconds)
        await real_sleep(0)

    async def runner():
        starts.append(len(starts))
        if len(starts) < 6:
            raise OSError(24, "Too many open files")
        await asyncio.Event().wait()     # the sixth run works: it runs until cancelled

    async def main():
        task = asyncio.create_task(supervise("replay", runner, delay=1, max_delay=8))
        while len(starts) < 6:
            await real_sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    asyncio.run(main())
    monkeypatch.undo()
    assert sleeps == [1, 2, 4, 8, 8]
    lines = failures(caplog)
    assert len(lines) == 5
    assert lines[0].startswith("app.runner_failed runner=replay "
                               "error=\"OSError: [Errno 24] Too many open files\" at=test_supervisor.py:")
    assert lines[0].endswith("failures=1 restart_in=1s")
    assert lines[4].endswith("failures=5 restart_in=8s")


def test_the_error_inside_a_task_group_is_named(caplog):
    caplog.set_level(logging.INFO, logger="relay.app")

    async def inner():
        raise NotADirectoryError(20, "Not a directory")

    async def runner():
        async with asyncio.TaskGroup() as group:
            group.create_task(inner())

    async def main():
        task = asyncio.create_task(supervise("replay", runner, delay=60))
        while not failures(caplog):
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert "error=\"NotADirectoryError: [Errno 20] Not a directory\"" in failures(caplog)[0]


def test_cancellation_stops_a_healthy_runner_without_a_restart(caplog):
    caplog.set_level(logging.INFO, logger="relay.app")
    runs = []

    async def runner():
        runs.append(1)
        await asyncio.Event().wait()

    async def main():
        task = asyncio.create_task(supervise("outbox", runner, delay=0))
        while not runs:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert runs == [1] and not failures(caplog)
