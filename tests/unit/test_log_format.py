"""Issue 12.6: `log.format: text|json`. Each line on stderr is one event with its fields; every
administrator action from the command line, and every outage change, appears exactly once;
never a password, in either format."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import textwrap
import time

import bcrypt
import pytest

from relay import log
from relay.cli import main
from relay.config import load
from relay.delivery.health import Health
from relay.errors import ConfigErrors

PASSWORD = "Tr0ub4dor&3 secret"


@pytest.fixture(autouse=True)
def cheap(monkeypatch):
    real = bcrypt.gensalt
    monkeypatch.setattr(bcrypt, "gensalt", lambda rounds=12, prefix=b"2b": real(4, prefix))


@pytest.fixture
def stderr(capsys):
    """What the log writes to stderr, from a `log.setup` of the test's own; ended afterwards."""
    yield capsys
    log.stop()


def lines_of(capsys) -> list[str]:
    log.stop()                         # every queued line written
    return capsys.readouterr().err.splitlines()


def config_file(tmp_path, fmt: str | None) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent("""\
        listen: {inbound: "127.0.0.1:2525"}
        storage: {maildirs: maildirs, spool: spool}
        domains:
          example.com: {primary: "127.0.0.1:2526"}
        """) + (f"log: {{format: {fmt}}}\n" if fmt else ""))
    return str(path)


def test_json_lines_carry_ts_level_event_and_the_fields(stderr):
    log.setup("INFO", "json")
    log.event("replay.primary_up", domain="example.com", queued=3, reason='a "quoted"\nline')
    log.event("health.outage", logging.WARNING, domain="example.com", ts="forged", event_="x")
    logging.getLogger("asyncio").warning("a library's %s", "warning")
    logging.getLogger("relay.replay").debug("below the level")
    first, second, third = [json.loads(line) for line in lines_of(stderr)]
    assert first["event"] == "replay.primary_up" and first["level"] == "INFO"
    assert first["domain"] == "example.com" and first["queued"] == 3
    assert first["reason"] == 'a "quoted"\nline'                # one line, the value intact
    assert first["ts"].endswith("Z") and first["ts"][10] == "T"
    assert second["level"] == "WARNING" and second["ts"] != "forged"   # a field never replaces them
    assert third == {"ts": third["ts"], "level": "WARNING", "event": "asyncio",
                     "message": "a library's warning"}


def test_text_lines_stay_key_value(stderr):
    log.setup("INFO")
    log.event("replay.primary_up", domain="example.com", queued=3)
    (line,) = lines_of(stderr)
    assert line.endswith(" INFO relay.replay replay.primary_up domain=example.com queued=3")


def test_log_format_is_checked(tmp_path):
    assert load(config_file(tmp_path, None)).log.format == "text"
    assert load(config_file(tmp_path, "JSON")).log.format == "json"
    with pytest.raises(ConfigErrors, match=r"config.yaml: log.format: expected one of text, json"):
        load(config_file(tmp_path, "xml"))


def test_an_outage_change_is_logged_once(stderr, tmp_path):
    log.setup("INFO", "json")
    health = Health(tmp_path / "spool")
    for _ in range(3):
        health.primary_failed("example.com", "451 4.3.0 busy")
    health.primary_ok("example.com")
    health.flush()
    events = [json.loads(line)["event"] for line in lines_of(stderr)]
    assert events == ["health.outage", "health.replaying"]


ACTIONS = [  # (command line, password on stdin, the action it logs)
    (["users", "add", "alice@example.com", "--password-stdin"], True, "add_user"),
    (["users", "passwd", "alice@example.com", "--password-stdin"], True, "set_password"),
    (["users", "deactivate", "alice@example.com"], False, "deactivate"),
    (["users", "activate", "alice@example.com"], False, "activate"),
    (["users", "set", "alice@example.com", "--alternate", "alice@home.example.net"], False, "set_alternate"),
    (["admins", "add", "root@example.net", "--password-stdin"], True, "add_admin"),
    (["admins", "passwd", "root@example.net", "--password-stdin"], True, "set_admin_password"),
    (["outage", "start", "--domain", "example.com", "--reason", "moving racks"], False, "outage_start"),
    (["outage", "end", "--domain", "example.com"], False, "outage_end"),
]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_each_command_line_action_is_logged_and_audited_once_without_the_password(
        fmt, tmp_path, capsys, monkeypatch):
    cfg = config_file(tmp_path, fmt)
    for argv, with_password, action in ACTIONS:
        monkeypatch.setattr(sys, "stdin", io.StringIO(PASSWORD + "\n" if with_password else ""))
        assert main([*argv, "-c", cfg]) == 0
        out = capsys.readouterr()
        logged = [line for line in out.err.splitlines() if "cli.admin_action" in line]
        assert len(logged) == 1, (argv, out.err)
        if fmt == "json":           # every line of the command, not only this one
            assert all(json.loads(x) for x in out.err.splitlines() if x.strip()), out.err
            line = json.loads(logged[0])
            assert (line["event"], line["action"], line["level"]) == ("cli.admin_action", action, "INFO")
        else:
            assert f" action={action} " in logged[0] + " "
        assert PASSWORD not in out.err + out.out
    audit = (tmp_path / "audit.log").read_text()
    assert [line.split(" action=")[1].split()[0] for line in audit.splitlines()] == [a for *_, a in ACTIONS]
    assert PASSWORD not in audit


def test_a_queue_action_is_logged_once(tmp_path, capsys):
    from relay.storage.continuity import replay_queue_path
    from relay.storage.queue import Envelope, Queue

    cfg = config_file(tmp_path, "json")
    queue = Queue(replay_queue_path(load(cfg).storage.spool, "example.com"))
    envelope = Envelope("bob@example.org", "alice@example.com", 0.0)
    entry = queue.enqueue_bytes(b"Subject: x\r\n\r\nx\r\n", envelope)
    assert main(["queue", "hold", entry, "-c", cfg]) == 0
    logged = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(line["event"], line["action"], line["id"]) for line in logged] == [
        ("cli.admin_action", "queue_hold", entry)]


def test_a_stderr_nobody_reads_never_holds_more_than_max_queued_lines_and_the_loss_is_counted(tmp_path):
    """A pipe that is not read fills (64 KiB); the log thread then waits on it, and every line
    after that used to pile up in memory without end. Now past `MAX_QUEUED` a line is counted,
    and `log.dropped lines=N` says how many once stderr takes lines again."""
    marker = tmp_path / "emitted"
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""\
        import pathlib
        from relay import log
        log.setup("INFO", "json")
        for n in range(30_000):
            log.event("test.line", n=n, pad="x" * 40)
        pathlib.Path({str(marker)!r}).write_text(str(log._queued.queue.qsize()))
        log.stop()
        """)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the logging caller waited for a stderr nobody reads"
        assert int(marker.read_text()) <= log.MAX_QUEUED
    finally:
        _, err = child.communicate(timeout=120)
    lines = [json.loads(line) for line in err.decode().splitlines()]
    written = [line["n"] for line in lines if line["event"] == "test.line"]
    dropped = sum(line["lines"] for line in lines if line["event"] == "log.dropped")
    assert dropped > 0 and len(written) + dropped == 30_000
    assert written == sorted(written)
