"""Start a real rspamd (Debian's package, 3.4) for integration tests, on loopback only.

Debian's /etc/rspamd stays the configuration (CONFDIR); the test instance gets its own
LOCAL_CONFDIR, DBDIR, RUNDIR and LOGDIR in a fresh directory (`rspamd --var=...`), whose
local.d/ and override.d/ files change what a test needs:

- the normal worker on a free loopback port, the controller on another one, the proxy off
  (the fuzzy worker is off in Debian's configuration already);
- rspamd's DNS resolver pointed at a loopback port where nothing answers, so every lookup
  (RBLs, SPF, DMARC, reverse DNS, the hosts of remote maps) fails at once and nothing leaves
  the machine;
- the modules that name remote servers in their configuration (fuzzy_check resolves
  fuzzy*.rspamd.com with the system resolver while loading) and those that only fetch remote
  maps, disabled. No redis is configured, so the statistics and redis modules stay idle.

rspamd runs as `_rspamd` (the package's user) in the foreground and is ready when the normal
worker answers `GET /ping`: loading and compiling its rules takes 10 to 40 s here.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT = 120.0
STOP_TIMEOUT = 10.0
USER = "_rspamd"
CONFIG = Path("/etc/rspamd/rspamd.conf")
INSTALL_HINT = "Install it with: DEBIAN_FRONTEND=noninteractive apt-get install -y rspamd"

# Modules that talk to named remote hosts or only fetch remote maps.
DISABLED = ("fuzzy_check", "rbl", "phishing", "multimap", "whitelist", "mid", "mime_types",
            "rspamd_update", "asn", "emails")

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


class RspamdError(RuntimeError):
    """rspamd is missing or did not start."""


@dataclass
class RspamdServer:
    process: subprocess.Popen
    workdir: Path
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        parts = []
        for path in (self.workdir / "log" / "rspamd.log", self.workdir / "rspamd.out"):
            try:
                parts.append(path.read_text(errors="replace")[-5000:])
            except FileNotFoundError:
                pass
        return "".join(parts)

    def stop(self) -> None:
        """SIGTERM the master (it stops its workers), SIGKILL the process group if it hangs."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=STOP_TIMEOUT)
        shutil.rmtree(self.workdir, ignore_errors=True)


def binary() -> str:
    found = shutil.which("rspamd") or shutil.which("rspamd", path="/usr/bin:/usr/sbin")
    if not found or not CONFIG.is_file():
        raise RspamdError(f"rspamd (and {CONFIG}) not found. {INSTALL_HINT}")
    try:
        pwd.getpwnam(USER)
    except KeyError:
        raise RspamdError(f"user {USER!r} missing: the rspamd package is not installed properly. "
                          f"{INSTALL_HINT}") from None
    return found


def _free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_config(workdir: Path, normal: int, controller: int, dns: int) -> None:
    local, override = workdir / "local.d", workdir / "override.d"
    for folder in (local, override, workdir / "db", workdir / "run", workdir / "log"):
        folder.mkdir()
    (local / "worker-normal.inc").write_text(f'bind_socket = "127.0.0.1:{normal}";\ncount = 1;\n')
    (override / "worker-controller.inc").write_text(f'bind_socket = "127.0.0.1:{controller}";\ncount = 1;\n')
    (override / "worker-proxy.inc").write_text('bind_socket = "127.0.0.1:0";\ncount = 0;\n')
    (local / "options.inc").write_text(
        f'dns {{ nameserver = ["127.0.0.1:{dns}"]; timeout = 0.2s; retransmits = 1; }}\n')
    (override / "logging.inc").write_text(
        f'type = "file";\nfilename = "{workdir}/log/rspamd.log";\nlevel = "notice";\n')
    for module in DISABLED:
        (override / f"{module}.conf").write_text("enabled = false;\n")


def _pongs(port: int) -> bool:
    """Whether the normal worker itself answers (the master binds the socket earlier)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2.0) as answer:
            return answer.read().strip() == b"pong"
    except OSError:
        return False


def start_rspamd(timeout: float = START_TIMEOUT, attempts: int = 3) -> RspamdServer:
    """A running rspamd whose normal worker listens on a free loopback port."""
    for attempt in range(1, attempts + 1):
        server = _launch(binary())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and server.process.poll() is None:
            if _pongs(server.port):
                return server
            time.sleep(0.2)
        exited = server.process.poll() is not None
        log = server.log_text()
        server.stop()
        if exited and "Address already in use" in log and attempt < attempts:
            continue  # lost the race for a free port: try other ports
        why = f"exited with status {server.process.returncode}" if exited else \
            f"did not answer on 127.0.0.1:{server.port} within {timeout:.0f} s"
        raise RspamdError(f"rspamd {why}; log:\n{log}")
    raise AssertionError("unreachable")


def _launch(program: str) -> RspamdServer:
    user = pwd.getpwnam(USER)
    workdir = Path(tempfile.mkdtemp(prefix="rspamd-test-"))
    normal, controller, dns = _free_port(), _free_port(), _free_port(socket.SOCK_DGRAM)
    _write_config(workdir, normal, controller, dns)
    for root, dirs, files in os.walk(workdir):
        for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
            os.chown(name, user.pw_uid, user.pw_gid)
    with open(workdir / "rspamd.out", "wb") as out:
        process = subprocess.Popen(
            [program, "-f", "-u", USER, "-g", USER, "-c", str(CONFIG),
             f"--var=LOCAL_CONFDIR={workdir}", f"--var=DBDIR={workdir}/db",
             f"--var=RUNDIR={workdir}/run", f"--var=LOGDIR={workdir}/log"],
            cwd=workdir, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    return RspamdServer(process, workdir, normal)
