"""A QUIT cut off at shutdown (relay/delivery/client.py `Upstream.quit`): when the runner or
session saying it is cancelled while the server has not answered yet, the connection is closed
all the same, never left open for the garbage collector (a ResourceWarning, and a socket held
until then)."""

from __future__ import annotations

import asyncio
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay.config import HostPort
from relay.delivery.client import Upstream

pytestmark = pytest.mark.timeout(30)


@dataclass
class Peer:
    address: HostPort
    starttls: str = "off"
    verify_cert: bool = False
    ca_file: Path | None = None
    timeout: float = 10.0
    connect_timeout: float = 5.0


class SilentAtQuit:
    """Greets and answers EHLO and MAIL, then never answers QUIT; notes when the client hangs up."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.quit_seen, self.hung_up = threading.Event(), threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn, conn.makefile("rb") as lines:
            conn.sendall(b"220 silent.test ESMTP\r\n")
            for line in lines:
                if line.upper().startswith((b"EHLO", b"HELO")):
                    conn.sendall(b"250 silent.test\r\n")
                elif line.upper().startswith(b"MAIL"):
                    conn.sendall(b"250 2.1.0 Ok\r\n")
                elif line.upper().startswith(b"QUIT"):
                    self.quit_seen.set()
            self.hung_up.set()          # end of file: the client closed its socket

    def close(self) -> None:
        self.listener.close()


def test_a_cancelled_quit_still_closes_the_connection():
    server = SilentAtQuit()

    async def scenario() -> Upstream:
        upstream = Upstream(Peer(HostPort("127.0.0.1", server.port)), "relay.test")
        assert (await upstream.begin("s@sender.test", [])).ok and upstream.connected
        quitting = asyncio.create_task(upstream.quit())
        assert await asyncio.to_thread(server.quit_seen.wait, 10)
        quitting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await quitting
        return upstream

    try:
        upstream = asyncio.run(scenario())
        assert not upstream.connected
        assert server.hung_up.wait(10), "the relay's socket was left open"
    finally:
        server.close()
