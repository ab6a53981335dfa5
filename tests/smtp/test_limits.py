"""Connection and session limits on the in-process relay, and a runner failing under it.

Raw sockets on 127.0.0.1: every client is the same address, so the per-client limit is the
one met first unless a test raises it.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import time

import pytest

from tests.helpers import wait_for
from tests.smtp.fakes import FakePrimary, Script, send

pytestmark = pytest.mark.timeout(60)

MESSAGE = b"From: x@sender.test\r\nSubject: hello\r\n\r\nbody\r\n"


class Client:
    """A raw SMTP connection: read reply lines, send lines, see the server hang up."""

    def __init__(self, port: int, timeout: float = 20) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.file = self.sock.makefile("rb")

    def line(self) -> bytes:
        return self.file.readline().rstrip(b"\r\n")

    def reply(self) -> bytes:
        """One reply, multi-line ones joined; b"" when the server closed instead."""
        lines = []
        while True:
            line = self.line()
            lines.append(line)
            if len(line) < 4 or line[3:4] != b"-":
                return b"\n".join(lines)

    def command(self, text: str) -> bytes:
        self.sock.sendall(text.encode() + b"\r\n")
        return self.reply()

    def closed_by_server(self) -> bool:
        return self.file.read() == b""

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def greeting(port: int) -> tuple[Client, bytes]:
    client = Client(port)
    return client, client.reply()


def test_per_client_limit_refuses_the_next_and_admits_one_after_a_close(make_relay):
    relay = make_relay(extra="limits: {connections_per_client: 3}\n")
    clients = [greeting(relay.port) for _ in range(3)]
    assert all(banner.startswith(b"220 ") for _, banner in clients)
    over, banner = greeting(relay.port)
    assert banner == b"421 4.7.0 relay.test Too many connections from your address, try again later"
    assert over.closed_by_server()
    over.close()

    first = clients[0][0]
    assert first.command("QUIT").startswith(b"221")
    first.close()

    def admitted():
        client, banner = greeting(relay.port)
        if banner.startswith(b"220 "):
            return client
        assert banner.startswith(b"421 4.7.0"), banner
        client.close()
        return None

    later = wait_for(admitted, 10, "a connection admitted after one closed")
    assert later.command("EHLO sender.test").startswith(b"250-relay.test")
    for client in [later] + [c for c, _ in clients[1:]]:
        client.close()


def test_listener_total_refuses_every_client(make_relay):
    relay = make_relay(extra="limits: {connections: 2, connections_per_client: 10}\n")
    clients = [greeting(relay.port) for _ in range(2)]
    assert all(banner.startswith(b"220 ") for _, banner in clients)
    over, banner = greeting(relay.port)
    assert banner == b"421 4.7.0 relay.test Too many connections, try again later"
    assert over.closed_by_server()
    for client in [over] + [c for c, _ in clients]:
        client.close()


def test_idle_session_is_closed_with_421(make_relay):
    relay = make_relay(extra="limits: {idle_timeout: 1s}\n")
    client, banner = greeting(relay.port)
    assert banner.startswith(b"220 ")
    assert client.command("EHLO sender.test").startswith(b"250-")
    assert client.reply() == b"421 4.4.2 relay.test Idle too long, closing connection"
    assert client.closed_by_server()
    client.close()


def test_waiting_for_a_slow_primary_is_not_the_client_idling(make_relay):
    """The primary never answers RCPT; the relay gives up on it after its 2 s timeout, longer
    than the 1 s idle timeout, and still answers the RCPT (continuity: 250)."""
    fake = FakePrimary(Script(hang_at="RCPT")).start()
    try:
        relay = make_relay(fake.port, extra="limits: {idle_timeout: 1s}\n")
        client, _ = greeting(relay.port)
        client.command("EHLO sender.test")
        assert client.command("MAIL FROM:<x@sender.test>").startswith(b"250")
        assert client.command("RCPT TO:<alice@example.com>") == b"250 2.1.5 Recipient OK"
        client.close()
    finally:
        fake.stop()


def test_a_client_dripping_bytes_without_a_line_end_is_closed(make_relay):
    """Issue 8, point 7: a byte every half second kept the session for ever while any byte
    restarted the idle timer; a command must now arrive whole within it."""
    relay = make_relay(extra="limits: {idle_timeout: 1s}\n")
    client, _ = greeting(relay.port)
    assert client.command("EHLO sender.test").startswith(b"250-")
    started = time.monotonic()
    answered = False
    with contextlib.suppress(OSError):       # the server may close while we still drip
        while not answered and time.monotonic() - started < 4:
            client.sock.sendall(b"N")
            answered = bool(select.select([client.sock], [], [], 0.25)[0])
    assert answered, "still open after 4 s of dripping, with a 1 s idle timeout"
    assert client.reply() == b"421 4.4.2 relay.test Idle too long, closing connection"
    assert client.closed_by_server()
    client.close()


def test_a_slow_but_steady_upload_is_not_idle(make_relay, primary):
    """Every line received restarts the idle timer: a DATA taking longer than the timeout is
    taken whole. (aiosmtpd's own timeout would cut it: it restarts only per command.)"""
    relay = make_relay(primary.port, extra="limits: {idle_timeout: 2s}\n")
    client, _ = greeting(relay.port)
    client.command("EHLO sender.test")
    client.command("MAIL FROM:<x@sender.test>")
    assert client.command("RCPT TO:<alice@example.com>").startswith(b"250")
    assert client.command("DATA").startswith(b"354")
    started = time.monotonic()
    client.sock.sendall(b"Subject: slow\r\n\r\n")
    while time.monotonic() - started < 3:      # longer than the idle timeout in all
        client.sock.sendall(b"a line of the body\r\n")
        time.sleep(0.2)
    assert client.command(".").startswith(b"250 2.0.0")
    assert primary.received and primary.received[0].content.endswith(b"a line of the body\r\n")
    client.close()


def test_too_many_errors_end_the_session(make_relay):
    relay = make_relay(extra="limits: {max_errors: 3}\n")
    client, _ = greeting(relay.port)
    assert client.command("HELO").startswith(b"501")
    assert client.command("RCPT TO:<a@example.com>").startswith(b"503")
    assert client.command("HELO").startswith(b"501")      # the third error reply, then:
    assert client.reply() == b"421 4.7.0 relay.test Too many errors, closing connection"
    assert client.closed_by_server()
    client.close()


def test_temporary_replies_do_not_count_as_errors(make_relay):
    """Primary down, bob not... every recipient answered 4xx is the primary's state, not the
    client's fault: the session goes on."""
    relay = make_relay(users=(), extra="limits: {max_errors: 2}\n")
    client, _ = greeting(relay.port)
    client.command("EHLO sender.test")
    client.command("MAIL FROM:<x@sender.test>")
    for n in range(4):
        assert client.command(f"RCPT TO:<user{n}@example.com>").startswith(b"451")
    assert client.command("NOOP").startswith(b"250")
    client.close()


def test_a_failing_runner_is_restarted_and_the_listener_answers(make_relay, caplog):
    caplog.set_level(logging.INFO, logger="relay.app")
    relay = make_relay(extra="replay: {probe_interval: 1s}\n")
    waiting = relay.config.storage.spool / "replay" / "example.com" / "waiting"
    waiting.parent.mkdir(parents=True, exist_ok=True)
    waiting.write_text("not a directory")        # every sweep of the replay runner now fails

    def failures():
        return [r.getMessage() for r in caplog.records
                if r.getMessage().startswith("app.runner_failed runner=replay")]

    wait_for(lambda: len(failures()) >= 2, 20, "the replay runner failing twice (so restarted once)")
    first, second = failures()[:2]
    assert "error=\"NotADirectoryError: [Errno 20] Not a directory" in first
    assert first.endswith("failures=1 restart_in=1s") and second.endswith("failures=2 restart_in=2s")

    client, banner = greeting(relay.port)
    assert banner.startswith(b"220 ") and client.command("EHLO sender.test").startswith(b"250-")
    client.close()
    waiting.unlink()                             # repaired: the queue makes its folders again
    answers, reply = send(relay.port, "x@sender.test", ["alice@example.com"], MESSAGE)
    assert answers == [(250, b"2.1.5 Recipient OK")] and reply[0] == 250
    assert sorted(p.name for p in waiting.iterdir())   # kept for replay


def test_starttls_session_is_counted_once_and_released_once(tmp_path):
    """STARTTLS calls connection_made again with the TLS transport: still one session."""
    import trustme

    from relay.smtp.limits import ConnectionLimits
    from relay.smtp.submission import SubmissionHandler, make_server_factory
    from tests.smtp.helpers import SubmissionServer, fast_throttle

    ca = trustme.CA()
    server_tls = ssl_server_context(ca, tmp_path)
    client_tls = ssl.create_default_context()
    ca.configure_trust(client_tls)
    limits = ConnectionLimits("submission", total=5, per_client=1)
    handler = SubmissionHandler("relay.test", None, None, 10, fast_throttle())
    server = SubmissionServer(handler, server_tls)
    server.factory = make_server_factory(handler, "relay.test", server_tls, 1024, limits)
    server.start()
    try:
        for _ in range(2):      # the second is admitted only if the first was released
            client = wait_for(lambda: admitted_smtp(server.port), 10, "a submission session")
            assert client.starttls(context=client_tls)[0] == 220
            assert client.ehlo()[0] == 250 and client.sock.version() is not None
            assert limits.open == 1
            client.quit()
        wait_for(lambda: limits.open == 0, 10, "the session released")
    finally:
        server.stop()


def admitted_smtp(port: int):
    import smtplib

    try:
        client = smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=10)
    except smtplib.SMTPConnectError as exc:
        assert exc.smtp_code == 421, exc
        return None
    client.ehlo()
    return client


def ssl_server_context(ca, folder):
    from relay.smtp.tls import ServerTLS

    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(folder / "cert.pem")
    cert.private_key_pem.write_to_path(folder / "key.pem")
    return ServerTLS(folder / "cert.pem", folder / "key.pem")
