"""The passwd-file: Dovecot's format, atomic rewrites, and the users commands."""

from __future__ import annotations

import io
import os
import textwrap

import pytest

from relay.addresses import parse_mailbox
from relay.cli import main
from relay.config import load
from relay.directory import Directory, hash_password, verify_password
from relay.errors import DirectoryError


@pytest.fixture
def config_path(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent("""\
        listen: {inbound: "127.0.0.1:2525"}
        storage: {maildirs: maildirs, spool: spool}
        users_file: etc/users.passwd
        domains:
          example.com: {primary: "127.0.0.1:2526"}
          example.org: {primary: "127.0.0.1:2526"}
        """))
    return path


@pytest.fixture
def directory(config_path):
    return Directory(load(config_path))


def test_lines_in_dovecot_format(directory):
    directory.add("Alice@Example.com", "Alice Smith", "s3cret pass")
    directory.add("bob@example.com", "Bob")
    directory.set_active("bob@example.com", False)
    lines = directory.file.read_text().splitlines()
    alice, bob = lines
    assert alice.startswith("alice@example.com:{BLF-CRYPT}$2b$12$") and alice.endswith(":::Alice Smith:::")
    assert bob == "bob@example.com::::Bob:::nologin reason=deactivated"
    assert all(line.count(":") == 7 for line in lines)
    assert oct(directory.file.stat().st_mode & 0o777) == "0o640"
    assert sorted(p.name for p in directory.file.parent.iterdir()) == ["users.passwd", "users.passwd.lock"]


def test_passwords_verify_and_long_ones_use_argon2():
    short = hash_password("correct horse")
    assert verify_password(short, "correct horse") and not verify_password(short, "wrong")
    long_password = "p" * 100
    long_hash = hash_password(long_password)
    assert long_hash.startswith("{ARGON2ID}$argon2id$")
    assert verify_password(long_hash, long_password) and not verify_password(long_hash, "p" * 99)
    with pytest.raises(DirectoryError):
        hash_password("")


def test_registered_without_password_or_deactivated_cannot_log_in(directory):
    assert not directory.add("nopw@example.com").can_log_in
    directory.add("x@example.com", password="pw")
    assert directory.get(parse_mailbox("x@example.com")).can_log_in
    assert not directory.set_active("x@example.com", False).can_log_in
    user = directory.set_active("x@example.com", True)
    assert user.can_log_in and verify_password(user.password_hash, "pw")


def test_changes_refused_with_clear_errors(directory):
    directory.add("a@example.com")
    for call, message in [
        (lambda: directory.add("a@example.com"), "already registered"),
        (lambda: directory.add("a@elsewhere.net"), "domain elsewhere.net is not configured"),
        (lambda: directory.add("../a@example.com"), "not allowed"),
        (lambda: directory.set_password("ghost@example.com", "x"), "no such user"),
        (lambda: directory.add("b@example.com", "Evil:Name"), "may not contain"),
    ]:
        with pytest.raises(DirectoryError, match=message):
            call()
    assert [u.email for u in directory.list()] == ["a@example.com"]


def test_cache_sees_changes_made_by_another_process(directory, config_path):
    assert not directory.is_registered(parse_mailbox("a@example.com"))
    Directory(load(config_path)).add("a@example.com")
    assert directory.is_registered(parse_mailbox("a@example.com"))


def test_import_reports_bad_lines_and_imports_the_rest(directory, tmp_path):
    csv_file = tmp_path / "users.csv"
    csv_file.write_text("Email,Name,Password\n"
                        "one@example.com,One,pw1\n"
                        "bad address,Bad,\n"
                        "two@example.org,Two,\n"
                        "three@nowhere.net,Three,\n"
                        "one@example.com,Dup,\n")
    directory.add("two@example.org")
    added, problems = directory.import_csv(csv_file)
    assert [u.email for u in added] == ["one@example.com"]
    assert [p.split(": ")[0] for p in problems] == [f"{csv_file}:3", f"{csv_file}:5", f"{csv_file}:6",
                                                     f"{csv_file}:4"]
    assert verify_password(directory.get(added[0].address).password_hash, "pw1")


