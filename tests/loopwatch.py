"""Catching a blocking call made on a server's event-loop thread, without a stopwatch.

The web and submission servers promise that a password check, a durable write or a Maildir read
never runs on the event loop. asyncio debug mode's slow-callback report checks that by the clock,
and the clock also fires when a loaded machine, or the test thread holding the GIL, delays an
innocent callback (CI saw `_call_connection_lost ... took 0.159 seconds`). This watch records the
blocking calls themselves instead: a bcrypt or argon2 hash or check, an fsync or stat, a file
opened or a directory listed, on a thread registered with `watch_thread`. What it reports always happened.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator

import argon2
import bcrypt
import pytest

_watched: set[threading.Thread] = set()    # threads, not idents: Linux reuses an ended thread's id
_seen: list[str] = []
_AUDITED = {"open", "os.listdir", "os.scandir"}


def _where() -> str:
    """The innermost project frame, else the innermost frame outside this module (walked by
    hand: a traceback would read source files, which is itself an audited open)."""
    frame = sys._getframe(2)
    first = None
    while frame is not None:
        name = frame.f_code.co_filename
        if "/relay/" in name:
            return f" at {name.split('/relay/')[-1]}:{frame.f_lineno}"
        if first is None and not name.endswith("loopwatch.py"):
            first = f" at {name}:{frame.f_lineno}"
        frame = frame.f_back
    return first or ""


def _record(what: str) -> None:
    if threading.current_thread() in _watched:
        _seen.append(what + _where())


def _python_file(path: object) -> bool:
    """A .py file is linecache reading source for asyncio debug mode's tracebacks, a .pyc a
    module's first import (a codec, say): both once per process, not per request."""
    return isinstance(path, (str, bytes, os.PathLike)) and os.fsdecode(path).endswith((".py", ".pyc"))


def _audit(event: str, args: tuple) -> None:
    if event in _AUDITED and threading.current_thread() in _watched and not _python_file(args[0]):
        _record(f"{event}({args[0]!r})")


sys.addaudithook(_audit)      # hooks cannot be removed: it stays, and costs a set lookup


def _blocking(name: str, call):
    def watched(*args, **kwargs):
        if not (args and _python_file(args[0])):
            _record(f"{name}({args[0]!r})" if args and isinstance(args[0], (str, os.PathLike)) else name)
        return call(*args, **kwargs)
    return watched


def watch_thread(thread: threading.Thread) -> None:
    """Count blocking calls made on `thread` (started) from now on."""
    assert thread.ident is not None, "start the thread first"
    _watched.add(thread)


@contextlib.contextmanager
def no_blocking_calls_on_loops() -> Iterator[list[str]]:
    """Patch the blocking calls for the duration; yield the list of those made on a watched
    thread. The caller asserts it is empty once its servers are stopped."""
    with pytest.MonkeyPatch.context() as patch:
        for module, name in ((bcrypt, "checkpw"), (bcrypt, "hashpw"), (os, "fsync"), (os, "stat"),
                             (argon2.PasswordHasher, "hash"), (argon2.PasswordHasher, "verify")):
            patch.setattr(module, name, _blocking(f"{getattr(module, '__name__', module)}.{name}",
                                                  getattr(module, name)))
        del _seen[:]
        _watched.intersection_update(t for t in list(_watched) if t.is_alive())
        try:
            yield _seen
        finally:
            _watched.clear()
