"""Connection and session limits for the SMTP listeners, sized from the descriptor limit.

One `ConnectionLimits` per listener (inbound, submission) counts that listener's open sessions,
in total and per client, and carries the per-session limits (`limits.*` in the config). Per
listener, as Postfix counts per service: a flood on port 25 cannot lock the users out of
submission. A client is an IPv4 address, or an IPv6 /64 (what one subscriber usually gets, so
one host cannot dodge the count by changing addresses); an IPv4-mapped IPv6 address is IPv4.

`LimitedConnections` applies them to aiosmtpd's SMTP protocol; it goes first in the MRO
(`class InboundSMTP(LimitedConnections, <base>)`):
  - over a count, `connection_made` writes 421 4.7.0 (over the listener's total or over the
    client's) and closes, before aiosmtpd sees the connection; `connection_lost` releases;
  - the idle timer runs only while the relay waits for the client: every line end received
    restarts it (a byte alone does not, so a command or a line of DATA must arrive whole
    within the timeout), and it is stopped while a handler hook runs or DATA is written to
    the spool (the relay waiting for a primary or the disk is not the client idling). At expiry 421 4.4.2 and
    close. aiosmtpd's own `timeout` is a deadline per command instead (reset only when a
    command line arrives): a large DATA on a slow link, or a slow primary, would be cut in
    the middle;
  - after `max_errors` 5xx replies in one session, 421 4.7.0 and close (Postfix's
    smtpd_hard_error_limit). 4xx replies do not count: they are our own or a primary's state,
    not the client's fault. aiosmtpd itself still ends a session after 5 unknown commands.

`listener_limits` sizes each listener's total at start-up from RLIMIT_NOFILE, so that sessions
can never take the descriptors the storage and the runners need (EMFILE there used to end the
process): see `DESCRIPTOR_RESERVE` and friends. `log_accept_errors` turns asyncio's report of
an accept() that failed for lack of descriptors into one log line; asyncio itself survives it
(it stops accepting on that socket for a second).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
from collections import Counter
from collections.abc import Awaitable, Sequence
from enum import Enum
from typing import Any, AnyStr, TypeVar

from aiosmtpd.smtp import SMTP

from relay import metrics
from relay.addresses import client_network
from relay.config import Limits
from relay.log import event
from relay.smtp import replies

DESCRIPTOR_RESERVE = 128
"""Descriptors kept for everything but sessions: standard streams, listeners, the event loop,
logs, the storage threads' files (32 threads, a file and its directory each), replay and
outbound connections, the Outbox watch."""
ACCEPT_BURST = 100
"""asyncio accepts up to its listen backlog (100) in one go before `connection_made` can
refuse any of them: per listener, that many descriptors beyond its total, for a moment."""
DESCRIPTORS_PER_SESSION = 3
"""The client's socket, (inbound) the session's connection to a primary, and during DATA its
file in the incoming spool (storage/incoming.py)."""

UNKNOWN = "unknown"
_T = TypeVar("_T")


class Refusal(Enum):
    TOTAL = "total"        # the listener has `total` sessions open
    CLIENT = "client"      # this client has `per_client` sessions open


def client_key(peer: Any) -> str:
    """The client a peer address (`transport.get_extra_info("peername")`) counts as."""
    host = peer[0] if isinstance(peer, tuple) and peer else None
    return (client_network(host) if isinstance(host, str) else None) or UNKNOWN


class ConnectionLimits:
    """One listener's session counts and per-session limits."""

    def __init__(self, listener: str, total: int, per_client: int, idle_timeout: float = 60.0,
                 max_errors: int = 20) -> None:
        if total < 1 or per_client < 1 or idle_timeout <= 0 or max_errors < 1:
            raise ValueError("limits must be positive")
        self.listener = listener
        self.total = total
        self.per_client = per_client
        self.idle_timeout = idle_timeout
        self.max_errors = max_errors
        self._open = 0
        self._by_client: Counter[str] = Counter()
        self._refused_total: int | None = None       # refusals since the total was reached
        self._refused_client: dict[str, int] = {}    # clients at their limit: refusals since

    @classmethod
    def of(cls, listener: str, settings: Limits, total: int | None = None) -> ConnectionLimits:
        """The limits `settings` (the `limits.*` keys) give, with `total` when it is lower."""
        return cls(listener, total or settings.connections, settings.connections_per_client,
                   settings.idle_timeout, settings.max_errors)

    def adopt(self, other: ConnectionLimits) -> None:
        """`other`'s limits from now on (a SIGHUP reload): new sessions get them, and sessions
        already open count against the new totals."""
        self.total, self.per_client = other.total, other.per_client
        self.idle_timeout, self.max_errors = other.idle_timeout, other.max_errors

    @property
    def open(self) -> int:
        return self._open

    def count(self, peer: Any) -> int:
        """Sessions open for the client `peer` counts as."""
        return self._by_client[client_key(peer)]

    def try_acquire(self, peer: Any) -> Refusal | None:
        """Count a new session for `peer`; None when admitted, else why not."""
        key = client_key(peer)
        if self._open >= self.total:
            if self._refused_total is None:
                self._refused_total = 0
                event("limits.full", logging.WARNING, listener=self.listener, open=self._open)
            self._refused_total += 1
            return Refusal.TOTAL
        if self._by_client[key] >= self.per_client:
            if key not in self._refused_client:
                self._refused_client[key] = 0
                event("limits.client_full", logging.WARNING, listener=self.listener,
                      client=key, open=self._by_client[key])
            self._refused_client[key] += 1
            return Refusal.CLIENT
        self._open += 1
        self._by_client[key] += 1
        metrics.connection_opened(self.listener)
        return None

    def release(self, peer: Any) -> None:
        """End a session that `try_acquire` admitted."""
        key = client_key(peer)
        if self._by_client[key] < 1:
            raise ValueError(f"no session open for {key}")
        self._open -= 1
        self._by_client[key] -= 1
        metrics.connection_closed(self.listener)
        if not self._by_client[key]:
            del self._by_client[key]
        if key in self._refused_client and self._by_client[key] < self.per_client:
            event("limits.client_available", listener=self.listener, client=key,
                  refused=self._refused_client.pop(key))
        if self._refused_total is not None and self._open < self.total:
            event("limits.available", listener=self.listener, refused=self._refused_total)
            self._refused_total = None


