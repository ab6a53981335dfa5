"""A multi-line reply leaves in one write: EHLO's lines used to be a write, a send(2) and a
wake-up of the client each, a dozen for every session (the kept path's profile: writes were a
quarter of the event loop's time)."""

from __future__ import annotations

import asyncio
import smtplib
import threading

import pytest

from tests.smtp.fakes import InProcessRelay, write_config

pytestmark = pytest.mark.timeout(60)


def test_the_ehlo_reply_is_one_write_with_every_line(monkeypatch, tmp_path):
    writes: list[bytes] = []
    lock = threading.Lock()
    write = asyncio.StreamWriter.write

    def counted(self: asyncio.StreamWriter, data: bytes) -> None:
        with lock:
            writes.append(bytes(data))
        write(self, data)

    monkeypatch.setattr(asyncio.StreamWriter, "write", counted)    # the listener's writes only:
    relay = InProcessRelay.from_file(write_config(tmp_path, 1)).start()   # smtplib is not asyncio
    try:
        with smtplib.SMTP("127.0.0.1", relay.port, local_hostname="client.test") as client:
            with lock:
                writes.clear()              # the greeting
            code, text = client.ehlo()
            with lock:
                during = list(writes)
            assert code == 250
            assert client.has_extn("pipelining") and client.has_extn("enhancedstatuscodes")
            assert client.has_extn("dsn") and client.has_extn("smtputf8") and client.has_extn("size")
            assert len(during) == 1, during
            lines = during[0].split(b"\r\n")
            assert lines[-1] == b"" and lines[-2].startswith(b"250 ")
            assert all(line.startswith(b"250-") for line in lines[:-2]) and len(lines) > 5
            code, text = client.mail("s@sender.test")     # the replies after it as before
            assert code == 250 and text.startswith(b"2.1.0")
    finally:
        relay.stop()
