"""contrib/dovecot/dovecot.conf serves the relay's on-disk layout.

Files are written here by hand, the way the relay writes them (Maildir++ with
CRLF messages, a Dovecot passwd-file with {BLF-CRYPT} and {ARGON2ID} hashes,
everything owned by vmail, dirs 0700 / files 0600), and read back through a
real Dovecot 2.3 with imaplib and poplib. No relay code is involved.
"""

from __future__ import annotations

import imaplib
import os
import poplib
import re
import shutil
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import argon2
import bcrypt
import pytest

try:
    from . import dovecot as dc
except ImportError:
    import dovecot as dc

pytestmark = pytest.mark.timeout(60)

DOMAIN = "example.com"
PASSWORDS = {
    "alice": "alice pässword 1",  # bcrypt; IMAP fetch + Outbox
    "paul": "paul-pw-2",  # bcrypt; POP3
    "carol": "carol-pw-3",  # argon2id; no folders on disk
    "dave": "dave-pw-4",  # bcrypt, deactivated (nologin)
    "zo\u00eb": "zoe-pw-5",  # bcrypt; a UTF-8 local part (SMTPUTF8)
}
ZOE = "zo\u00eb"

# 8-bit header and body, a line starting with "." (POP3 dot-stuffing), CRLF.
MESSAGE = (
    b"Return-Path: <sender@example.net>\r\n"
    b"Delivered-To: alice@example.com\r\n"
    b"Received: from mx.example.net (mx.example.net [192.0.2.1])\r\n"
    b"\tby relay.example.com; Tue, 28 Nov 2023 10:00:00 +0000\r\n"
    b"From: =?utf-8?q?J=C3=B6rg?= <sender@example.net>\r\n"
    b"To: Alice Smith <alice@example.com>\r\n"
    b"Subject: Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln\r\n"
    b"Date: Tue, 28 Nov 2023 10:00:00 +0000\r\n"
    b"Message-ID: <contrib-test-1@example.net>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"Gr\xc3\xbc\xc3\x9fe \xe2\x80\x93 8-bit body, \xe9 a lone Latin-1 byte.\r\n"
    b".a line starting with a dot\r\n"
    b"From the start of a line.  Trailing spaces   \r\n"
    b"\r\n"
)
MSG_KEY = "1700000000.M1P1Q1.contrib-test"


# --------------------------------------------------------------------------- files


def bcrypt_hash(password: str) -> str:
    return "{BLF-CRYPT}" + bcrypt.hashpw(password.encode(), bcrypt.gensalt(12)).decode()


def argon2_hash(password: str) -> str:
    return "{ARGON2ID}" + argon2.PasswordHasher().hash(password)


def write_passwd_file(path: Path, lines: list[str], mail_user: str = "vmail") -> None:
    """Atomically replace the passwd-file, as the relay should: temp file,
    fsync, vmail:vmail 0640, rename, fsync(dir). Dovecot 2.3 reloads it only when
    mtime (whole seconds) or size changed, so push mtime past the old one."""
    uid, gid, _ = dc.mail_user_ids(mail_user)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        os.write(fd, "".join(line + "\n" for line in lines).encode())
        os.fchmod(fd, 0o640)
        os.fchown(fd, uid, gid)
        try:
            old = int(path.stat().st_mtime)
        except FileNotFoundError:
            old = 0
        stamp = max(time.time(), old + 1)
        os.utime(fd, (stamp, stamp))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def mkdirs_0700(path: Path) -> Path:
    """mkdir -p with mode 0700 on every directory created (umask-proof)."""
    if not path.is_dir():
        mkdirs_0700(path.parent)
        path.mkdir()
        path.chmod(0o700)
    return path


def make_maildir(root: Path, folders: tuple[str, ...] = ()) -> Path:
    for sub in ("cur", "new", "tmp"):
        mkdirs_0700(root / sub)
    for folder in folders:
        for sub in ("cur", "new", "tmp"):
            mkdirs_0700(root / f".{folder}" / sub)
        marker = root / f".{folder}" / "maildirfolder"
        marker.touch()
        marker.chmod(0o600)
    return root


