"""Scale: `status`, start-up and the recipient lookup with 10,000 users and 100,000 queued messages.

Issue 13's goals: `continuity-relay status` and start-up (`serve` until it accepts on the
inbound port, and until READY=1) with 100,000 queued messages across 10,000 users take at most
2 s each, at a cost that follows what is pending, not the history; the recipient lookup stays
O(1) with 10,000 users while the passwd-file changes.

The state is made directly, in the on-disk layout `ContinuityStore.keep` leaves (README "On
disk", docs/architecture.md): for each message a Maildir file in the user's new/ with the trace
headers on top, the same file hard-linked as the replay queue's msg/<id>, and its envelope
(`Envelope.to_bytes`) as waiting/<id>; the ids come from `Queue.new_id` and the Maildir names
from `MaildirStore.unique_name`. Nothing is fsync'd while filling (the bench measures reading,
not the disk's write rate). USERS users (no passwords: valid, they just log in nowhere) are
spread over DOMAINS domains, each with its subscription active and its primary on a closed port.

Then the history, which must not change what `status` and start-up cost: HISTORY entries in
failed/ (each with its Maildir copy, read, in cur/) and HISTORY more old messages in the
Maildirs' cur/ (mail delivered long ago, no queue entry).

What is timed, each the median of `--repeat` runs (page cache warm: the fill just wrote it):

  status      `continuity-relay status -c CONFIG` from start to exit (Python's start-up
              included), and the same status model built in-process (`domain_status` per
              domain, as the CLI, the panel and the metrics do)
  start-up    `continuity-relay serve` until the inbound port accepts a connection, and until
              READY=1 reaches $NOTIFY_SOCKET (a socket of the bench's); then SIGTERM
  lookup      in-process: `Directory.is_known` per call over the USERS users, while another
              thread rewrites the passwd-file in a loop (`Directory.add`, what the CLI does) and
              a third calls `refresh()` every second, as serve does; and the time one
              `refresh()` takes to pick up a changed file
  RCPT        over SMTP against `serve` (primary down, so the user's registration decides):
              latency per RCPT TO of a registered user, quiet passwd-file vs rewritten in a loop

each printed against its goal. Timings on a shared machine move: compare within one run.

Usage: .venv/bin/python bench/scale.py [--users 10000] [--domains 100] [--messages 100000]
       [--history 100000] [--repeat 3] [--rcpts 3000] [--keep] [--profile-status FILE]
Exit status 0 when every step ran (goals missed are printed, not an error), 1 on a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import resource
import shutil
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from relay.addresses import Mailbox, parse_mailbox
from relay.config import load as load_config
from relay.directory import Directory, User
from relay.storage.continuity import replay_queue_path, trace_headers
from relay.storage.maildir import FOLDERS, MaildirStore
from relay.storage.queue import Envelope, Queue
from relay.storage.state import domain_status

RELAY = Path(sys.executable).parent / "continuity-relay"
SENDER = "bench@example.org"
GOAL_SECONDS = 2.0
BODY = b"Subject: scale bench\r\n\r\n" + b"x" * 900 + b"\r\n"
# The relay's processes may write their bytecode (as an installed package has it): a test
# environment's PYTHONDONTWRITEBYTECODE would make every start compile the relay's source again.
CHILD_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


class BenchError(Exception):
    """A step failed; the message says which and why."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def accepts(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def domain_names(count: int) -> list[str]:
    return [f"d{n:03d}.example.com" for n in range(count)]


def user_list(domains: list[str], users: int) -> list[Mailbox]:
    return [parse_mailbox(f"user{n}@{domains[n % len(domains)]}") for n in range(users)]


# -- the state -----------------------------------------------------------------------------------

def write_config(root: Path, domains: list[str], inbound: int) -> Path:
    since = dt.date.today() - dt.timedelta(days=1)
    until = since + dt.timedelta(days=730)
    closed = free_port()            # nobody listens there: every primary is down
    blocks = "".join(f"  {name}:\n    primary: 127.0.0.1:{closed}\n"
                     f"    continuity: {{since: {since}, until: {until}}}\n" for name in domains)
    config = root / "config.yaml"
    config.write_text(f"""\
hostname: relay.localhost
listen: {{inbound: 127.0.0.1:{inbound}, metrics: null}}
storage: {{maildirs: maildirs, spool: spool, owner: null}}
users_file: users.passwd
max_recipients: 100
domains:
{blocks}""")
    return config


