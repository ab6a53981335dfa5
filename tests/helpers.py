"""What tests of every kind share: a free loopback port, and waiting for a condition.

Waits poll a condition with a deadline; they never sleep a fixed time and hope. On time-out the
test fails naming what it waited for, with whatever `explain()` adds (logs, queue listings).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

import pytest

T = TypeVar("T")


def free_port(host: str = "127.0.0.1", *, avoid: Iterable[int] = ()) -> int:
    """A TCP port nothing listens on right now (also good as a "server that is down")."""
    avoid = set(avoid)
    while True:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port not in avoid:
            return port


def wait_for(condition: Callable[[], T], seconds: float = 15.0, what: str = "the condition",
             explain: Callable[[], str] = lambda: "", interval: float = 0.02) -> T:
    """Poll `condition` until it gives something true, and return that; fail naming `what`
    after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {seconds:g}s waiting for {what}\n{explain()}".rstrip())
        time.sleep(interval)
