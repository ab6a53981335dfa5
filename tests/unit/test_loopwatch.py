"""The loop watch the web and submission tests rely on: it reports a hash check or file read
made on a watched loop's thread, not the same work done in a worker thread."""

from __future__ import annotations

import asyncio
import threading

import bcrypt

from relay.directory import verify_password
from tests.loopwatch import no_blocking_calls_on_loops, watch_thread

HASH = "{BLF-CRYPT}" + bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()


def _on_a_watched_loop(coroutine_function) -> list[str]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    with no_blocking_calls_on_loops() as blocking:
        thread.start()
        watch_thread(thread)
        try:
            asyncio.run_coroutine_threadsafe(coroutine_function(), loop).result(10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()
        return list(blocking)


def test_a_hash_check_on_the_loop_is_reported_with_the_project_line_that_made_it():
    async def check() -> None:
        assert verify_password(HASH, "pw")

    seen = _on_a_watched_loop(check)
    assert seen and seen[0].startswith("bcrypt.checkpw at directory.py:")


def test_a_file_read_on_the_loop_is_reported(tmp_path):
    (tmp_path / "f").write_text("x")

    async def read() -> None:
        (tmp_path / "f").read_text()

    (seen,) = _on_a_watched_loop(read)
    assert seen.startswith(f"open({str(tmp_path / 'f')!r}) at ") and "pathlib.py" in seen


def test_the_same_work_in_a_worker_thread_is_not_reported(tmp_path):
    (tmp_path / "f").write_text("x")

    async def offloaded() -> None:
        assert await asyncio.to_thread(verify_password, HASH, "pw")
        await asyncio.to_thread((tmp_path / "f").read_text)

    assert _on_a_watched_loop(offloaded) == []



def test_a_thread_that_ended_is_not_confused_with_a_new_one_given_its_id(tmp_path):
    """CI: a server watched (and stopped) in an earlier test left its thread id registered; the
    id went to a later test's health writer, whose state-file fsyncs were reported as the loop's.
    Linux gives an ended thread's id to the next thread started, every time on this machine."""
    ended = threading.Thread(target=lambda: None)
    ended.start()
    watch_thread(ended)                 # outside any watch, as a helper's start() does
    ended.join()
    with no_blocking_calls_on_loops() as blocking:
        worker = threading.Thread(target=lambda: (tmp_path / "f").write_text("x"))
        worker.start()
        worker.join()
        assert list(blocking) == []
