"""The sd_notify protocol: telling systemd (`Type=notify`) that serve is ready, what it is doing,
that it is stopping, and that its event loop still turns (the watchdog).

systemd hands the service `$NOTIFY_SOCKET`, an AF_UNIX datagram socket: a path, or an abstract
name written with a leading `@`. Each message is one datagram of `KEY=value` lines (`READY=1`,
`STATUS=...`, `STOPPING=1`, `WATCHDOG=1`). With `WatchdogSec=` it also sets `$WATCHDOG_USEC`
(and `$WATCHDOG_PID`, the process meant): `WATCHDOG=1` must then come at least that often, or
systemd kills and restarts the service. The pings are sent by a task on the event loop itself,
at half that interval, so a loop wedged by a blocking call stops them. A thread would go on
pinging while the loop is stuck, which is what the watchdog is there to catch.

Without `$NOTIFY_SOCKET` (not under systemd, or `Type=` other than notify) every call is a no-op.

No library: the protocol is one `sendto()` per message. python-systemd needs libsystemd's
headers and a compiler to install, and sdnotify (unmaintained since 2017) adds nothing to it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping

from relay.log import event


class Notifier:
    """Sends sd_notify messages to `$NOTIFY_SOCKET` (none set: does nothing)."""

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        self.address = _address(environ.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval = _watchdog_interval(environ) if self.address else None
        self._socket: socket.socket | None = None
        self._failing = False           # the last send failed: logged once, not per ping
        self._status = ""

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> None:
        """One datagram of `KEY=value` lines. Never blocks: a full socket drops the message
        (systemd reads them as they come; the next status or ping says it again)."""
        if self.address is None:
            return
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket.setblocking(False)
            self._socket.sendto("\n".join(lines).encode("utf-8"), self.address)
        except OSError as exc:
            if not self._failing:
                event("notify.failed", logging.WARNING, socket=_shown(self.address),
                      error=exc.strerror or exc)
            self._failing = True
            return
        if self._failing:
            event("notify.recovered", socket=_shown(self.address))
        self._failing = False

    def ready(self, status: str) -> None:
        self._status = _one_line(status)
        self.send("READY=1", f"STATUS={self._status}")

    def status(self, text: str) -> None:
        """`STATUS=` only when the text changed."""
        text = _one_line(text)
        if text != self._status:
            self._status = text
            self.send(f"STATUS={text}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")

    def reloading(self) -> None:
        """Before a SIGHUP reload; `reloaded()` after it (systemd 253 wants the clock too)."""
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def reloaded(self) -> None:
        self.send("READY=1")

    async def watchdog(self) -> None:
        """`WATCHDOG=1` every half `$WATCHDOG_USEC`, from this event loop, until cancelled
        (returns at once when there is no watchdog)."""
        if self.watchdog_interval is None:
            return
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_interval)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _address(text: str) -> str | bytes | None:
    if text.startswith("@"):
        return b"\0" + text[1:].encode("utf-8")      # Linux abstract namespace
    if text.startswith("/"):
        return text
    return None                # unset, or a kind of address systemd does not give a service


def _watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Half of `$WATCHDOG_USEC` in seconds, when the watchdog is meant for this process."""
    pid = environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _shown(address: str | bytes) -> str:
    return "@" + address[1:].decode("utf-8", "replace") if isinstance(address, bytes) else address
