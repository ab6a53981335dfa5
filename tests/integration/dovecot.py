"""Start a real Dovecot 2.3 for integration tests, from contrib/dovecot/dovecot.conf.

The test configuration is the production file with its two storage paths
substituted and a block of loopback-only overrides appended, so the tests
exercise what sysadmins install. Dovecot runs as root in the foreground
(`dovecot -F -c CONF`) and serves mail as the mail user (default ``vmail``).

Paths Dovecot must reach (Maildirs for the mail user, the passwd-file for the
``dovecot`` user in the mail user's group) must not sit below a mode-0700
directory such as pytest's ``/tmp/pytest-of-root``: use
:func:`make_shared_tmpdir` (or the ``mail_tmp_path`` fixture). start_dovecot
checks this and fails with an explanation instead of letting Dovecot log
"Permission denied" at the first login.
"""

from __future__ import annotations

import functools
import grp
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CONTRIB_CONF = REPO_ROOT / "contrib" / "dovecot" / "dovecot.conf"

# Spelled exactly as in contrib/dovecot/dovecot.conf.
PROD_MAILDIRS = "/var/lib/continuity-relay/maildirs"
PROD_USERS_FILE = "/etc/continuity-relay/users.passwd"

# Dovecot's internal user; the auth process (which reads the passwd-file)
# runs as this user, with the mail user's group as an extra group.
DOVECOT_INTERNAL_USER = "dovecot"

INSTALL_HINT = (
    "Install it with: DEBIAN_FRONTEND=noninteractive apt-get install -y "
    "dovecot-imapd dovecot-pop3d (Debian 12 ships 2.3.19)."
)

START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


class DovecotError(RuntimeError):
    """Dovecot is missing, has the wrong version, or did not start."""


# --------------------------------------------------------------------------- binary


def dovecot_binary() -> str:
    """Absolute path of the dovecot binary, or DovecotError."""
    found = shutil.which("dovecot") or shutil.which(
        "dovecot", path="/usr/sbin:/usr/local/sbin:/sbin"
    )
    if not found:
        raise DovecotError(f"dovecot not found on PATH. {INSTALL_HINT}")
    return found


@functools.cache
def dovecot_version(binary: str) -> str:
    """`dovecot --version`, checked to be 2.3.x (contrib config is 2.3 syntax)."""
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except OSError as exc:
        raise DovecotError(f"cannot run {binary} --version: {exc}") from exc
    version = out.stdout.strip()
    if out.returncode != 0 or not version:
        raise DovecotError(
            f"{binary} --version failed (exit {out.returncode}): {out.stderr.strip()}"
        )
    if not version.startswith("2.3."):
        raise DovecotError(
            f"{binary} --version is {version!r}, but contrib/dovecot/dovecot.conf is "
            "written for Dovecot 2.3.x (Debian 12). Dovecot 2.4 (Debian 13) uses a "
            f"different configuration syntax. {INSTALL_HINT}"
        )
    return version


def require_dovecot() -> str:
    """Binary path after checking it exists and is 2.3.x; DovecotError otherwise."""
    binary = dovecot_binary()
    dovecot_version(binary)
    return binary


# --------------------------------------------------------------------------- users, files


def mail_user_ids(mail_user: str = "vmail") -> tuple[int, int, str]:
    """(uid, gid, group name) of the mail user, or DovecotError."""
    try:
        pw = pwd.getpwnam(mail_user)
    except KeyError:
        raise DovecotError(
            f"mail user {mail_user!r} does not exist. Create it with: "
            "id vmail || useradd --system --uid 5000 --user-group "
            "--home-dir /nonexistent --shell /usr/sbin/nologin vmail"
        ) from None
    if pw.pw_uid == 0:
        raise DovecotError(f"mail user {mail_user!r} is uid 0: Dovecot never serves mail as root")
    return pw.pw_uid, pw.pw_gid, grp.getgrgid(pw.pw_gid).gr_name


def chown_tree(path: Path, user: str = "vmail") -> None:
    """chown `path` and everything below it (symlinks not followed) to user:group."""
    uid, gid, _ = mail_user_ids(user)
    path = Path(path)
    os.lchown(path, uid, gid)
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                os.lchown(os.path.join(root, name), uid, gid)


