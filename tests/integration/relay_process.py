
"""Run the real relay (`python -m relay serve -c CONFIG`) as a child process, for integration tests.

    cfg = write_config(tmp_path, primary_port=free_port())
    import_users(cfg, ["alice@example.com", "bob@example.com"])
    with RelayProcess(cfg) as relay:        # started, listening, stopped with SIGTERM at the end
        smtplib.SMTP(*relay.address) ...
        relay.kill()                         # SIGKILL, as a crash
        relay.start()                        # recovery rescan, listening again

The child is the real process a sysadmin runs: same command line, its own interpreter, its
stderr (and stdout) appended to `<workdir>/relay.log`; `log_text()` returns what the current
run wrote. When the test session runs with `python -X dev`, the child runs in development mode
too (asyncio debug mode: a callback blocking the loop is logged as a warning in that log).

`write_config` writes a loopback configuration in the documented format: relative paths
(`maildirs`, `spool`, `users.passwd`) that the relay resolves against the config's folder, and
a continuity subscription around today's date, so it stays active whenever the tests run.
"""

from __future__ import annotations

import csv
import datetime as dt
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from tests.helpers import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]

HOSTNAME = "relay.localhost"
DOMAIN = "example.com"
CONFIG_NAME = "config.yaml"
LOG_NAME = "relay.log"
READY_EVENT = "inbound.listening"

START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
CLI_TIMEOUT = 60.0


class RelayProcessError(RuntimeError):
    """The relay did not start, or exited when it should not have."""


# --------------------------------------------------------------------------- configuration


def subscription(today: dt.date | None = None) -> dict[str, str]:
    """A continuity subscription (over 12 months) that is active on `today`."""
    today = today or dt.date.today()
    return {"since": dt.date(today.year - 1, 1, 1).isoformat(),
            "until": dt.date(today.year + 1, 12, 31).isoformat()}


def domain_entry(primary_port: int, *, continuity: bool = True) -> dict[str, Any]:
    """One `domains.<name>` body: a primary on 127.0.0.1 with short timeouts."""
    body: dict[str, Any] = {"primary": {"address": f"127.0.0.1:{primary_port}",
                                        "connect_timeout": "2s", "timeout": "5s"}}
    if continuity:
        body["continuity"] = subscription()
    return body


def write_config(dir: Path | str, *, primary_port: int, inbound_port: int | None = None,
                 owner: str | None = None,
                 extra_domains: Mapping[str, int | Mapping[str, Any]] | None = None) -> Path:
    """Write `<dir>/config.yaml` for a relay serving `example.com` (primary on 127.0.0.1:
    `primary_port`, continuity active) and return its path.

    `inbound_port` defaults to a free port. `owner` is `storage.owner` (e.g. "vmail" when a
    Dovecot must read the Maildirs). `extra_domains` maps more domain names to either a primary
    port (same shape as example.com) or a complete `domains.<name>` mapping.
    """
    folder = Path(dir)
    folder.mkdir(parents=True, exist_ok=True)
    if inbound_port is None:
        inbound_port = free_port(avoid=[primary_port])
    domains: dict[str, Any] = {DOMAIN: domain_entry(primary_port)}
    for name, body in (extra_domains or {}).items():
        domains[name] = domain_entry(body) if isinstance(body, int) else dict(body)
    config = {
        "hostname": HOSTNAME,
        "listen": {"inbound": f"127.0.0.1:{inbound_port}", "metrics": None},   # never the shared 9125
        "storage": {"maildirs": "maildirs", "spool": "spool", "owner": owner},
        "users_file": "users.passwd",
        "domains": domains,
    }
    path = folder / CONFIG_NAME
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = str(text).strip().rpartition(":")
    return host.strip("[]"), int(port)