def write_users(file: Path, users: list[Mailbox]) -> None:
    """The passwd-file as `Directory._write` writes it (one `User.line()` a user, sorted)."""
    lines = sorted(User(user, f"User {user.local}").line() for user in users)
    file.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def make_maildirs(store: MaildirStore, users: list[Mailbox]) -> None:
    """Each user's Maildir++ tree as `MaildirStore.ensure` makes it, without its fsyncs."""
    for user in users:
        path = store.path(user)
        for folder in (path, *(path / f".{name}" for name in FOLDERS)):
            for sub in ("cur", "new", "tmp"):
                (folder / sub).mkdir(parents=True, exist_ok=True)
            if folder != path:
                (folder / "maildirfolder").touch()


class Filler:
    """Writes entries in `ContinuityStore.keep`'s layout, without fsyncs."""

    def __init__(self, config_path: Path) -> None:
        self.config = load_config(config_path)
        self.store = MaildirStore(self.config.storage.maildirs)
        self.queues: dict[str, Queue] = {}

    def queue(self, domain: str) -> Queue:
        if domain not in self.queues:
            queue = Queue(replay_queue_path(self.config.storage.spool, domain))
            queue._ensure()
            self.queues[domain] = queue
        return self.queues[domain]

    def kept(self, user: Mailbox, state: str, seen: bool, note: str = "") -> None:
        """One kept copy: Maildir file, its hard link as msg/<id>, the envelope in `state`."""
        data = trace_headers(user, SENDER) + BODY
        queue = self.queue(user.domain)
        entry = queue.new_id()
        name = self.store.unique_name(len(data))
        box = self.store.path(user)
        maildir_file = box / "cur" / f"{name}:2,S" if seen else box / "new" / name
        maildir_file.write_bytes(data)
        os.link(maildir_file, queue.root / "msg" / entry)
        envelope = Envelope(mail_from=SENDER, rcpt=str(user), received_at=time.time(),
                            skip=len(data) - len(BODY), attempts=int(bool(note)), note=note)
        (queue.root / state / entry).write_bytes(envelope.to_bytes())

    def old_mail(self, user: Mailbox) -> None:
        """A message delivered long ago: in the Maildir only."""
        data = trace_headers(user, SENDER) + BODY
        (self.store.path(user) / "cur" / f"{self.store.unique_name(len(data))}:2,S").write_bytes(data)


def settled_disk() -> float:
    """sync(2): the fill's writes reach the disk before anything is timed, as a server's state
    at rest would be (else the timed reads queue behind a gigabyte of writeback); its seconds."""
    started = time.perf_counter()
    os.sync()
    return time.perf_counter() - started


def fill(config_path: Path, users: list[Mailbox], messages: int) -> float:
    started = time.perf_counter()
    filler = Filler(config_path)
    make_maildirs(filler.store, users)
    for n in range(messages):
        filler.kept(users[n % len(users)], "waiting", seen=False)
    return time.perf_counter() - started


def add_history(config_path: Path, users: list[Mailbox], history: int) -> float:
    started = time.perf_counter()
    filler = Filler(config_path)
    for n in range(history):
        user = users[n % len(users)]
        filler.kept(user, "failed", seen=True, note="550 5.1.1 no such user (bench)")
        filler.old_mail(user)
    return time.perf_counter() - started


# -- status and start-up -------------------------------------------------------------------------