def test_cli_users_commands(config_path, monkeypatch, capsys):
    c = ["-c", str(config_path)]
    monkeypatch.setattr("sys.stdin", io.StringIO("hunter2\n"))
    assert main(["users", "add", "carol@example.com", "--name", "Carol", "--password-stdin", *c]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("new-pass\n"))
    assert main(["users", "passwd", "carol@example.com", "--password-stdin", *c]) == 0
    assert main(["users", "add", "dave@example.org", *c]) == 0
    assert main(["users", "deactivate", "dave@example.org", *c]) == 0
    assert main(["users", "add", "dave@example.org", *c]) == 1
    assert main(["users", "activate", "nobody@example.org", *c]) == 1
    capsys.readouterr()
    assert main(["users", "list", "--domain", "example.com", *c]) == 0
    out = capsys.readouterr().out
    assert out == "carol@example.com\tactive\tpassword\tCarol\n"
    assert "hunter2" not in load(config_path).users_file.read_text()
    user = Directory(load(config_path)).list("example.com")[0]
    assert verify_password(user.password_hash, "new-pass")


def test_cli_import_exit_status(config_path, tmp_path, capsys):
    good = tmp_path / "good.csv"
    good.write_text("email,name\na@example.com,A\n")
    assert main(["users", "import", str(good), "-c", str(config_path)]) == 0
    bad = tmp_path / "bad.csv"
    bad.write_text("name\nA\n")
    assert main(["users", "import", str(bad), "-c", str(config_path)]) == 1
    assert "'email' column" in capsys.readouterr().err


def test_rewrite_is_atomic_and_leaves_no_temp_files(directory):
    for n in range(5):
        directory.add(f"u{n}@example.com")
    names = os.listdir(directory.file.parent)
    assert sorted(names) == ["users.passwd", "users.passwd.lock"]
    assert len(directory.list()) == 5


def test_every_rewrite_changes_mtime_seconds(directory):
    """Dovecot re-reads a passwd-file only when its mtime (whole seconds) or size changed, and
    a new bcrypt hash has the same length as the old one."""
    directory.add("a@example.com", password="first-password")
    before = directory.file.stat()
    directory.set_password("a@example.com", "other-password")
    after = directory.file.stat()
    assert after.st_size == before.st_size
    assert int(after.st_mtime) != int(before.st_mtime)


def test_refresh_parses_only_new_lines_and_sees_every_change(directory, config_path, monkeypatch):
    """Issue 13 (scale): serve's refresh rereads a changed passwd-file without parsing the
    unchanged lines again; a line changed, added or removed by another process is still seen."""
    import relay.directory as module

    writer = Directory(load(config_path))
    for n in range(20):
        writer.add(f"u{n}@example.com", f"User {n}")
    directory.refresh()
    assert directory.is_known(parse_mailbox("u7@example.com"))
    writer.add("new@example.com", "New")
    writer.set_active("u3@example.com", False)
    lines = writer.file.read_bytes().replace(b"u5@example.com::::User 5:::\n", b"")
    writer.file.write_bytes(lines + b"not a line\n")         # removed by hand, and a bad line
    parsed = []
    real_parse = module.parse_line
    monkeypatch.setattr(module, "parse_line", lambda line: parsed.append(line) or real_parse(line))
    directory.refresh()
    assert sorted(parsed) == ["new@example.com::::New:::", "not a line",
                              "u3@example.com::::User 3:::nologin reason=deactivated"]
    assert directory.is_known(parse_mailbox("new@example.com"))
    assert not directory.users()[("u3@example.com")].active
    assert not directory.is_known(parse_mailbox("u5@example.com"))
    assert len(directory.users()) == 20
    writer.add("later@example.com")                          # a rewrite keeps the bad line
    assert writer.file.read_bytes().endswith(b"not a line\n")


def test_the_command_line_does_not_load_the_service_to_show_status():
    """Issue 13 (scale): `status` and `users` start without importing the listeners and aiohttp
    (most of a command's start-up before); `serve` imports them when it runs."""
    import subprocess
    import sys
    probe = "import sys, relay.cli; print(sorted(m for m in ('relay.app', 'aiohttp') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