def descriptor_limit() -> int | None:
    """This process's RLIMIT_NOFILE soft limit; None when unlimited."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def session_budget(nofile: int | None, listeners: int) -> int | None:
    """The most sessions each of `listeners` listeners may hold within `nofile` descriptors."""
    if nofile is None:
        return None
    spare = nofile - DESCRIPTOR_RESERVE - ACCEPT_BURST * listeners
    return max(1, spare // DESCRIPTORS_PER_SESSION // listeners)


def listener_limits(settings: Limits, listeners: Sequence[str],
                    nofile: int | None = None) -> dict[str, ConnectionLimits]:
    """A ConnectionLimits per listener name: `limits.connections`, lowered when the descriptor
    limit (default: this process's) cannot hold that many sessions on every listener."""
    nofile = descriptor_limit() if nofile is None else nofile
    budget = session_budget(nofile, len(listeners))
    return {name: ConnectionLimits.of(name, settings, settings.connections if budget is None
                                      else min(settings.connections, budget))
            for name in listeners}


def log_limits(made: dict[str, ConnectionLimits], settings: Limits,
               nofile: int | None = None) -> None:
    """One line per listener: the total it got, and why when lower than configured."""
    nofile = descriptor_limit() if nofile is None else nofile
    for name, limits in made.items():
        capped = limits.total < settings.connections
        event("limits.connections", logging.WARNING if capped else logging.INFO,
              listener=name, limit=limits.total, configured=settings.connections,
              nofile=nofile or "unlimited", per_client=limits.per_client,
              **({"reason": "RLIMIT_NOFILE too low: raise LimitNOFILE"} if capped else {}))


class LimitedConnections(SMTP):
    """aiosmtpd's SMTP protocol with a listener's ConnectionLimits applied (see the module
    docstring). Takes `limits=` besides aiosmtpd's own arguments."""

    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        kwargs["timeout"] = limits.idle_timeout
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._counted: Any = None      # the peer counted by limits, until released
        self._refused = False
        self._errors = 0
        self._busy = 0                 # handler hooks running: the client is not idle
        self._deadline = 0.0           # loop.time() when the client has idled too long
        self._armed = False            # the idle timer will fire (_idle_check)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._counted is None:      # not the second call, with the TLS transport
            peer = transport.get_extra_info("peername")
            refusal = self.limits.try_acquire(peer)
            if refusal is not None:
                self._refused = True
                reply = (replies.TOO_MANY_CONNECTIONS if refusal is Refusal.TOTAL
                         else replies.TOO_MANY_FROM_CLIENT)
                assert isinstance(transport, asyncio.WriteTransport)
                transport.write(reply.format(hostname=self.hostname).encode() + b"\r\n")
                transport.close()
                return
            self._counted = peer if peer is not None else ()
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return                     # aiosmtpd never saw this connection
        try:
            super().connection_lost(error)
        finally:
            if self._counted is not None:
                self.limits.release(self._counted)
                self._counted = None

    def data_received(self, data: bytes) -> None:
        # A line end, not any byte, restarts the timer: a client dripping a byte at a time
        # (Postfix's per-read timer lets one hold a session for ever) must finish a command,
        # or a line of DATA, within idle_timeout.
        if not self._busy and b"\n" in data:
            self._reset_timeout()
        super().data_received(data)

    async def _call_handler_hook(self, command: str, *args: Any) -> Any:
        self._busy += 1
        try:
            return await super()._call_handler_hook(command, *args)
        finally:
            self._busy -= 1
            if not self._busy and self.transport is not None:
                self._reset_timeout()

    async def _not_idle(self, work: Awaitable[_T]) -> _T:
        """Our own work in a session (writing DATA into the spool): the client is not idle
        while we cannot read, as while a hook runs."""
        self._busy += 1
        try:
            return await work
        finally:
            self._busy -= 1
            if not self._busy and self.transport is not None:
                self._reset_timeout()

    def _reset_timeout(self, duration: float | None = None) -> None:
        """The idle deadline moved on. aiosmtpd cancels its timer and makes a new one each
        time, three a command; here one timer stays armed and, when it fires before the
        deadline (or while we are busy), is armed again for what is left."""
        self._deadline = self.loop.time() + (duration or self._timeout_duration)
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or not self._armed:
            self._armed = True
            self._timeout_handle = self.loop.call_at(self._deadline, self._idle_check)

    def _idle_check(self) -> None:
        now = self.loop.time()
        if self._busy or now < self._deadline:    # busy: the hook's end sets a new deadline
            deadline = self._deadline if now < self._deadline else now + self._timeout_duration
            self._timeout_handle = self.loop.call_at(deadline, self._idle_check)
            return
        self._armed = False
        self._timeout_cb()

    def _timeout_cb(self) -> None:
        if self.transport is not None:
            event("limits.idle_timeout", listener=self.limits.listener,
                  client=client_key(self._counted))
            self.transport.write(replies.IDLE_TIMEOUT.format(hostname=self.hostname).encode()
                                 + b"\r\n")
        super()._timeout_cb()

    async def push(self, status: AnyStr) -> None:
        await super().push(status)
        first = status[:1]
        if first not in ("5", b"5") or self.transport is None:
            return
        self._errors += 1
        if self._errors >= self.limits.max_errors:
            event("limits.too_many_errors", logging.WARNING, listener=self.limits.listener,
                  client=client_key(self._counted), errors=self._errors)
            await super().push(replies.TOO_MANY_ERRORS.format(hostname=self.hostname))
            if self.transport is not None:
                self.transport.close()


_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def log_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Log asyncio's "socket.accept() out of system resource" as one `limits.accept_failed`
    line instead of a traceback; every other report goes where it went before."""
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        sock = context.get("socket")
        if isinstance(exc, OSError) and exc.errno in _OUT_OF_DESCRIPTORS and sock is not None:
            try:
                host, port = sock.getsockname()[:2]
                where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            except (OSError, ValueError, TypeError):
                where = UNKNOWN
            event("limits.accept_failed", logging.WARNING, socket=where,
                  error=errno.errorcode.get(exc.errno or 0, exc.errno), retry_in="1s")
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
