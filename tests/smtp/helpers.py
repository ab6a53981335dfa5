"""What the SMTP tests share (and tests/integration/test_ldap.py): the users of the submission
tests with cheap hashes, the submission server on a loop in a background thread, smtplib
clients that log in, and the outbound settings and file listings of the sending tests.

The fake servers (primary, smarthost) and the in-process relay are in tests/smtp/fakes.py."""

from __future__ import annotations

import asyncio
import base64
import os
import smtplib
import ssl
import threading

import argon2
import bcrypt

from relay.auth import LoginThrottle
from relay.delivery.submit import Submitter
from relay.smtp.submission import SubmissionHandler, make_server_factory
from relay.smtp.tls import ServerTLS
from relay.storage.continuity import ContinuityStore
from relay.storage.maildir import MaildirStore
from tests.loopwatch import watch_thread

PASSWORDS = {"alice@example.com": "alice pass", "bob@example.com": "bob pass",
             "carol@example.com": "cärol pässwörd", "dave@example.com": "dave pass",
             "erin@example.com": "erin pass", "gone@example.com": "gone pass"}


def cheap_hash(email: str) -> str:
    """Hashes verify_password accepts, made cheap (the cost is read from the hash)."""
    password = PASSWORDS[email]
    if email.startswith("bob"):
        fast = argon2.PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)
        return "{ARGON2ID}" + fast.hash(password)
    return "{BLF-CRYPT}" + bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()


# -- the submission server on a loop in a background thread ------------------------------------------

class SubmissionServer:
    def __init__(self, handler: SubmissionHandler, tls: ServerTLS) -> None:
        self.factory = make_server_factory(handler, "relay.test", tls, 1024 * 1024)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: asyncio.Server | None = None

    def start(self) -> SubmissionServer:
        self.thread.start()
        watch_thread(self.thread)
        self.server = asyncio.run_coroutine_threadsafe(
            self.loop.create_server(self.factory, "127.0.0.1", 0), self.loop).result(10)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        assert self.server is not None

        async def close() -> None:
            self.server.close()
            await self.server.wait_closed()
        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def fast_throttle(**options) -> LoginThrottle:
    return LoginThrottle(**{"base_delay": 0.01, "max_delay": 0.05, **options})


# -- clients -----------------------------------------------------------------------------------------

def plain_client(port: int, source: str = "127.0.0.1") -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=10,
                          source_address=(source, 0))
    client.ehlo()
    return client


def tls_client(port: int, client_tls: ssl.SSLContext, source: str = "127.0.0.1") -> smtplib.SMTP:
    client = plain_client(port, source)
    code, _ = client.starttls(context=client_tls)
    assert code == 220
    client.ehlo()
    return client


def b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def auth_plain(client: smtplib.SMTP, login: str, password: str) -> tuple[int, bytes]:
    return client.docmd("AUTH", "PLAIN " + b64(f"\0{login}\0{password}"))


def logged_in(port: int, client_tls: ssl.SSLContext, login: str = "alice@example.com") -> smtplib.SMTP:
    client = tls_client(port, client_tls)
    assert auth_plain(client, login, PASSWORDS[login])[0] == 235
    return client


# -- sending -----------------------------------------------------------------------------------------

def outbound_config(smarthost_port: int, **extra: str) -> str:
    settings = ", ".join(f"{k}: {v}" for k, v in {"retry_delay": "1s", **extra}.items())
    return (f"outbound: {{smarthost: {{address: 127.0.0.1:{smarthost_port}, starttls: off}}, {settings}}}\n"
            "replay: {probe_interval: 1s}\n")


def files(path) -> list:
    return sorted(p for p in path.glob("*") if p.is_file()) if path.exists() else []


def sender_of(relay) -> Submitter:
    store = ContinuityStore(MaildirStore(relay.config.storage.maildirs), relay.config.storage.spool)
    return Submitter(store)


def drop_in_outbox(relay, user: str, data: bytes, sub: str = "new", flags: str = "") -> None:
    """What Dovecot does for an IMAP APPEND: write in tmp/, rename into new/ or cur/."""
    outbox = relay.config.storage.maildirs / "example.com" / user / ".Outbox"
    tmp = outbox / "tmp" / "1700000000.M1P1Q1.test"
    tmp.write_bytes(data)
    os.rename(tmp, outbox / sub / (tmp.name + flags))
