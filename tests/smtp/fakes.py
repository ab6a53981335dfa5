"""A scripted fake primary server and an in-process relay, for routing tests over loopback."""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
import textwrap
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP

from relay import app
from relay.config import Config, HostPort, load
from tests.helpers import free_port


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    mail_options: list[str] = field(default_factory=list)
    rcpt_params: dict[str, tuple[str, ...]] = field(default_factory=dict)  # DSN, with dsn=True


@dataclass
class Script:
    """What the fake primary answers. Replies per recipient address, else `rcpt`.
    `greeting` and `ehlo` replace the 220 greeting and the answer to EHLO and HELO."""

    greeting: str | None = None
    ehlo: str | None = None
    mail: str = "250 2.1.0 Ok"
    rcpt: str = "250 2.1.5 Ok"
    rcpt_for: dict[str, str] = field(default_factory=dict)
    data: str = "250 2.0.0 Ok: queued"
    drop_at: str | None = None       # "RCPT" or "DATA": close the connection instead
    hang_at: str | None = None       # "RCPT" or "DATA": never answer
    data_for: Callable[[bytes], str] | None = None   # the DATA reply, decided per message
    data_delay_for: Callable[[bytes], float] | None = None  # seconds before that reply, per message
    mail_for: Callable[[object], str | None] | None = None  # the MAIL reply per connection (its
    #                                   aiosmtpd session), None: `mail`; after a 421 it hangs up
    data_command: str | None = None  # the reply to the DATA command itself, instead of its 354


class ScriptedHandler:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.received: list[Received] = []
        self.sessions: list[object] = []   # one per connection that sent MAIL
        self.quits = 0                     # QUITs received
        self.probes = 0                    # QUITs on connections that sent no MAIL (probes)
        self.behind_mail: list[bytes] = []  # per MAIL: what had arrived behind it (pipelined)
        self.data_commands = 0             # DATA commands received (before any message)
        self.open: set[SMTP] = set()       # connections not yet closed (stop() closes them)

    async def _act(self, server, verb: str) -> str | None:
        if self.script.hang_at == verb:
            await asyncio.sleep(30)
        if self.script.drop_at == verb:
            server.transport.close()
            return "421 4.3.0 gone"
        return None

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        if self.script.ehlo is None:
            session.host_name = hostname
            return responses
        return [self.script.ehlo]

    async def handle_HELO(self, server, session, envelope, hostname):
        if self.script.ehlo is None:
            session.host_name = hostname
            return f"250 {server.hostname}"
        return self.script.ehlo

    async def handle_QUIT(self, server, session, envelope):
        self.quits += 1
        if not any(known is session for known in self.sessions):
            self.probes += 1
        return "221 Bye"

    async def handle_MAIL(self, server, session, envelope, address, options):
        self.behind_mail.append(bytes(server._reader._buffer))
        reply = (self.script.mail_for and self.script.mail_for(session)) or self.script.mail
        if reply.startswith("421"):
            asyncio.get_running_loop().call_later(0.05, server.transport.close)
            return reply
        if not any(known is session for known in self.sessions):
            self.sessions.append(session)
        if reply.startswith("250"):
            envelope.mail_from = address
            envelope.mail_options.extend(options)
        return reply

    async def handle_RCPT(self, server, session, envelope, address, options):
        early = await self._act(server, "RCPT")
        if early:
            return early
        reply = self.script.rcpt_for.get(address, self.script.rcpt)
        if reply.startswith("250"):
            envelope.rcpt_tos.append(address)
        return reply

    async def handle_DATA(self, server, session, envelope):
        early = await self._act(server, "DATA")
        if early:
            return early
        if self.script.data_delay_for is not None:   # other connections go on meanwhile
            await asyncio.sleep(self.script.data_delay_for(envelope.content))
        reply = self.script.data_for(envelope.content) if self.script.data_for else self.script.data
        if reply.startswith("250"):
            self.received.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                          envelope.content, list(envelope.mail_options),
                                          dict(getattr(envelope, "rcpt_params", {}))))
        return reply


def _scripted(base: type[SMTP]) -> type[SMTP]:
    """`base` with the greeting its handler's script gives (the first reply it pushes)."""

    class Scripted(base):
        _greeted = False

        def connection_made(self, transport) -> None:
            self.event_handler.open.add(self)
            super().connection_made(transport)

        def connection_lost(self, error) -> None:
            self.event_handler.open.discard(self)
            super().connection_lost(error)

        async def push(self, status: str) -> None:
            if not self._greeted:
                self._greeted = True
                status = self.event_handler.script.greeting or status
            await super().push(status)

        async def smtp_DATA(self, arg: str) -> None:
            handler = self.event_handler
            handler.data_commands += 1
            if handler.script.data_command is not None and self.envelope.rcpt_tos:
                await self.push(handler.script.data_command)   # no 354: the message never comes
                return
            await super().smtp_DATA(arg)

    return Scripted


class _ScriptedController(Controller):
    def factory(self):
        return _scripted(SMTP)(self.handler, **self.SMTP_kwargs)