def put_message(maildir: Path, key: str, data: bytes) -> Path:
    path = maildir / "new" / key
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def find_message(maildir: Path, key: str) -> list[Path]:
    """Every file for `key` in new/ or cur/ (Dovecot renames it to cur/key:2,FLAGS)."""
    return [
        p
        for sub in ("new", "cur")
        for p in (maildir / sub).iterdir()
        if p.name == key or p.name.startswith(key + ":")
    ]


@dataclass
class World:
    dovecot: dc.Dovecot
    maildirs: Path
    users_file: Path

    def maildir(self, user: str) -> Path:
        return self.maildirs / DOMAIN / user


@pytest.fixture(scope="module")
def world():
    """One Dovecot for the module (starting and stopping costs about 2 s)."""
    try:
        dc.require_dovecot()
    except dc.DovecotError as exc:
        pytest.fail(str(exc), pytrace=False)

    base = dc.make_shared_tmpdir("continuity-contrib-")
    try:
        maildirs, users_file = _populate(base)
        try:
            dovecot = dc.start_dovecot(base / "work", maildirs, users_file)
        except dc.DovecotError as exc:
            pytest.fail(str(exc), pytrace=False)
        try:
            yield World(dovecot, maildirs, users_file)
        finally:
            dovecot.stop()
        bad = [
            line
            for line in dovecot.log_text().splitlines()
            if re.search(r": (Error|Fatal|Panic):", line)
        ]
        assert not bad, "Dovecot logged errors:\n" + "\n".join(bad)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _populate(base: Path) -> tuple[Path, Path]:
    """The relay's layout, by hand: passwd-file and Maildirs owned by vmail."""
    maildirs = base / "maildirs"
    etc = base / "etc"
    etc.mkdir()
    etc.chmod(0o750)
    users_file = etc / "users.passwd"
    write_passwd_file(
        users_file,
        [
            f"alice@{DOMAIN}:{bcrypt_hash(PASSWORDS['alice'])}:::Alice Smith:::",
            f"paul@{DOMAIN}:{bcrypt_hash(PASSWORDS['paul'])}:::Paul:::",
            # with an alternate address in the shell field, as `users set --alternate` writes
            # it (relay/directory.py): Dovecot still takes the line, and logs no error for it
            f"carol@{DOMAIN}:{argon2_hash(PASSWORDS['carol'])}:::Carol Zoë Weiß::carol@home.example.net:",
            f"bob@{DOMAIN}::::Bob:::",  # registered, no password yet
            f"dave@{DOMAIN}:{bcrypt_hash(PASSWORDS['dave'])}:::Dave:::nologin reason=deactivated",
            f"{ZOE}@{DOMAIN}:{bcrypt_hash(PASSWORDS[ZOE])}:::Zoe:::",
        ],
    )
    mkdirs_0700(maildirs)
    for user in ("alice", "paul"):
        put_message(make_maildir(maildirs / DOMAIN / user, ("Sent", "Outbox")), MSG_KEY, MESSAGE)
    put_message(make_maildir(maildirs / DOMAIN / "carol"), MSG_KEY, MESSAGE)
    put_message(make_maildir(maildirs / DOMAIN / "zo\u00eb"), MSG_KEY, MESSAGE)
    for user in ("bob", "dave"):
        make_maildir(maildirs / DOMAIN / user, ("Sent", "Outbox"))
    dc.chown_tree(maildirs)
    dc.chown_tree(etc)
    return maildirs, users_file


# --------------------------------------------------------------------------- clients


def imap(world: World, user: str, password: str) -> imaplib.IMAP4:
    client = imaplib.IMAP4("127.0.0.1", world.dovecot.imap_port, timeout=15)
    try:
        if (user + password).isascii():
            client.login(user, password)
        else:  # imaplib's LOGIN is ASCII-only; clients use AUTHENTICATE PLAIN (UTF-8)
            sasl = f"\0{user}\0{password}".encode()
            client.authenticate("PLAIN", lambda _challenge: sasl)
    except BaseException:
        client.shutdown()
        raise
    return client


