"""The real process under systemd's default descriptor limit (1,024) survives a connection flood.

Before the connection limits, 1,100 idle connections took every descriptor; asyncio survives
EMFILE at accept(), but the replay runner's next look at its queue folder failed with EMFILE
and `serve` exited. Now the inbound listener's total is sized from RLIMIT_NOFILE at start-up:
the flood beyond it gets 421 4.7.0, and the runners keep their descriptors. This test holds the
flood while the replay runner delivers a message kept earlier, then closes it and sends one more.
"""

from __future__ import annotations

import resource
import shutil
import socket
import threading
from pathlib import Path

import pytest
import yaml
from aiosmtpd.controller import Controller

from tests.helpers import free_port, wait_for

try:  # tests/integration as a package ...
    from . import relay_process as rp
except ImportError:  # ... or as a rootdir-less test directory (pytest prepends it to sys.path)
    import relay_process as rp

pytestmark = pytest.mark.timeout(180)

NOFILE = 1024
FLOOD = 1100
MESSAGE = b"From: x@sender.test\r\nSubject: %s\r\n\r\nbody\r\n"


class Recorder:
    """The primary: takes every message, remembers the subjects."""

    def __init__(self) -> None:
        self.subjects: list[bytes] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope):
        subject = envelope.content.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0]
        with self.lock:
            self.subjects.append(subject)
        return "250 2.0.0 Ok"


def own_descriptors(needed: int) -> None:
    """The test itself holds the flood's client sockets: raise our own soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.fail(f"this test needs {needed} descriptors; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def send(relay: rp.RelayProcess, subject: bytes) -> tuple[int, bytes]:
    import smtplib

    with smtplib.SMTP(*relay.address, timeout=30) as client:
        client.ehlo("sender.test")
        client.mail("x@sender.test")
        code, text = client.rcpt("alice@example.com")
        assert code == 250, (code, text)
        return client.data(MESSAGE % subject)


def banner(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(512)
        if not chunk:
            break
        data += chunk
    return data


def test_serve_survives_a_flood_under_1024_descriptors(tmp_path: Path):
    assert shutil.which("prlimit"), "prlimit (util-linux) is needed"
    own_descriptors(FLOOD + 200)
    primary_port = free_port()
    cfg = rp.write_config(tmp_path, primary_port=primary_port)
    raw = yaml.safe_load(cfg.read_text())
    # Far more than 1,024 descriptors allow, so the start-up sizing is what keeps serve alive;
    # per client as high, as every test connection comes from 127.0.0.1.
    raw["limits"] = {"connections": 5000, "connections_per_client": 5000, "idle_timeout": "10m"}
    raw["replay"] = {"probe_interval": "1s"}
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    rp.import_users(cfg, ["alice@example.com"])

    recorder = Recorder()
    primary = Controller(recorder, hostname="127.0.0.1", port=primary_port)
    flood: list[socket.socket] = []
    relay = rp.RelayProcess(cfg, wrapper=["prlimit", f"--nofile={NOFILE}:{NOFILE}", "--"])
    relay.start()
    try:
        assert send(relay, b"kept")[0] == 250            # primary down: kept for replay
        sizing = [line for line in relay.log_text().splitlines() if "limits.connections" in line]
        assert len(sizing) == 1 and f"configured=5000 nofile={NOFILE}" in sizing[0], sizing
        limit = int(sizing[0].split(" limit=")[1].split()[0])
        assert limit < NOFILE // 2

        for _ in range(FLOOD):
            flood.append(socket.create_connection(relay.address, timeout=30))
        banners = [banner(sock) for sock in flood]
        admitted = sum(b.startswith(b"220 ") for b in banners)
        refused = [b for b in banners if not b.startswith(b"220 ")]
        assert admitted == limit, (admitted, limit)
        assert set(refused) == {b"421 4.7.0 relay.localhost Too many connections, try again later\r\n"}
        assert relay.running, relay.log_text()

        primary.start()                                  # the runners still have descriptors:
        wait_for(lambda: b"kept" in recorder.subjects or not relay.running, 60,
                    "the kept message replayed during the flood", relay.log_text)
        assert relay.running, relay.log_text()
        assert "EMFILE" not in relay.log_text() and "Too many open files" not in relay.log_text()
    finally:
        for sock in flood:
            sock.close()
    try:
        wait_for(lambda: "limits.available" in relay.log_text(), 30, "the flood's end",
                    relay.log_text)
        assert send(relay, b"after")[0] == 250
        assert b"after" in recorder.subjects             # passed straight to the primary
        assert relay.running
    finally:
        status = relay.stop()
        primary.stop()
    assert status == 0, relay.log_text()