def make_shared_tmpdir(prefix: str = "continuity-test-") -> Path:
    """A fresh directory in the system temp dir, mode 0711, that Dovecot's
    non-root processes can traverse. The caller removes it (shutil.rmtree).

    Not below pytest's tmp_path: pytest creates /tmp/pytest-of-<user> with
    mode 0700 and every pytest session that starts (another engineer's, CI's)
    resets it to 0700, so a chmod there does not last."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(path, 0o711)
    return path


def _user_can(path: Path, uid: int, gids: Iterable[int], bit: str) -> bool:
    st = path.stat()
    mode = st.st_mode
    if uid == 0:
        return True
    if st.st_uid == uid:
        return bool(mode & getattr(stat, f"S_I{bit}USR"))
    if st.st_gid in gids:
        return bool(mode & getattr(stat, f"S_I{bit}GRP"))
    return bool(mode & getattr(stat, f"S_I{bit}OTH"))


def _check_reachable(target: Path, who: str, uid: int, gids: set[int], why: str) -> None:
    """Fail if `who` cannot search every existing directory down to `target`."""
    target = Path(target).resolve()
    for p in reversed((target, *target.parents)):
        if not p.exists():
            return  # created later (by the relay), chowned then
        if p.is_dir() and not _user_can(p, uid, gids, "X"):
            st = p.stat()
            raise DovecotError(
                f"{who} (uid {uid}) cannot enter {p} (mode {stat.S_IMODE(st.st_mode):04o}, "
                f"owner {st.st_uid}:{st.st_gid}), so Dovecot cannot {why}. Put test files "
                "under a directory every user can traverse (the mail_tmp_path fixture, or "
                "make_shared_tmpdir() in tests/integration/dovecot.py)."
            )


# --------------------------------------------------------------------------- config


def _replace_all(text: str, old: str, new: str, what: str) -> str:
    if old not in text:
        raise DovecotError(f"{CONTRIB_CONF}: expected {what} {old!r}, not found")
    return text.replace(old, new)


def build_config(
    *,
    maildirs: Path,
    users_file: Path,
    base_dir: Path,
    state_dir: Path,
    log_path: Path,
    imap_port: int,
    pop3_port: int,
    mail_user: str = "vmail",
) -> str:
    """The contrib config with test paths substituted and test overrides appended."""
    text = CONTRIB_CONF.read_text()
    text = _replace_all(text, PROD_MAILDIRS, str(maildirs), "maildirs path")
    text = _replace_all(text, PROD_USERS_FILE, str(users_file), "passwd-file path")

    # `ssl_cert = </path` is read while parsing, even with ssl = no: drop the
    # production certificate lines (TLS is off on loopback).
    text, n = re.subn(r"(?m)^(ssl_(?:cert|key|dh)\s*=\s*<.*)$", r"# test: \1", text)
    if n == 0:
        raise DovecotError(f"{CONTRIB_CONF}: no `ssl_cert = <...` lines found")

    uid, _gid, group = mail_user_ids(mail_user)
    if mail_user != "vmail" or group != "vmail":
        text = _replace_all(
            text, "uid=vmail gid=vmail", f"uid={mail_user} gid={group}", "userdb uid/gid"
        )
        text = _replace_all(
            text, "extra_groups = vmail", f"extra_groups = {group}", "auth extra_groups"
        )

    overrides = [
        "",
        "# ---------------------------------------------------------------- TEST ONLY",
        "# Appended by tests/integration/dovecot.py: later settings win.",
        f"base_dir = {base_dir}",
        f"state_dir = {state_dir}",
        f"log_path = {log_path}",
        "listen = 127.0.0.1",
        "ssl = no",
        "disable_plaintext_auth = no",
        # Refusal tests would otherwise wait 2 s per failed login ...
        "auth_failure_delay = 0",
    ]
    if uid < 500:
        overrides.append(f"first_valid_uid = {uid}")
    overrides += [
        "service imap-login {",
        f"  inet_listener imap {{\n    port = {imap_port}\n  }}",
        "  inet_listener imaps {\n    port = 0\n  }",
        "}",
        "service pop3-login {",
        f"  inet_listener pop3 {{\n    port = {pop3_port}\n  }}",
        "  inet_listener pop3s {\n    port = 0\n  }",
        "}",
        # ... and the anvil auth penalty would delay every login from 127.0.0.1
        # after a failure by 2, 4, ... 15 s. No socket = no penalty.
        "service anvil {",
        "  unix_listener anvil-auth-penalty {\n    mode = 0\n  }",
        "}",
        "",
    ]
    return text + "\n".join(overrides)


def _free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _greets(port: int, prefix: bytes) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
            s.settimeout(2.0)
            return s.recv(200).startswith(prefix)
    except OSError:
        return False


# --------------------------------------------------------------------------- process


@dataclass
class Dovecot:
    process: subprocess.Popen
    workdir: Path
    config_path: Path
    log_path: Path
    output_path: Path
    base_dir: Path
    imap_port: int
    pop3_port: int
    _stopped: bool = field(default=False, repr=False)

    def log_text(self) -> str:
        """Dovecot's log (log_path), plus anything it wrote to stdout/stderr."""
        parts = []
        for p in (self.log_path, self.output_path):
            try:
                parts.append(p.read_text(errors="replace"))
            except FileNotFoundError:
                pass
        return "".join(parts)

    def signal_stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()

    def stop(self) -> None:
        """SIGTERM the master (it stops its children; takes about 1 s), SIGKILL
        the whole process group if it hangs. Idempotent."""
        if self._stopped:
            return
        self.signal_stop()
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=STOP_TIMEOUT)
        self._stopped = True
        shutil.rmtree(self.base_dir.parent, ignore_errors=True)

    def __enter__(self) -> Dovecot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_all(dovecots: Iterable[Dovecot]) -> None:
    """Stop several instances in parallel (each master sleeps about 1 s on exit)."""
    dovecots = list(dovecots)
    for d in dovecots:
        d.signal_stop()
    for d in dovecots:
        d.stop()