def pop3(world: World, user: str, password: str) -> poplib.POP3:
    client = poplib.POP3("127.0.0.1", world.dovecot.pop3_port, timeout=15)
    try:
        client.user(user)
        client.pass_(password)
    except BaseException:
        client.close()
        raise
    return client


def fetch_body(client: imaplib.IMAP4, num: bytes = b"1") -> tuple[bytes, int]:
    typ, data = client.fetch(num, "(RFC822.SIZE BODY.PEEK[])")
    assert typ == "OK", data
    head, body = data[0]
    size = int(re.search(rb"RFC822\.SIZE (\d+)", head).group(1))
    return body, size


# --------------------------------------------------------------------------- tests


def test_imap_fetch_returns_the_file_bytes_in_new_and_after_select_in_cur(world: World) -> None:
    maildir = world.maildir("alice")
    assert [p.parent.name for p in find_message(maildir, MSG_KEY)] == ["new"]

    client = imap(world, f"alice@{DOMAIN}", PASSWORDS["alice"])
    try:
        typ, data = client.select("INBOX", readonly=True)  # EXAMINE
        assert (typ, data) == ("OK", [b"1"])
        body, size = fetch_body(client)
        assert body == MESSAGE
        assert size == len(MESSAGE)
    finally:
        client.logout()

    client = imap(world, f"alice@{DOMAIN}", PASSWORDS["alice"])
    try:
        assert client.select("INBOX") == ("OK", [b"1"])
        (moved,) = find_message(maildir, MSG_KEY)
        assert moved.parent.name == "cur"
        assert moved.name.startswith(MSG_KEY + ":2,")
        body, size = fetch_body(client)
        assert body == MESSAGE
        assert size == len(MESSAGE)
        assert moved.read_bytes() == MESSAGE  # Dovecot renames, never rewrites
    finally:
        client.logout()


def test_pop3_retr_returns_the_file_bytes(world: World) -> None:
    client = pop3(world, f"paul@{DOMAIN}", PASSWORDS["paul"])
    try:
        assert client.stat() == (1, len(MESSAGE))
        resp, lines, octets = client.retr(1)
        assert resp.startswith(b"+OK")
        # poplib strips CRLF and undoes dot-stuffing; put the CRLFs back.
        assert b"".join(line + b"\r\n" for line in lines) == MESSAGE
    finally:
        client.quit()
    (path,) = find_message(world.maildir("paul"), MSG_KEY)
    assert path.read_bytes() == MESSAGE


@pytest.mark.parametrize(
    ("login", "password"),
    [
        (f"alice@{DOMAIN}", PASSWORDS["alice"]),  # {BLF-CRYPT}, non-ASCII password
        (f"carol@{DOMAIN}", PASSWORDS["carol"]),  # {ARGON2ID}
        (f"Carol@{DOMAIN.upper()}", PASSWORDS["carol"]),  # %Lu: same user, same Maildir
    ],
)
def test_both_hash_schemes_log_in_over_imap_and_pop3(
    world: World, login: str, password: str
) -> None:
    client = imap(world, login, password)
    try:
        typ, data = client.status("INBOX", "(MESSAGES)")
        assert typ == "OK"
        assert b"(MESSAGES 1)" in data[0]
    finally:
        client.logout()
    box = pop3(world, login, password)
    try:
        assert box.stat()[0] == 1
    finally:
        box.quit()


REFUSED = [
    pytest.param(f"alice@{DOMAIN}", "wrong password", None, id="wrong-password"),
    pytest.param(f"bob@{DOMAIN}", "", None, id="no-password-empty"),
    pytest.param(f"bob@{DOMAIN}", "anything", None, id="no-password-any"),
    pytest.param(f"dave@{DOMAIN}", PASSWORDS["dave"], b"deactivated", id="nologin"),
    pytest.param(f"nobody@{DOMAIN}", "anything", None, id="unknown-user"),
]


