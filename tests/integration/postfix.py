
"""Run a private, real Postfix 3.x instance for integration tests, in its own directory.

    mta = Postfix.sender(root, relay_port=relay.port)       # relays everything to the relay
    mta.start(); mta.submit("bob@sender.test", ["alice@example.com"], data)
    mta.wait_queue_empty(20)

    primary = Postfix.primary(root, mailboxes=["alice@example.com"], busy=["bob@example.com"])
    primary.start(); ...; primary.delivered("alice@example.com")  # bytes of each message

Layout under `root` (which must be reachable by the `postfix` user: mode 0711, not below
pytest's 0700 /tmp/pytest-of-root; use `make_shared_tmpdir` or the `mail_tmp_path` fixture):

    root/etc/      main.cf, master.cf and the lookup tables (texthash: needs no postmap)
    root/queue/    queue_directory: made here owned by root 0755; `postfix check` then makes its
                   subdirectories (postfix:root 0700, maildrop and public group postdrop)
    root/data/     data_directory (postfix:root 0700, made by Postfix)
    root/mail/     the primary's virtual_mailbox_base, owned by the mail user (default vmail)
    root/maillog   Postfix's log (maillog_file through the postlog service, Postfix 3.4+)
    root/master.out  what `postfix start-fg` wrote

Every Postfix command gets the absolute `-c root/etc` (a relative one is silently ignored and
the command would act on the system instance in /etc/postfix); nothing here reads or writes
/etc/postfix or listens anywhere but 127.0.0.1 on a port chosen by the test. The master runs
in the foreground as a child (`postfix -c DIR start-fg`), so stopping it reaps it too.
"""

from __future__ import annotations

import json
import os
import pwd
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import pytest

from tests.helpers import free_port

POSTFIX = "/usr/sbin/postfix"
POSTQUEUE = "/usr/sbin/postqueue"
SENDMAIL = "/usr/sbin/sendmail"
INSTALL_HINT = ("Install it with: DEBIAN_FRONTEND=noninteractive apt-get install -y postfix "
                "(scripts/test does; apt does not start the system instance here).")

START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
COMMAND_TIMEOUT = 30.0

# master.cf lines for every role: service type private unpriv chroot wakeup maxproc command.
# No chroot (the queue is in a temporary directory), one of each internal service.
BASE_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

# Leading trace headers a delivery through the primary adds (virtual(8) and smtpd).
TRACE_HEADERS = (b"return-path", b"x-original-to", b"delivered-to", b"received")


class PostfixError(RuntimeError):
    """Postfix is missing, refused its configuration, or did not start or stop."""


def require_postfix() -> str:
    """`mail_version` of the installed Postfix, or PostfixError naming how to install it."""
    if not os.access(POSTFIX, os.X_OK):
        raise PostfixError(f"{POSTFIX} not found. {INSTALL_HINT}")
    out = subprocess.run(["/usr/sbin/postconf", "-d", "-h", "mail_version"], capture_output=True,
                         text=True, timeout=COMMAND_TIMEOUT, check=False)
    version = out.stdout.strip()
    if out.returncode != 0 or not version.startswith("3."):
        raise PostfixError(f"need Postfix 3.x, postconf says {version!r} {out.stderr.strip()}")
    return version


def strip_trace(data: bytes) -> tuple[list[bytes], bytes]:
    """Split the leading trace header fields (Return-Path, X-Original-To, Delivered-To,
    Received, each with its folded lines) off a delivered message: (their names, the rest)."""
    names: list[bytes] = []
    rest = data
    while True:
        line_end = rest.find(b"\n")
        name = rest[:max(rest.find(b":"), 0)].strip().lower()
        if line_end < 0 or name not in TRACE_HEADERS:
            return names, rest
        end = line_end + 1
        while rest[end:end + 1] in (b" ", b"\t"):   # folded continuation lines
            end = rest.find(b"\n", end) + 1 or len(rest)
        names.append(name)
        rest = rest[end:]