def _child_env(dev_mode: bool | None = None) -> dict[str, str]:
    """The environment for a child interpreter: this checkout's `relay` package first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if dev_mode is None:
        dev_mode = bool(sys.flags.dev_mode)
    if dev_mode:
        env["PYTHONDEVMODE"] = "1"
    else:
        env.pop("PYTHONDEVMODE", None)
    return env


# --------------------------------------------------------------------------- command line


def run_cli(cfg: Path | str, *args: str | os.PathLike[str], stdin: str | None = None,
            timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """`python -m relay ARGS... -c CFG` (the config option goes after the command's own name,
    as the CLI documents); never raises on a non-zero exit status: check `.returncode`."""
    command = [sys.executable, "-m", "relay", *map(str, args), "-c", str(cfg)]
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=timeout,
                          cwd=Path(cfg).parent, env=_child_env(dev_mode=False), check=False)


def import_users(cfg: Path | str, emails: Iterable[str]) -> subprocess.CompletedProcess[str]:
    """Register users (no passwords) with `users import`; raises RelayProcessError on failure."""
    folder = Path(cfg).parent
    csv_path = folder / "users-import.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["email", "name"])
        for email in emails:
            writer.writerow([email, email.split("@")[0].title()])
    result = run_cli(cfg, "users", "import", csv_path)
    if result.returncode != 0:
        raise RelayProcessError(f"users import failed ({result.returncode}):\n"
                                f"{result.stdout}{result.stderr}")
    return result


# --------------------------------------------------------------------------- the process


class RelayProcess:
    """The relay as a child process: start, kill (SIGKILL), stop (SIGTERM), start again."""

    def __init__(self, config: Path | str, *, log_path: Path | str | None = None,
                 dev_mode: bool | None = None, wrapper: Iterable[str] = ()) -> None:
        self.config = Path(config).resolve()
        self.wrapper = list(wrapper)   # a command the relay runs under, e.g. prlimit ... --
        self.workdir = self.config.parent
        self.log_path = Path(log_path) if log_path is not None else self.workdir / LOG_NAME
        self.dev_mode = dev_mode
        raw = yaml.safe_load(self.config.read_text(encoding="utf-8")) or {}
        self.host, self.port = _hostport(raw["listen"]["inbound"])
        storage = raw.get("storage") or {}
        self.maildirs = self._resolve(storage.get("maildirs", "maildirs"))
        self.spool = self._resolve(storage.get("spool", "spool"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._log_offset = 0

    def _resolve(self, value: str) -> Path:
        path = Path(value)
        return path if path.is_absolute() else (self.workdir / path).resolve()

    # -- state ----------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def log_text(self, all_runs: bool = False) -> str:
        """What the relay wrote to stderr/stdout during the current (or last) run; with
        `all_runs`, the whole log file including earlier runs."""
        try:
            with self.log_path.open("rb") as handle:
                handle.seek(0 if all_runs else self._log_offset)
                return handle.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    # -- life cycle -----------------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> RelayProcess:
        """Start `python -m relay serve -c CONFIG` and wait until it listens and greets."""
        if self.running:
            raise RelayProcessError(f"relay already running (pid {self.pid})")
        self.starts += 1
        command = [*self.wrapper, sys.executable, "-m", "relay", "serve", "-c", str(self.config)]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"---- start {self.starts}: {' '.join(command)}\n".encode())
            log.flush()
            self._log_offset = log.tell()
            self.proc = subprocess.Popen(command, cwd=self.workdir, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         env=_child_env(self.dev_mode))
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            status = self.returncode
            if status is not None:
                raise RelayProcessError(self._explain(f"relay exited with status {status} "
                                                      f"before listening"))
            if READY_EVENT in self.log_text() and self._greets():
                return
            if time.monotonic() > deadline:
                self.kill()
                raise RelayProcessError(self._explain(
                    f"relay not ready on {self.host}:{self.port} after {timeout:.0f}s "
                    f"(no {READY_EVENT!r} line and SMTP greeting)"))
            time.sleep(0.05)

    def _greets(self) -> bool:
        """The inbound port accepts and answers with a 220 greeting."""
        try:
            with socket.create_connection(self.address, timeout=2) as sock:
                banner = sock.recv(512)
                if banner.startswith(b"220"):
                    sock.sendall(b"QUIT\r\n")
                    return True
        except OSError:
            pass
        return False

    def _explain(self, what: str) -> str:
        return f"{what}; command log {self.log_path}:\n{self.log_text() or '(empty)'}"

    def kill(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGKILL, as a crash or power loss would; returns the exit status (-9)."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            return self.proc.wait(timeout)
        return None

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM (a clean shutdown), then SIGKILL if it has not exited after `timeout`."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return self.kill()
        return self.returncode

    def __enter__(self) -> RelayProcess:
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"RelayProcess({self.config}, pid={self.pid}, port={self.port})"


def stop_or_dump(relay: RelayProcess, timeout: float = STOP_TIMEOUT) -> tuple[int | None, str]:
    """SIGTERM, as `RelayProcess.stop` does; when the relay has not exited after `timeout`,
    SIGABRT, so that faulthandler (PYTHONFAULTHANDLER, set by the caller) writes every thread's
    stack to the log: the exit status, and the log of this run."""
    if not relay.running or relay.proc is None:
        return relay.returncode, relay.log_text()
    relay.proc.send_signal(signal.SIGTERM)
    try:
        return relay.proc.wait(timeout), relay.log_text()
    except subprocess.TimeoutExpired:
        relay.proc.send_signal(signal.SIGABRT)
        try:
            relay.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            relay.kill()
        return None, relay.log_text()