@pytest.mark.parametrize(("login", "password", "reason"), REFUSED)
def test_imap_refuses(world: World, login: str, password: str, reason: bytes | None) -> None:
    with pytest.raises(imaplib.IMAP4.error) as refused:
        imap(world, login, password).logout()
    if reason:  # refused by `nologin`, after the correct password
        assert reason in str(refused.value).encode()


@pytest.mark.parametrize(("login", "password", "reason"), REFUSED)
def test_pop3_refuses(world: World, login: str, password: str, reason: bytes | None) -> None:
    with pytest.raises(poplib.error_proto) as refused:
        pop3(world, login, password).quit()
    assert str(refused.value).startswith("b'-ERR")
    if reason:
        assert reason in str(refused.value).encode()


@pytest.mark.parametrize("user", ["alice", "carol"])  # .Outbox on disk / auto = create
def test_imap_append_to_outbox_lands_in_outbox_dir(world: World, user: str) -> None:
    message = (
        f"From: {user}@{DOMAIN}\r\nTo: someone@example.org\r\n"
        f"Subject: from the Outbox ({user})\r\nMessage-ID: <outbox-{user}@example.com>\r\n"
        "\r\nSend me, please. \u00e9\r\n"
    ).encode()
    client = imap(world, f"{user}@{DOMAIN}", PASSWORDS[user])
    try:
        typ, data = client.append("Outbox", None, None, message)
        assert typ == "OK", data
    finally:
        client.logout()
    outbox = world.maildir(user) / ".Outbox"
    files = [p for sub in ("new", "cur") for p in (outbox / sub).iterdir()]
    assert len(files) == 1
    assert files[0].read_bytes() == message
    st = files[0].stat()
    assert st.st_uid == dc.mail_user_ids()[0]
    # Dovecot derives file modes from the Maildir's directory mode (0700 here).
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert (outbox / "maildirfolder").exists()


@pytest.mark.parametrize("user", ["alice", "carol"])  # .Sent on disk / auto = subscribe
def test_sent_and_outbox_folders_exist(world: World, user: str) -> None:
    client = imap(world, f"{user}@{DOMAIN}", PASSWORDS[user])
    try:
        typ, listing = client.list()
        assert typ == "OK"
        folders = {}
        for line in listing:
            m = re.match(rb'\((?P<flags>[^)]*)\) "\." (?P<name>.+)$', line)
            assert m, line
            folders[m["name"].strip(b'"')] = m["flags"].split()
        assert b"\\Sent" in folders[b"Sent"]
        assert b"Outbox" in folders
        assert b"INBOX" in folders
        typ, subscribed = client.lsub()
        assert typ == "OK"
        assert any(line.endswith(b" Sent") for line in subscribed)
        assert client.select("Sent")[0] == "OK"
    finally:
        client.logout()


def test_factory_and_atomic_passwd_file_rewrite(dovecot_factory, mail_tmp_path: Path) -> None:
    """A Dovecot from the dovecot_factory fixture picks up passwd-file changes
    made by rename (password change, deactivation) without a reload."""
    maildirs = mkdirs_0700(mail_tmp_path / "maildirs")
    make_maildir(maildirs / DOMAIN / "erin")
    dc.chown_tree(maildirs)
    users_file = mail_tmp_path / "users.passwd"
    write_passwd_file(users_file, [f"erin@{DOMAIN}:{bcrypt_hash('first')}:::Erin:::"])
    dovecot = dovecot_factory(mail_tmp_path / "work", maildirs, users_file)
    world = World(dovecot, maildirs, users_file)

    imap(world, f"erin@{DOMAIN}", "first").logout()

    # Same size (bcrypt hashes are all 60 chars), written within the same second.
    write_passwd_file(users_file, [f"erin@{DOMAIN}:{bcrypt_hash('second')}:::Erin:::"])
    # Dovecot stats the file at most once per second: allow for that.
    deadline = time.monotonic() + 5
    while True:
        try:
            imap(world, f"erin@{DOMAIN}", "second").logout()
            break
        except imaplib.IMAP4.error:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)
    with pytest.raises(imaplib.IMAP4.error):
        imap(world, f"erin@{DOMAIN}", "first")

    write_passwd_file(
        users_file,
        [f"erin@{DOMAIN}:{bcrypt_hash('second')}:::Erin:::nologin reason=deactivated"],
    )
    time.sleep(1.1)
    with pytest.raises(imaplib.IMAP4.error, match="deactivated"):
        imap(world, f"erin@{DOMAIN}", "second")
    assert "Password mismatch" in dovecot.log_text()