def start_dovecot(
    workdir: Path,
    maildirs: Path,
    users_file: Path,
    mail_user: str = "vmail",
    *,
    timeout: float = START_TIMEOUT,
) -> Dovecot:
    """Start Dovecot serving `maildirs` with `users_file`; return once IMAP and
    POP3 both greet. Config, state and log live in a fresh directory under
    `workdir`; base_dir (sockets) in a short temp path (sun_path is 108 bytes)."""
    binary = require_dovecot()
    uid, gid, _group = mail_user_ids(mail_user)
    workdir, maildirs, users_file = Path(workdir), Path(maildirs), Path(users_file)

    mail_gids = set(os.getgrouplist(mail_user, gid))
    _check_reachable(maildirs, mail_user, uid, mail_gids, "open the Maildirs")
    try:
        dpw = pwd.getpwnam(DOVECOT_INTERNAL_USER)
    except KeyError:
        raise DovecotError(
            f"user {DOVECOT_INTERNAL_USER!r} missing: dovecot-core is not installed "
            f"properly. {INSTALL_HINT}"
        ) from None
    auth_gids = set(os.getgrouplist(DOVECOT_INTERNAL_USER, dpw.pw_gid)) | {gid}
    _check_reachable(
        users_file.parent, DOVECOT_INTERNAL_USER, dpw.pw_uid, auth_gids, "read the passwd-file"
    )

    workdir.mkdir(parents=True, exist_ok=True)
    attempts = 3
    for attempt in range(1, attempts + 1):
        inst = Path(tempfile.mkdtemp(prefix="dovecot-", dir=workdir))
        state_dir = inst / "state"
        state_dir.mkdir()
        sock_root = Path(tempfile.mkdtemp(prefix="dc-"))
        os.chmod(sock_root, 0o755)
        base_dir = sock_root / "run"
        log_path = inst / "dovecot.log"
        output_path = inst / "dovecot.out"
        imap_port, pop3_port = _free_ports(2)
        config_path = inst / "dovecot.conf"
        config_path.write_text(
            build_config(
                maildirs=maildirs,
                users_file=users_file,
                base_dir=base_dir,
                state_dir=state_dir,
                log_path=log_path,
                imap_port=imap_port,
                pop3_port=pop3_port,
                mail_user=mail_user,
            )
        )
        with open(output_path, "wb") as out:
            process = subprocess.Popen(
                [binary, "-F", "-c", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: killpg on a hang
            )
        dovecot = Dovecot(
            process=process,
            workdir=inst,
            config_path=config_path,
            log_path=log_path,
            output_path=output_path,
            base_dir=base_dir,
            imap_port=imap_port,
            pop3_port=pop3_port,
        )
        deadline = time.monotonic() + timeout
        imap_ok = pop3_ok = False
        while time.monotonic() < deadline and process.poll() is None:
            imap_ok = imap_ok or _greets(imap_port, b"* OK")
            pop3_ok = pop3_ok or _greets(pop3_port, b"+OK")
            if imap_ok and pop3_ok:
                return dovecot
            time.sleep(0.05)
        exited = process.poll() is not None
        dovecot.stop()
        log = dovecot.log_text()
        if exited and "Address already in use" in log and attempt < attempts:
            continue  # lost the race for a free port: try other ports
        if exited:
            why = f"exited with status {process.returncode}"
        else:
            why = (
                f"did not answer on IMAP {imap_port} (ok={imap_ok}) and POP3 "
                f"{pop3_port} (ok={pop3_ok}) within {timeout:.0f} s"
            )
        raise DovecotError(f"Dovecot {why}; config {config_path}; log:\n{log}")
    raise AssertionError("unreachable")
