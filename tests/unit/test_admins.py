"""Administrator accounts: their own passwd-format file, any domain, the same hashes as the
users' passwd-file, and the `admins` commands."""

from __future__ import annotations

import io
import logging
import os
import stat
import textwrap

import bcrypt
import pytest

from relay.addresses import parse_mailbox
from relay.admins import Admins
from relay.cli import main
from relay.config import load
from relay.directory import User, parse_line, verify_password
from relay.errors import DirectoryError


@pytest.fixture
def config_path(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent("""\
        listen: {inbound: "127.0.0.1:2525"}
        storage: {maildirs: maildirs, spool: spool}
        users_file: etc/users.passwd
        admins_file: etc/admins.passwd
        domains:
          example.com: {primary: "127.0.0.1:2526"}
        """))
    return path


@pytest.fixture
def admins(config_path):
    return Admins(load(config_path))


@pytest.fixture
def cheap(monkeypatch):
    """bcrypt at cost 4 instead of 12, for tests about anything but the cost."""
    real = bcrypt.gensalt
    monkeypatch.setattr(bcrypt, "gensalt", lambda rounds=12, prefix=b"2b": real(4, prefix))


def test_admins_in_their_own_file_in_passwd_format_any_domain(admins, config_path):
    admins.add("Root@Example.NET", "root pass 1")
    admins.add("ops@example.com", "ops pass 1")
    config = load(config_path)
    assert admins.file == config.admins_file == config_path.parent / "etc" / "admins.passwd"
    assert not config.users_file.exists()
    lines = admins.file.read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == ["ops@example.com", "root@example.net"]
    for line in lines:
        fields = line.split(":")
        assert len(fields) == 8 and fields[1].startswith("{BLF-CRYPT}$2b$12$") and fields[2:] == [""] * 6
    assert verify_password(parse_line(lines[1]).password_hash, "root pass 1")
    assert stat.S_IMODE(os.stat(admins.file).st_mode) == 0o600
    assert "root pass 1" not in admins.file.read_text()
    assert [a.email for a in admins.list()] == ["ops@example.com", "root@example.net"]


def test_argon2_scheme_is_used_when_configured(config_path):
    config_path.write_text(config_path.read_text() + "password_scheme: ARGON2ID\n")
    admins = Admins(load(config_path))
    assert admins.add("root@example.net", "root pass 1").password_hash.startswith("{ARGON2ID}$argon2id$")
    assert admins.verify("root@example.net", "root pass 1") is not None


def test_verify(cheap, admins):
    admins.add("root@example.net", "root pass 1")
    assert admins.verify("ROOT@example.net", "root pass 1").email == "root@example.net"
    assert admins.verify("root@example.net", "root pass 2") is None
    assert admins.verify("nobody@example.net", "root pass 1") is None
    assert admins.verify("not an address", "root pass 1") is None
    assert admins.verify("root@example.net", "") is None
    assert admins.verify("root@example.net", "root pass 1\n") is None


def test_a_deactivated_or_passwordless_line_cannot_log_in(cheap, admins):
    admins.add("root@example.net", "root pass 1")
    line = admins.file.read_text().rstrip("\n")
    admins.file.write_text(line + "nologin reason=deactivated\n" +
                           User(parse_mailbox("empty@example.net")).line() + "\n")
    assert admins.verify("root@example.net", "root pass 1") is None
    assert admins.verify("empty@example.net", "") is None


def test_set_password_and_refusals(cheap, admins):
    admins.add("root@example.net", "root pass 1")
    before = admins.file.read_bytes()
    with pytest.raises(DirectoryError, match="already an administrator"):
        admins.add("root@example.net", "other pass")
    with pytest.raises(DirectoryError, match="no such administrator"):
        admins.set_password("nobody@example.net", "other pass")
    with pytest.raises(DirectoryError):
        admins.add("../evil@example.net", "other pass")
    with pytest.raises(DirectoryError):
        admins.add("new@example.net", "")
    assert admins.file.read_bytes() == before
    admins.set_password("root@example.net", "root pass 2")
    assert admins.verify("root@example.net", "root pass 2") is not None
    assert admins.verify("root@example.net", "root pass 1") is None


def test_a_file_changed_by_another_process_is_read_again(cheap, admins, config_path):
    admins.add("root@example.net", "root pass 1")
    assert admins.get("root@example.net") is not None
    Admins(load(config_path)).add("second@example.net", "second pass")
    assert admins.get("second@example.net") is not None


def test_a_broken_line_is_logged_with_file_and_line_and_skipped(admins, caplog):
    """Issue 9.10: one bad line no longer takes every account down; it is logged and skipped."""
    admins.add("root@example.net", "root pass")
    admins.file.write_text("# comment\n\nno colons here\n" + admins.file.read_text())
    caplog.set_level(logging.INFO, logger="relay")
    assert [a.email for a in admins.list()] == ["root@example.net"]
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("directory.bad_line")]
    assert "admins.passwd" in line and " line=3 " in line


def test_no_file_no_admins(admins):
    assert admins.list() == [] and admins.get("root@example.net") is None
    assert admins.verify("root@example.net", "anything") is None


def test_rewrite_leaves_no_temporary_files(cheap, admins):
    for n in range(3):
        admins.add(f"a{n}@example.net", "some pass 1")
    assert sorted(os.listdir(admins.file.parent)) == ["admins.passwd", "admins.passwd.lock"]


# -- the commands --------------------------------------------------------------------------------

def test_cli_admins_commands(config_path, monkeypatch, capsys):
    c = ["-c", str(config_path)]
    monkeypatch.setattr("sys.stdin", io.StringIO("root pass 1\n"))
    assert main(["admins", "add", "Root@Example.net", "--password-stdin", *c]) == 0
    assert capsys.readouterr().out == "added administrator root@example.net\n"
    monkeypatch.setattr("sys.stdin", io.StringIO("root pass 2\n"))
    assert main(["admins", "passwd", "root@example.net", "--password-stdin", *c]) == 0
    assert capsys.readouterr().out == "password changed for administrator root@example.net\n"
    assert main(["admins", "list", *c]) == 0
    assert capsys.readouterr().out == "root@example.net\tactive\n"
    admins = Admins(load(config_path))
    assert admins.verify("root@example.net", "root pass 2") is not None
    assert "root pass" not in admins.file.read_text()


def test_cli_admins_exit_status(cheap, config_path, monkeypatch, capsys):
    c = ["-c", str(config_path)]
    monkeypatch.setattr("sys.stdin", io.StringIO("root pass 1\n"))
    assert main(["admins", "add", "root@example.net", "--password-stdin", *c]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("again pass\n"))
    assert main(["admins", "add", "root@example.net", "--password-stdin", *c]) == 1
    assert "already an administrator" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO("some pass\n"))
    assert main(["admins", "passwd", "nobody@example.net", "--password-stdin", *c]) == 1
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    assert main(["admins", "add", "new@example.net", "--password-stdin", *c]) == 2
    assert "no password on standard input" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:        # the password never comes from the command line
        main(["admins", "add", "new@example.net", *c])
    assert exc.value.code == 2
    assert main(["admins", "list", "-c", str(config_path.parent / "missing.yaml")]) == 2
    assert [a.email for a in Admins(load(config_path)).list()] == ["root@example.net"]