class _DSNController(Controller):
    """A Controller whose server is the relay's own protocol: it offers DSN (RFC 3461) and
    keeps NOTIFY/ORCPT per recipient, which plain aiosmtpd refuses with 555."""

    def factory(self):
        from relay.smtp.server import RelaySMTP

        return _scripted(RelaySMTP)(self.handler, **self.SMTP_kwargs)


class FakePrimary:
    """An aiosmtpd server in its own thread, answering as its script says.

    `smtputf8=False`: a server that does not offer SMTPUTF8; `dsn=True`: one that offers DSN.
    It calls itself `name` in its greeting and EHLO reply. `smtp_options` go to aiosmtpd's SMTP
    (e.g. `auth_required`, `authenticator`)."""

    def __init__(self, script: Script | None = None, *, smtputf8: bool = True, dsn: bool = False,
                 name: str = "primary.test", port: int | None = None,
                 tls_context: ssl.SSLContext | None = None, **smtp_options: object) -> None:
        self.handler = ScriptedHandler(script or Script())
        self.port = port or free_port()
        kind = _DSNController if dsn else _ScriptedController
        self.controller = kind(self.handler, hostname="127.0.0.1", port=self.port,
                               server_hostname=name, decode_data=False, enable_SMTPUTF8=smtputf8,
                               tls_context=tls_context, **smtp_options)

    @property
    def script(self) -> Script:
        return self.handler.script

    @property
    def received(self) -> list[Received]:
        return self.handler.received

    def start(self) -> FakePrimary:
        self.controller.start()
        return self

    def stop(self) -> None:
        # Close what is still connected first: aiosmtpd's stop only cancels the sessions' tasks,
        # and a connection the relay keeps (pass-through caches one) would be left to the garbage
        # collector (a ResourceWarning; after STARTTLS, the raw socket under the TLS one).
        asyncio.run_coroutine_threadsafe(self._hang_up(), self.controller.loop).result(5)
        self.controller.stop()

    async def _hang_up(self) -> None:
        for protocol in list(self.handler.open):
            for transport in (protocol.transport, protocol._original_transport):
                if transport is not None:
                    transport.abort()
        await asyncio.sleep(0)      # abort closes the socket on the loop's next turn
        await asyncio.sleep(0)


def write_config(directory: Path, primary_port: int, *, since: str = "2026-01-01",
                 until: str = "2027-12-31", continuity: bool = True, extra: str = "",
                 primary: str = "", storage: str = "") -> Path:
    """`primary`: more settings of the primary's mapping, e.g. "starttls: off"; `storage`:
    more of the storage mapping, e.g. "archive: archive"."""
    cont = f"    continuity: {{since: {since}, until: {until}}}\n" if continuity else ""
    more = f", {primary}" if primary else ""
    text = textwrap.dedent(f"""\
        hostname: relay.test
        listen: {{inbound: 127.0.0.1:{free_port()}}}
        storage: {{maildirs: maildirs, spool: spool{", " + storage if storage else ""}}}
        users_file: users.passwd
        message_size_limit: 1MiB
        domains:
          example.com:
            primary: {{address: 127.0.0.1:{primary_port}, connect_timeout: 2s, timeout: 2s{more}}}
        """) + cont + extra
    path = directory / "config.yaml"
    path.write_text(text)
    return path


class InProcessRelay:
    """The relay's inbound listener on a loop in a background thread, on a free port (and the
    metrics listener, unless the config turns it off: never the shared default port)."""

    def __init__(self, config: Config) -> None:
        metrics = HostPort("127.0.0.1", 0) if config.listen.metrics else None
        self.config = dataclasses.replace(
            config, listen=dataclasses.replace(config.listen, inbound=HostPort("127.0.0.1", 0),
                                               metrics=metrics))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.running: app.Running | None = None

    @classmethod
    def from_file(cls, path: Path) -> InProcessRelay:
        return cls(load(path))

    def start(self) -> InProcessRelay:
        self.thread.start()
        self.running = asyncio.run_coroutine_threadsafe(app.start(self.config), self.loop).result(10)
        return self

    @property
    def port(self) -> int:
        assert self.running is not None
        return self.running.inbound.sockets[0].getsockname()[1]

    @property
    def metrics_port(self) -> int:
        assert self.running is not None and self.running.metrics is not None
        return self.running.metrics.addresses[0][1]

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        assert self.running is not None
        asyncio.run_coroutine_threadsafe(self.running.close(), self.loop).result(15)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def send(port: int, mail_from: str, rcpts: list[str], wire: bytes,
         ) -> tuple[list[tuple[int, bytes]], tuple[int, bytes] | None]:
    """One transaction with exact DATA bytes (`wire` is already dot-stuffed, without the
    final `.`). Returns each RCPT reply and the DATA reply (None when no RCPT was taken)."""
    import smtplib

    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("sender.test")
        client.mail(mail_from)
        answers = [client.rcpt(r) for r in rcpts]
        if not any(code == 250 for code, _ in answers):
            return answers, None
        client.putcmd("data")
        code, text = client.getreply()
        assert code == 354, (code, text)
        client.send(wire + b".\r\n")
        return answers, client.getreply()


def stored_files(root: Path) -> list[Path]:
    """Every message file under a maildirs root (INBOX and folders, new/ and cur/)."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.parent.name in ("new", "cur"))
