"""Issue 9.12: log and audit lines are key=value fields that tools parse back; a value (an
address, a folder name, a reason typed by an administrator) must never forge another field.
The relay's log and the audit log quote through one function, `relay.log.quote`."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.log import event, quote
from relay.web.audit import AuditLog

HOSTILE = ['\\" admin=x', 'a\\', '\\', 'x" admin="y', 'a b\\" c=d', "x\nadmin=y", "x\r\n2026 admin=y",
           'end\\\\" admin=x', "\x1b[31mred", "tab\there", "sep\u2028admin=x", "=", "", '"']


def parse(line: str) -> list[tuple[str, str]]:
    """Fields of a `key=value key="quoted value"` line, shlex-like: inside quotes a backslash
    takes the next character as it is; a bare word without "=" is not a field (a name, a stamp)."""
    fields, pos = [], 0
    while pos < len(line):
        if line[pos] == " ":
            pos += 1
            continue
        end = pos
        while end < len(line) and line[end] not in " =":
            end += 1
        if end == len(line) or line[end] == " ":
            pos = end  # a bare word
            continue
        key, pos = line[pos:end], end + 1
        if pos < len(line) and line[pos] == '"':
            pos += 1
            value = []
            while pos < len(line) and line[pos] != '"':
                if line[pos] == "\\" and pos + 1 < len(line):
                    pos += 1
                value.append(line[pos])
                pos += 1
            assert pos < len(line), f"unterminated quotes in {line!r}"
            pos += 1
            fields.append((key, "".join(value)))
        else:
            end = pos
            while end < len(line) and line[end] != " ":
                end += 1
            fields.append((key, line[pos:end]))
            pos = end
    return fields


def unescaped(text: str) -> str:
    """What `parse` gives back for a value `quote` wrote (\\n etc. read as the letter)."""
    table = {"\\": "\\", '"': '"', "\n": "n", "\r": "r", "\t": "t"}
    out = []
    for char in text:
        if char in table:
            out.append(table[char])
        elif not (char.isprintable() or char == " "):
            code = ord(char)
            wide = f"u{code:04x}" if code < 0x10000 else f"U{code:08x}"
            out.append(f"x{code:02x}" if code < 0x100 else wide)
        else:
            out.append(char)
    return "".join(out)


@pytest.mark.parametrize("value", HOSTILE)
def test_a_value_never_makes_a_second_field_in_the_log(value, caplog):
    """Before the fix `\\" admin=x` became `reason="\\\\" admin=x"`: a forged admin field."""
    caplog.set_level(logging.INFO, logger="relay.panel")
    event("panel.change", reason=value, user="alice@example.com")
    (line,) = [r.getMessage() for r in caplog.records]
    assert "\n" not in line and "\r" not in line
    fields = parse(line)
    assert [k for k, _ in fields] == ["reason", "user"]
    assert fields[0][1] == unescaped(value) and fields[1][1] == "alice@example.com"


@pytest.mark.parametrize("value", HOSTILE)
def test_a_value_never_makes_a_second_field_in_the_audit_log(value, tmp_path):
    audit = AuditLog(tmp_path / "audit.log", clock=lambda: 0.0)
    audit.record("admin", "root@example.net", "add_user", user=value, name=value)
    (line,) = (tmp_path / "audit.log").read_text().splitlines()
    fields = parse(line)
    assert [k for k, _ in fields] == ["admin", "action", "user", "name"]
    assert dict(fields)["user"] == unescaped(value) and dict(fields)["admin"] == "root@example.net"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=30), st.text(max_size=30))
def test_any_value_parses_back_as_one_field(first, second):
    line = f"x.event a={quote(first)} b={quote(second)}"
    assert "\n" not in line and "\r" not in line
    assert parse(line) == [("a", unescaped(first)), ("b", unescaped(second))]


def test_plain_values_stay_bare():
    assert quote("alice@example.com") == "alice@example.com" and quote(42) == "42"
    assert quote("two words") == '"two words"' and quote("") == '""'


def test_audit_uses_the_logs_quoting():
    import relay.web.audit as audit_module
    assert audit_module.quote is quote and not hasattr(audit_module, "_value")


def test_a_stalled_stderr_never_blocks_the_caller(monkeypatch):
    """A full pipe (journald not reading, a terminal paused) used to block whoever logged, the
    event loop included: the handler wrote to stderr in the caller's thread."""
    import os
    import sys
    import threading

    from relay import log

    relay_logger = logging.getLogger("relay")
    saved = (relay_logger.handlers[:], relay_logger.level, relay_logger.propagate)
    reader, writer = os.pipe()
    stalled = os.fdopen(writer, "w", buffering=1)
    monkeypatch.setattr(sys, "stderr", stalled)
    log.setup("INFO")
    try:
        done = threading.Event()

        def flood() -> None:
            for n in range(2000):                       # far past a pipe's 64 KiB
                event("panel.change", n=n, padding="x" * 200)
            done.set()
        threading.Thread(target=flood, daemon=True).start()
        assert done.wait(30), "logging blocked on a full stderr"
    finally:
        drained = []
        drain = threading.Thread(target=lambda: drained.extend(iter(lambda: os.read(reader, 1 << 16), b"")))
        drain.start()
        log.stop()                                      # every queued line is written now
        stalled.close()
        drain.join(10)
        os.close(reader)
        relay_logger.handlers[:], relay_logger.level, relay_logger.propagate = saved
    assert b"".join(drained).count(b"panel.change") == 2000