class Postfix:
    """One private Postfix instance: write its configuration, start, stop, flush, read."""

    def __init__(self, root: Path, *, port: int | None = None, hostname: str = "postfix.localhost",
                 main: Mapping[str, str] | None = None, tables: Mapping[str, str] | None = None,
                 mail_user: str | None = None) -> None:
        self.root = Path(root).resolve()
        self.config_dir = self.root / "etc"
        self.queue_dir = self.root / "queue"
        self.data_dir = self.root / "data"
        self.mail_dir = self.root / "mail"
        self.maillog = self.root / "maillog"
        self.port = port if port is not None else free_port()
        self.hostname = hostname
        self.main = dict(main or {})
        self.tables = dict(tables or {})
        self.mail_user = mail_user
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    # -- roles -------------------------------------------------------------------------------

    @classmethod
    def sender(cls, root: Path, *, relay_port: int, tls_level: str = "may",
               ca_file: Path | None = None, port: int | None = None,
               extra: Mapping[str, str] | None = None) -> Postfix:
        """A sending MTA in front of the relay: takes mail from 127.0.0.0/8 on its own smtpd
        port (or `submit`/`sendmail`) and relays all of it to [127.0.0.1]:`relay_port`, with
        `smtp_tls_security_level = tls_level` (may: STARTTLS when offered, else plaintext;
        encrypt: never without TLS) and `ca_file` as smtp_tls_CAfile."""
        main = {"relayhost": f"[127.0.0.1]:{relay_port}",
                "smtp_tls_security_level": tls_level,
                "smtp_tls_loglevel": "1"}
        if ca_file is not None:
            main["smtp_tls_CAfile"] = str(Path(ca_file).resolve())
        main.update(extra or {})
        return cls(root, port=port, hostname="sender.localhost", main=main)

    @classmethod
    def primary(cls, root: Path, *, mailboxes: Iterable[str], busy: Iterable[str] = (),
                forbid_bare_newline: str | None = None, port: int | None = None,
                mail_user: str = "vmail", extra: Mapping[str, str] | None = None) -> Postfix:
        """A primary server behind the relay: takes mail for the domains of `mailboxes` on its
        smtpd port and delivers each to a Maildir under root/mail (virtual(8) as `mail_user`).
        Addresses in `busy` get `450 4.2.1 mailbox busy` at RCPT (check_recipient_access);
        `forbid_bare_newline` ("reject" or "normalize") sets smtpd_forbid_bare_newline for
        every client (no exclusions, loopback included)."""
        boxes = sorted(set(mailboxes))
        domains = sorted({address.rpartition("@")[2] for address in boxes})
        tables = {"vmailbox": "".join(f"{a} {a.rpartition('@')[2]}/{a.rpartition('@')[0]}/\n"
                                      for a in boxes),
                  "access": "".join(f"{a} 450 4.2.1 mailbox busy\n" for a in busy)}
        main = {"virtual_mailbox_domains": ", ".join(domains),
                "virtual_mailbox_maps": "texthash:{etc}/vmailbox",
                "virtual_mailbox_base": "{root}/mail",
                "smtpd_recipient_restrictions": "check_recipient_access texthash:{etc}/access",
                "smtpd_forbid_bare_newline_exclusions": ""}
        if forbid_bare_newline is not None:
            main["smtpd_forbid_bare_newline"] = forbid_bare_newline
        main.update(extra or {})
        return cls(root, port=port, hostname="primary.localhost", main=main, tables=tables,
                   mail_user=mail_user)

    # -- configuration ---------------------------------------------------------------------

    def _main_cf(self) -> str:
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": self.hostname,
            "mydomain": "localhost",
            "myorigin": "$myhostname",
            "mydestination": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtp_dns_support_level": "disabled",
            "smtpd_peername_lookup": "no",
            "smtputf8_enable": "yes",
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self.root),
            "biff": "no",
            # Add no Date/From/Message-ID and rewrite no header of a loopback SMTP client.
            "local_header_rewrite_clients": "",
            "alias_maps": "",
            "alias_database": "",
            # Retry soon: a test waits seconds, not the production minutes.
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "smtp_connect_timeout": "5s",
        }
        if self.mail_user is not None:
            uid, gid = self._mail_ids()
            settings.update(virtual_uid_maps=f"static:{uid}", virtual_gid_maps=f"static:{gid}")
        settings.update(self.main)
        values = {"etc": str(self.config_dir), "root": str(self.root)}
        return "".join(f"{key} = {value.format(**values)}\n" for key, value in settings.items())

    def _master_cf(self) -> str:
        return f"127.0.0.1:{self.port} inet n - n - - smtpd\n" + BASE_SERVICES

    def _mail_ids(self) -> tuple[int, int]:
        assert self.mail_user is not None
        try:
            entry = pwd.getpwnam(self.mail_user)
        except KeyError:
            raise PostfixError(f"no user {self.mail_user!r} to deliver mail as "
                               "(scripts/test creates vmail)") from None
        return entry.pw_uid, entry.pw_gid

    def write_config(self) -> None:
        """Write main.cf, master.cf and the tables, and make the directories Postfix needs."""
        self.root.mkdir(parents=True, exist_ok=True)
        for folder in (self.config_dir, self.queue_dir):
            folder.mkdir(mode=0o755, exist_ok=True)
        if self.mail_user is not None:
            uid, gid = self._mail_ids()
            self.mail_dir.mkdir(mode=0o755, exist_ok=True)
            os.chown(self.mail_dir, uid, gid)
        (self.config_dir / "main.cf").write_text(self._main_cf(), encoding="utf-8")
        (self.config_dir / "master.cf").write_text(self._master_cf(), encoding="utf-8")
        for name, text in self.tables.items():
            (self.config_dir / name).write_text(text, encoding="utf-8")

    def set_table(self, name: str, text: str) -> None:
        """Replace a lookup table (texthash, read when a process starts) and reload."""
        (self.config_dir / name).write_text(text, encoding="utf-8")
        self.tables[name] = text
        if self.running:
            self.command(POSTFIX, "reload")

    # -- commands --------------------------------------------------------------------------

    def command(self, program: str, *args: str, input: bytes | None = None,
                check: bool = True) -> subprocess.CompletedProcess[bytes]:
        """Run a Postfix command with this instance's absolute `-c` (sendmail's is -C)."""
        flag = "-C" if program == SENDMAIL else "-c"
        env = {k: v for k, v in os.environ.items() if k != "MAIL_CONFIG"}
        result = subprocess.run([program, flag, str(self.config_dir), *args], input=input,
                                capture_output=True, timeout=COMMAND_TIMEOUT, env=env, check=False)
        if check and result.returncode != 0:
            raise PostfixError(f"{program} {' '.join(args)} exited {result.returncode}: "
                               f"{result.stderr.decode(errors='replace')}\n{self.log_text()}")
        return result

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = START_TIMEOUT) -> Postfix:
        """Write the configuration, check it, and run the master until its smtpd greets."""
        if self.running:
            raise PostfixError(f"{self} already running")
        if not self.config_dir.joinpath("main.cf").exists():
            self.write_config()
        if not (self.queue_dir / "active").is_dir():
            self.command(POSTFIX, "check")   # makes the queue's subdirectories, with owners
        (self.queue_dir / "quick-start").touch()   # start-fg: skip checking all over again
        self._log_offset = self.maillog.stat().st_size if self.maillog.exists() else 0
        env = {k: v for k, v in os.environ.items() if k != "MAIL_CONFIG"}
        with (self.root / "master.out").open("ab") as out:
            self.proc = subprocess.Popen([POSTFIX, "-c", str(self.config_dir), "start-fg"],
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env)
        deadline = time.monotonic() + timeout
        while not self._greets():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise PostfixError(f"{self} did not start (status {self.proc.poll()}):\n"
                                   f"{self.log_text()}")
            time.sleep(0.05)
        return self

    def _greets(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
                if sock.recv(512).startswith(b"220"):
                    sock.sendall(b"QUIT\r\n")
                    return True
        except OSError:
            pass
        return False

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """`postfix stop`, then wait for the master (our child) to exit; SIGKILL after
        `timeout`. The queue stays as it is: starting again resumes it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.command(POSTFIX, "stop", check=False)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self.proc = None

    def flush(self) -> None:
        """`postqueue -f`: try every deferred message now."""
        self.command(POSTQUEUE, "-f")

    def queue(self) -> list[dict]:
        """`postqueue -j`: one JSON object per message still in the queue."""
        out = self.command(POSTQUEUE, "-j").stdout.decode("utf-8", "replace")
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def wait_queue_empty(self, seconds: float, explain: Callable[[], str] = lambda: "") -> None:
        """Poll `postqueue -j` until nothing is queued; fail the test after `seconds`."""
        deadline = time.monotonic() + seconds
        while True:
            left = self.queue()
            if not left:
                return
            if time.monotonic() > deadline:
                pytest.fail(f"{self}: queue not empty after {seconds:.0f}s: {left}\n{explain()}\n"
                            f"{self.log_text()}")
            time.sleep(0.1)

    def sendmail(self, sender: str, recipients: Iterable[str], data: bytes,
                 *options: str) -> None:
        """Inject through `sendmail -C DIR` (postdrop into maildrop/, then pickup)."""
        self.command(SENDMAIL, "-f", sender, *options, "--", *recipients, input=data)

    def log_text(self, all_runs: bool = False) -> str:
        """Postfix's log of this run (or all runs), and what the master wrote."""
        try:
            with self.maillog.open("rb") as handle:
                handle.seek(0 if all_runs else self._log_offset)
                text = handle.read().decode("utf-8", "replace")
        except FileNotFoundError:
            text = ""
        out = self.root / "master.out"
        extra = out.read_text(errors="replace") if out.exists() else ""
        return f"--- {self.maillog}:\n{text}" + (f"--- {out}:\n{extra}" if extra.strip() else "")

    # -- the primary's mailboxes -----------------------------------------------------------

    def maildir(self, address: str) -> Path:
        local, _, domain = address.rpartition("@")
        return self.mail_dir / domain / local

    def delivered(self, address: str) -> list[bytes]:
        """The bytes of every message delivered to `address`, oldest first. virtual(8)
        writes lines ending in LF and adds Return-Path, X-Original-To, Delivered-To and its
        Received header on top (see strip_trace)."""
        files = [p for sub in ("new", "cur") if (self.maildir(address) / sub).is_dir()
                 for p in (self.maildir(address) / sub).iterdir() if p.is_file()]
        return [p.read_bytes() for p in sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name))]

    def __repr__(self) -> str:
        return f"Postfix({self.config_dir}, port={self.port})"


@pytest.fixture
def postfix_factory() -> Iterator[Callable[..., Postfix]]:
    """`postfix_factory(Postfix.primary(root, mailboxes=[...]))` writes its configuration
    and returns it, not started (`.start()` when the test wants it up); every instance made
    is stopped at teardown. Postfix is required, never skipped: scripts/test installs it."""
    try:
        require_postfix()
    except PostfixError as exc:
        pytest.fail(str(exc), pytrace=False)
    made: list[Postfix] = []

    def factory(instance: Postfix) -> Postfix:
        instance.write_config()
        made.append(instance)
        return instance

    yield factory
    for instance in made:
        instance.stop()