def test_production_config_is_valid_with_tls(tmp_path: Path) -> None:
    """The file as shipped (ssl = required, certificate paths, ports 143/993/110/995)
    parses as Dovecot 2.3 once the certificate files exist."""
    try:
        dc.require_dovecot()
    except dc.DovecotError as exc:
        pytest.fail(str(exc), pytrace=False)
    doveconf, openssl = shutil.which("doveconf"), shutil.which("openssl")
    assert doveconf and openssl, "doveconf (dovecot-core) and openssl are needed"
    cert, key = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-subj", "/CN=localhost", "-days", "1", "-keyout", key, "-out", cert],
        check=True, capture_output=True,
    )  # fmt: skip
    text = dc.CONTRIB_CONF.read_text()
    for prod, test in (("/etc/continuity-relay/tls/fullchain.pem", cert),
                       ("/etc/continuity-relay/tls/privkey.pem", key)):  # fmt: skip
        assert f"<{prod}\n" in text
        text = text.replace(prod, str(test))
    conf = tmp_path / "dovecot.conf"
    conf.write_text(text)

    def setting(name: str) -> str:
        # -x expands `<file` values: fails if a certificate file cannot be read.
        out = subprocess.run([doveconf, "-x", "-c", conf, "-h", name], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    assert setting("ssl") == "required"
    assert setting("disable_plaintext_auth") == "yes"
    assert setting("mail_location") == f"maildir:{dc.PROD_MAILDIRS}/%d/%n"
    assert setting("mail_save_crlf") == "yes"
    assert dc.PROD_USERS_FILE in setting("passdb/0/args")
    assert setting("ssl_cert").startswith("-----BEGIN CERTIFICATE-----")
    assert setting("ssl_min_protocol") == "TLSv1.2"


def test_helper_refuses_other_dovecot_versions(tmp_path: Path) -> None:
    fake = tmp_path / "dovecot"
    fake.write_text("#!/bin/sh\necho '2.4.1-4 (7d8c0e5759)'\n")
    fake.chmod(0o755)
    with pytest.raises(dc.DovecotError, match=r"2\.3\.x.*2\.4"):
        dc.dovecot_version(str(fake))


def test_helper_explains_unreachable_maildirs(tmp_path: Path) -> None:
    """pytest's tmp_path sits below /tmp/pytest-of-root (0700): vmail cannot enter it."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    with pytest.raises(dc.DovecotError, match="mail_tmp_path"):
        dc.start_dovecot(tmp_path / "work", private / "maildirs", private / "users.passwd")


def test_a_utf8_user_logs_in_over_imap_and_pop3(world: World) -> None:
    """Found in interop: Dovecot's default auth_username_chars refused "zoë@example.com"
    ("Username character disallowed") while the relay had registered and served it."""
    user = f"zo\u00eb@{DOMAIN}"
    client = imap(world, user, PASSWORDS["zo\u00eb"])
    try:
        assert client.select("INBOX")[0] == "OK"
        body, _size = fetch_body(client)
        assert body == MESSAGE
    finally:
        client.logout()
    mailbox = pop3(world, user, PASSWORDS["zo\u00eb"])
    try:
        assert mailbox.stat()[0] == 1
    finally:
        mailbox.quit()
    assert "Username character disallowed" not in world.dovecot.log_text()
