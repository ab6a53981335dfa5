"""The serve lock (relay/storage/serve_lock.py) with the real `serve` process: the `replay`
command recovers what a stopped serve left in active/, leaves a running serve's active/ entries
alone and says so, and a second serve on the same spool does not start."""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest

from relay.storage.queue import Queue
from tests.helpers import free_port
from tests.integration import relay_process as rp
from tests.smtp.fakes import FakePrimary

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def kept(tmp_path: Path):
    """A serve whose primary is down, with three messages kept for alice; and its queue."""
    port = free_port()
    cfg = rp.write_config(tmp_path, primary_port=port)
    assert rp.import_users(cfg, [f"alice@{rp.DOMAIN}"]).returncode == 0
    relay = rp.RelayProcess(cfg).start()
    try:
        for n in range(3):
            with smtplib.SMTP(*relay.address, timeout=30) as client:
                assert client.sendmail("s@sender.test", [f"alice@{rp.DOMAIN}"],
                                       f"Subject: {n}\r\n\r\nkept {n}\r\n".encode()) == {}
        yield cfg, port, relay, Queue(relay.spool / "replay" / rp.DOMAIN)
    finally:
        relay.stop()


def test_replay_after_serve_stopped_recovers_what_it_left_in_active(kept) -> None:
    cfg, port, relay, queue = kept
    assert relay.stop() == 0
    assert queue.claim(queue.list("waiting")[0])     # a sweep the stop cut off leaves it so
    primary = FakePrimary(port=port).start()
    try:
        done = rp.run_cli(cfg, "replay")
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"{rp.DOMAIN}: 3 delivered"), done.stdout
        assert len(primary.received) == 3
        assert queue.count("active") == 0 and queue.count("waiting") == 0
    finally:
        primary.stop()


def test_replay_beside_a_running_serve_leaves_its_active_entries_alone(kept) -> None:
    cfg, _port, relay, queue = kept
    in_flight = queue.list("waiting")[0]
    assert queue.claim(in_flight)                     # as serve's own sweep holds one
    done = rp.run_cli(cfg, "replay")                  # the primary is still down
    assert done.returncode == 1
    assert "a serve is running" in done.stderr and "serve.lock" in done.stderr
    assert queue.list("active") == [in_flight] and queue.count("waiting") == 2
    assert relay.running


def test_a_second_serve_on_the_same_spool_does_not_start(kept, tmp_path: Path) -> None:
    cfg, _port, relay, _queue = kept
    other = cfg.parent / "other.yaml"    # another inbound port: only the lock can stop it
    other.write_text(cfg.read_text().replace(f":{relay.port}", f":{free_port()}"))
    second = rp.RelayProcess(other, log_path=tmp_path / "second.log")
    with pytest.raises(rp.RelayProcessError, match="exited with status 1"):
        second.start()
    assert "serve.lock: held by another serve" in second.log_text()
    assert relay.running