def timed(action: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def relay_env(source: Path | None) -> dict[str, str]:
    """The relay's processes' environment: the installed relay, or the one in `source` (a
    checkout's directory holding relay/, e.g. `git archive` of the commit to compare with)."""
    return CHILD_ENV if source is None else {**CHILD_ENV, "PYTHONPATH": str(source)}


def status_cli(config: Path, env: dict[str, str]) -> None:
    proc = subprocess.run([str(RELAY), "status", "-c", str(config)], capture_output=True, timeout=300,
                          env=env)
    if proc.returncode != 0:
        raise BenchError(f"status exited {proc.returncode}: {proc.stderr.decode(errors='replace')[-500:]}")


def status_in_process(config_path: Path) -> Callable[[], object]:
    config = load_config(config_path)
    return lambda: [domain_status(config, name) for name in sorted(config.domains)]


def cpu_of(pid: int) -> float:
    """CPU seconds (user + system, every thread) a running process used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def startup(config: Path, inbound: int, root: Path, env: dict[str, str]) -> tuple[float, float, float, float]:
    """Seconds from `serve`'s start until the inbound port accepts, and until READY=1; and the
    CPU seconds serve had used at each."""
    address = str(root / "notify.sock")
    Path(address).unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(address)
        notify.settimeout(0.005)
        log = (root / "serve.log").open("ab")
        started = time.perf_counter()
        proc = subprocess.Popen([str(RELAY), "serve", "-c", str(config)], stdout=log,
                                stderr=subprocess.STDOUT, env={**env, "NOTIFY_SOCKET": address})
        accepted = ready = None
        cpu_accepted = cpu_ready = 0.0
        try:
            while accepted is None or ready is None:
                if proc.poll() is not None:
                    raise BenchError(f"serve exited {proc.returncode} at start-up (see {root}/serve.log)")
                if time.perf_counter() - started > 120:
                    raise BenchError("serve did not start within 120 s")
                if accepted is None and accepts(inbound):
                    accepted = time.perf_counter() - started
                    cpu_accepted = cpu_of(proc.pid)
                try:
                    if b"READY=1" in notify.recv(4096) and ready is None:
                        ready = time.perf_counter() - started
                        cpu_ready = cpu_of(proc.pid)
                except TimeoutError:
                    pass
        finally:
            stop(proc)
            log.close()
    return accepted, ready, cpu_accepted, cpu_ready


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        if proc.wait(60) != 0:
            raise BenchError(f"serve exited {proc.returncode} after SIGTERM")
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise BenchError("serve did not stop within 60 s of SIGTERM") from None


# -- the lookup ----------------------------------------------------------------------------------

REWRITE_LOOP = """
import sys, time
from relay.config import load
from relay.directory import Directory
directory, domain, pause = Directory(load(sys.argv[1])), sys.argv[2], float(sys.argv[3])
n = 0
while True:
    directory.add(f"added{n}.{time.monotonic_ns()}@{domain}")
    n += 1
    time.sleep(pause)
"""


class Rewriter:
    """Rewrites the passwd-file in a loop from another process, as `continuity-relay users add`
    does (read, add one user, write the whole file atomically), every `pause` seconds."""

    def __init__(self, config_path: Path, domain: str, pause: float) -> None:
        self.file = load_config(config_path).users_file
        self.args = [sys.executable, "-c", REWRITE_LOOP, str(config_path), domain, str(pause)]
        self.writes = 0

    def _users(self) -> int:
        return self.file.read_bytes().count(b"\n")

    def __enter__(self) -> Rewriter:
        self.before = self._users()
        self.proc = subprocess.Popen(self.args, env=CHILD_ENV)
        deadline = time.monotonic() + 60
        while self._users() == self.before:       # writing has begun
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError("the passwd-file rewriter did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.writes = self._users() - self.before


def lookup_in_process(config_path: Path, users: list[Mailbox], calls: int) -> dict[str, float]:
    directory = Directory(load_config(config_path))
    directory.refresh()
    missing = [u for u in users[:100] if not directory.is_known(u)]
    if missing:
        raise BenchError(f"{len(missing)} registered users unknown to Directory.is_known")
    probe = users * (calls // len(users) + 1)
    quiet = _per_call(directory, probe[:calls])
    refreshes: list[float] = []
    stop_refresh = threading.Event()

    def refresher() -> None:          # serve's `_refresh` runner: every second, off the loop
        while not stop_refresh.wait(1.0):
            started = time.perf_counter()
            directory.refresh()
            refreshes.append(time.perf_counter() - started)

    thread = threading.Thread(target=refresher, daemon=True)
    thread.start()
    with Rewriter(config_path, users[0].domain, 0.2) as rewriter:
        changing = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            changing.append(_per_call(directory, probe[:calls]))
    stop_refresh.set()
    thread.join()
    reparse = _reparse_seconds(config_path, users[0].domain)
    return {"quiet_ns": quiet, "changing_ns": statistics.median(changing),
            "refresh_max_s": max(refreshes, default=0.0), "reparse_s": reparse,
            "rewrites": rewriter.writes}


def _per_call(directory: Directory, probe: list[Mailbox]) -> float:
    is_known = directory.is_known
    started = time.perf_counter_ns()
    for user in probe:
        is_known(user)
    return (time.perf_counter_ns() - started) / len(probe)


def _reparse_seconds(config_path: Path, domain: str) -> float:
    """What one `refresh()` costs once the file changed (median of 5 changes)."""
    config = load_config(config_path)
    reader, writer = Directory(config), Directory(config)
    reader.refresh()
    times = []
    for n in range(5):
        writer.add(f"reparse{n}.{time.monotonic_ns()}@{domain}")
        started = time.perf_counter()
        reader.refresh()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def rcpt_latency(config: Path, inbound: int, root: Path, users: list[Mailbox], rcpts: int,
                 rewrite: bool, env: dict[str, str]) -> list[float]:
    """Seconds per RCPT TO of a registered user, over one SMTP session against `serve`."""
    log = (root / "serve.log").open("ab")
    proc = subprocess.Popen([str(RELAY), "serve", "-c", str(config)], stdout=log, stderr=subprocess.STDOUT,
                            env=env)
    try:
        deadline = time.monotonic() + 120
        while not accepts(inbound):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"serve did not start (see {root}/serve.log)")
            time.sleep(0.05)
        settled = settle(proc.pid, deadline + 120)
        if not rewrite:
            print(f"serve's first replay sweeps (every waiting envelope read) settled "
                  f"{settled:.1f} s after it accepted")
        times: list[float] = []
        with Rewriter(config, users[0].domain, 0.2) if rewrite else contextlib.nullcontext():
            with smtplib.SMTP("127.0.0.1", inbound, timeout=30) as client:
                client.ehlo("bench.example.org")
                for n in range(rcpts):
                    if n % 50 == 0:
                        client.rset()
                        client.mail(SENDER)
                    user = users[(n * 7919) % len(users)]
                    started = time.perf_counter()
                    code, text = client.rcpt(str(user))
                    times.append(time.perf_counter() - started)
                    if code != 250:
                        raise BenchError(f"RCPT TO {user}: {code} {text!r}")
    finally:
        stop(proc)
        log.close()
    return times


def settle(pid: int, deadline: float) -> float:
    """Wait until a process uses under 5% of a core over a second (its start-up work done, the
    primaries found down); returns the seconds waited."""
    started = time.monotonic()
    before = cpu_of(pid)
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = cpu_of(pid)
        if now - before < 0.05:
            return time.monotonic() - started
        before = now
    raise BenchError("serve kept busy for minutes after start-up")


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


# -- main ----------------------------------------------------------------------------------------

def verdict(seconds: float) -> str:
    return f"{seconds:6.2f} s   goal <= {GOAL_SECONDS:.0f} s: {seconds / GOAL_SECONDS:4.2f} of it " \
           f"({'met' if seconds <= GOAL_SECONDS else 'MISSED'})"


def measure_state(label: str, config: Path, inbound: int, root: Path, repeat: int,
                  env: dict[str, str]) -> dict[str, float]:
    cpu_before = cpu_of_children()
    cli = timed(lambda: status_cli(config, env), repeat)
    cli_cpu = (cpu_of_children() - cpu_before) / repeat
    starts = [startup(config, inbound, root, env) for _ in range(repeat)]
    accepted, ready, cpu_accepted, cpu_ready = (statistics.median(s[n] for s in starts) for n in range(4))
    print(f"[{label}] status (CLI, start to exit)   {verdict(cli)}; CPU {cli_cpu:.2f} s")
    print(f"[{label}] serve until inbound accepts   {verdict(accepted)}; CPU {cpu_accepted:.2f} s")
    print(f"[{label}] serve until READY=1           {verdict(ready)}; CPU {cpu_ready:.2f} s")
    return {"status": cli, "accept": accepted, "ready": ready}


def measure_both(label: str, config: Path, inbound: int, root: Path, args: argparse.Namespace
                 ) -> dict[str, float]:
    """This relay's figures, and first the baseline's when `--baseline` names one."""
    inproc = timed(status_in_process(config), args.repeat)
    print(f"[{label}] status model in-process       {inproc:6.2f} s")
    if args.baseline is not None:
        base = measure_state(f"{label}, baseline", config, inbound, root, args.repeat,
                             relay_env(args.baseline))
    found = measure_state(label, config, inbound, root, args.repeat, relay_env(None))
    if args.baseline is not None:
        print(f"[{label}] this/baseline: " + ", ".join(f"{key} {found[key] / base[key]:.2f}x"
                                                    for key in ("status", "accept", "ready")))
    return found


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--domains", type=int, default=100)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--history", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rcpts", type=int, default=3000)
    parser.add_argument("--calls", type=int, default=200_000, help="is_known calls per measurement")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    parser.add_argument("--baseline", type=Path, help="also measure the relay in this directory "
                        "(holding relay/, e.g. `git archive COMMIT relay | tar -x -C DIR`)")
    args = parser.parse_args(argv)
    if min(args.users, args.domains, args.messages, args.repeat, args.rcpts) < 1 or args.history < 0:
        parser.error("counts must be positive (--history may be 0)")
    return args


def run(args: argparse.Namespace, root: Path) -> None:
    domains = domain_names(args.domains)
    users = user_list(domains, args.users)
    inbound = free_port()
    config = write_config(root, domains, inbound)
    write_users(root / "users.passwd", users)
    subprocess.run([sys.executable, "-c", "import relay.app"], env=CHILD_ENV, check=True)   # bytecode
    print(f"fill: {args.users} users over {args.domains} domains, {args.messages} waiting "
          f"entries in {fill(config, users, args.messages):.1f} s; sync {settled_disk():.1f} s")
    if args.baseline is not None:
        subprocess.run([sys.executable, "-c", "import relay.app"], env=relay_env(args.baseline), check=True)
    before = measure_both("pending only", config, inbound, root, args)
    if args.history:
        print(f"history: {args.history} failed/ entries and {args.history} old Maildir messages "
              f"in {add_history(config, users, args.history):.1f} s; sync {settled_disk():.1f} s")
        after = measure_both(f"+{args.history} history", config, inbound, root, args)
        shown = (("status", "status"), ("accept", "start-up to accept"), ("ready", "start-up to READY"))
        for key, name in shown:
            print(f"history cost: {name} with/without history = {after[key] / before[key]:.2f}x "
                  f"(1.00x: history costs nothing)")
    found = lookup_in_process(config, users, args.calls)
    print(f"lookup: Directory.is_known {found['quiet_ns']:.0f} ns/call quiet, "
          f"{found['changing_ns']:.0f} ns/call while the passwd-file was rewritten "
          f"{found['rewrites']} times ({found['changing_ns'] / found['quiet_ns']:.2f}x; "
          f"goal O(1): about 1x)")
    print(f"lookup: one refresh() after a change {found['reparse_s'] * 1000:.1f} ms at "
          f"{args.users} users (off the loop, in serve's refresh thread); slowest refresh while "
          f"rewriting {found['refresh_max_s'] * 1000:.1f} ms")
    for name, source in ([("baseline", args.baseline)] if args.baseline else []) + [("this", None)]:
        quiet = rcpt_latency(config, inbound, root, users, args.rcpts, False, relay_env(source))
        busy = rcpt_latency(config, inbound, root, users, args.rcpts, True, relay_env(source))
        for label, times in (("quiet", quiet), ("rewritten", busy)):
            print(f"[{name}] RCPT over SMTP, passwd-file {label:9}: "
                  f"p50 {percentile(times, .5) * 1000:.2f} ms, p99 {percentile(times, .99) * 1000:.2f} ms, "
                  f"max {max(times) * 1000:.1f} ms")
        print(f"[{name}] RCPT p50 rewritten/quiet = {percentile(busy, .5) / percentile(quiet, .5):.2f}x, "
              f"p99 {percentile(busy, .99) / percentile(quiet, .99):.2f}x (goal O(1): about 1x)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="scale-bench-"))
    print(f"temp dir {root}")
    failed = False
    try:
        run(args, root)
    except BenchError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        failed = True
    finally:
        if args.keep or failed:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
