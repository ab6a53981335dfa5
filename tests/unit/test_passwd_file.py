"""Issue 9.10: one bad display name must not make the passwd-file unreadable. The reader splits
on b"\\n" only; names that could make another line are refused; a bad line is logged once and
skipped, the other users stay readable, and a rewrite keeps it as it was."""

from __future__ import annotations

import logging
import tempfile
import textwrap
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from relay.addresses import parse_mailbox
from relay.config import load
from relay.directory import Directory, User, read_passwd
from relay.errors import DirectoryError

CONFIG = textwrap.dedent("""\
    listen: {inbound: "127.0.0.1:2525"}
    storage: {maildirs: maildirs, spool: spool}
    users_file: etc/users.passwd
    domains:
      example.com: {primary: "127.0.0.1:2526"}
    """)
# Everything str.splitlines() splits on, and the other characters a field cannot hold.
SEPARATORS = ["\n", "\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029", "\x00", ":"]


def make_directory(root: Path) -> Directory:
    path = root / "config.yaml"
    path.write_text(CONFIG)
    return Directory(load(path))


@pytest.fixture
def directory(tmp_path) -> Directory:
    return make_directory(tmp_path)


@pytest.mark.parametrize("separator", SEPARATORS)
def test_a_name_that_could_split_a_line_is_refused(directory, tmp_path, separator):
    """Before the fix "\\x0c" and the other splitlines() separators were accepted, and every
    later read of the file failed (panel and login 500, submission 454, continuity 451)."""
    directory.add("alice@example.com", "Alice")
    with pytest.raises(DirectoryError, match="may not contain"):
        directory.add("bob@example.com", f"Bob{separator}Smith")
    csv_file = tmp_path / "users.csv"
    csv_file.write_text(f"email,name\ncarol@example.com,Carol{separator}X\ndan@example.com,Dan\n",
                        newline="")
    added, problems = directory.import_csv(csv_file)
    if separator in "\n\r":  # csv itself ends the row there: carol's row is cut short, not refused
        assert "dan@example.com" in [u.email for u in added]
    else:
        assert [u.email for u in added] == ["dan@example.com"]
        assert len(problems) == 1 and ":2:" in problems[0] and "may not contain" in problems[0]
    assert {"alice@example.com", "dan@example.com"} <= set(read_passwd(directory.file))


def test_a_bad_line_in_the_middle_keeps_the_others_readable(directory, caplog):
    directory.add("alice@example.com", "Alice")
    directory.add("zed@example.com", "Zed")
    good = directory.file.read_bytes().split(b"\n")
    bad = [b"no colons at all", b"caf\xe9@example.com::::Latin-1:::", b"../x@example.com::::X:::",
           b"old@example.com::::Form\x0cfeed:::"]
    directory.file.write_bytes(b"\n".join([good[0], *bad, good[1]]) + b"\n")
    caplog.set_level(logging.INFO, logger="relay")
    users = directory.users()
    assert set(users) == {"alice@example.com", "zed@example.com", "old@example.com"}
    assert users["old@example.com"].name == "Form\x0cfeed"  # \x0c splits nothing any more
    assert read_passwd(directory.file) == users
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("directory.bad_line")]
    assert len(logged) == 3  # once each, although the file was read twice
    assert all(b"Latin" not in line.encode() for line in logged)  # the line itself is not logged
    directory.add("bob@example.com", "Bob")
    lines = directory.file.read_bytes().split(b"\n")
    assert all(line in lines for line in bad[:3])  # a rewrite keeps what it could not read
    assert set(directory.users()) == {"alice@example.com", "bob@example.com", "zed@example.com",
                                      "old@example.com"}


local_parts = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789.-_+\u00e9\u00fc\u00df\u00f8"),
                      min_size=1, max_size=20)     # UTF-8 local parts too (issue 8, point 2)
names = st.text(max_size=40)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(local_parts, names, min_size=1, max_size=6))
def test_passwd_file_round_trip(people):
    """Users written with any valid name and address read back equal."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = make_directory(Path(tmp))
        expected = {}
        for local, name in people.items():
            try:
                address = parse_mailbox(f"{local}@example.com")
            except ValueError:
                continue
            try:
                user = directory.add(str(address), name)
            except DirectoryError as exc:
                assert "may not contain" in str(exc)
                assert any(c in name for c in ":") or not name.strip().isprintable()
                continue
            expected[user.email] = user
        assume(expected)
        assert read_passwd(directory.file) == expected
        assert all(isinstance(u, User) and u.name == u.name.strip() for u in expected.values())


@settings(max_examples=150, deadline=None)
@given(st.lists(st.binary(max_size=80) | st.sampled_from([
    b"a@example.com::::A:::", b"x@example.com:{BLF-CRYPT}$2b$05$abc:::X:::nologin",
    b":::::::", b"a@example.com:::::::\x00", b"\xff\xfe@example.com::::B:::"]), max_size=12))
def test_any_bytes_in_the_passwd_file_never_raise_and_each_line_stands_alone(lines):
    """Issue 9, "Also": whatever the file holds, the reader answers with the lines it could
    read, never an exception, and a line reads the same alone as among the others."""
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "users.passwd"
        file.write_bytes(b"\n".join(lines))
        users = read_passwd(file)
        assert all(isinstance(u, User) for u in users.values())
        alone: dict[str, User] = {}
        for line in lines:
            for piece in line.split(b"\n"):
                file.write_bytes(piece)
                alone |= read_passwd(file)
        assert users == alone
