"""Inbound throughput: continuity-relay storing mail vs Postfix queueing it as a backup MX.

Both servers get the same load from Postfix's `smtp-source`: N messages of SIZE bytes over
SESSIONS concurrent SMTP sessions, one message per connection, all to one registered recipient
(`user1@example.com`; smtp-source's -N numbering never repeats a number, so it cannot spread N
messages over a fixed set of users). In both runs the next hop is a closed port on 127.0.0.1,
so every message must be written to disk before the 250:

  postfix  a private Postfix instance (own config and queue directories under a temp dir) with
           `relay_domains = example.com` and a relay transport to the closed port: a backup MX
           that queues what it cannot pass on. Afterwards N queue files must exist.
  relay    `continuity-relay serve` with example.com's primary on the closed port and the
           recipient registered: each message goes to the user's Maildir and the replay queue,
           fsync'd. Afterwards N files must be in maildirs/*/*/new and N entries waiting.
  disk     no server: SESSIONS threads each write a SIZE-byte file to a temp name, fsync it,
           rename it into one directory and fsync that directory, N files in all: what this
           disk does for the same durable work in parallel, with nothing shared.

Each run prints messages, seconds (smtp-source start to exit), msg/s, the machine's CPU use
during the load (100% = all cores busy) and the server's memory: the relay's peak RSS; for
Postfix, made of many processes sharing libraries, the sum of their proportional set sizes
(PSS) at the end of the load, a rough figure. The last line, `ratio relay/postfix`,
is the relay's msg/s divided by Postfix's from the same run: 1.00 means as fast as Postfix,
0.50 half as fast; `ratio relay/disk` is the relay's msg/s over the disk's files/s. Shared
machines are noisy: compare figures from one run, not across runs.

With `--archive` the relay runs twice in the same run, with `storage.archive` off and on,
and the last line is `ratio archive on/off` (issue 11: archiving must cost the senders at most
10%); the archive run also checks that N messages were archived, each verifying.

Usage: .venv/bin/python bench/inbound.py [--messages 5000] [--sessions 20] [--size 4096]
       [--users 100] [--relay-only | --postfix-only | --disk-only] [--archive]
       [--profile DIR] [--keep] [--pairs PAIRS (with --archive: off/on pairs in alternating order)]
Exit status 0 when every step succeeded and every count matched, 1 otherwise, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

DOMAIN = "example.com"
RECIPIENT = f"user1@{DOMAIN}"
SENDER = "bench@example.org"
RELAY = Path(sys.executable).parent / "continuity-relay"
PY_SPY = RELAY.parent / "py-spy"
POSTFIX_QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")
POSTFIX_SERVICES = """\
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
smtp unix - - n - - smtp
relay unix - - n - - smtp
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
"""


class BenchError(Exception):
    """A step failed; the message says which and why."""


@dataclass(frozen=True)
class Load:
    messages: int
    sessions: int
    size: int
    users: int

    @property
    def timeout(self) -> float:
        """Generous: a run at 20 msg/s still finishes; a hung server does not hang us."""
        return 30 + self.messages / 20


@dataclass(frozen=True)
class Result:
    name: str
    messages: int
    seconds: float
    cpu_percent: float
    memory: str
    cpu_seconds: float = 0.0        # the server's own (relay: `cpu_of_tree`), when measured

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    def line(self) -> str:
        return (f"{self.name:8} msgs={self.messages} seconds={self.seconds:.2f} "
                f"msg/s={self.rate:.0f} cpu={self.cpu_percent:.0f}% memory={self.memory}")


# -- small helpers -----------------------------------------------------------------------------

def free_port() -> int:
    """A port nothing listens on right now (used for servers, and as the closed next hop)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(cmd: list[str], what: str, timeout: float = 60) -> str:
    """Run a command to completion; any non-zero exit is a BenchError carrying its output."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{what}: no exit after {timeout:.0f}s") from exc
    if done.returncode != 0:
        output = (done.stderr + done.stdout).strip()[-2000:]
        raise BenchError(f"{what}: exit status {done.returncode}: {output or '(no output)'}")
    return done.stdout


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def proc_kb(path: str, key: str) -> int:
    """One `Key: N kB` figure from a /proc file (0 when the process is gone)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_rss(pid: int) -> str:
    return f"{proc_kb(f'/proc/{pid}/status', 'VmHWM') / 1024:.0f}MiB(peak-RSS)"


def cpu_of_tree(pid: int) -> float:
    """CPU seconds (user + system) used so far by `pid` and its children (the relay and its
    archive index follower): less moved by other work on the machine than msg/s is."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in (pid, *children(pid)):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])       # utime, stime
    return total / tick


def cpu_of_threads(pid: int) -> tuple[float, float, float, float]:
    """CPU seconds (user, system) of the relay's main thread (its event loop: the task whose id
    is the pid's), then (user, system) of its other threads together (the storage threads')."""
    tick = os.sysconf("SC_CLK_TCK")
    loop, rest = [0, 0], [0, 0]
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue            # a thread that ended meanwhile: its time went to the process
        into = loop if task.name == str(pid) else rest
        into[0] += int(fields[11])
        into[1] += int(fields[12])
    return loop[0] / tick, loop[1] / tick, rest[0] / tick, rest[1] / tick


def pss_of_tree(pid: int) -> str:
    """Postfix is many processes sharing libraries: sum their proportional set sizes (now)."""
    pids = [pid, *children(pid)]
    total = sum(proc_kb(f"/proc/{p}/smaps_rollup", "Pss") for p in pids)
    return f"{total / 1024:.0f}MiB(PSS-sum-of-{len(pids)}-processes)"


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@contextmanager
def spy(pid: int, out: Path | None) -> Iterator[None]:
    """py-spy on pid's process tree (every thread, idle samples too, 200 Hz) while the block
    runs; the collapsed stacks go to `out` when it ends. Nothing when `out` is None."""
    if out is None:
        yield
        return
    log = out.with_suffix(".log")
    with log.open("wb") as err:
        proc = subprocess.Popen([str(PY_SPY), "record", "--format", "raw", "--idle", "--threads",
                                 "--subprocesses", "--rate", "200", "-p", str(pid), "-o", str(out)],
                                stdout=err, stderr=subprocess.STDOUT)
    wait_for(lambda: proc.poll() is not None or b"Sampling process" in log.read_bytes(), 15,
             "py-spy to attach")
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)         # py-spy writes its file on Ctrl-C
        proc.wait(60)
    if not out.exists():
        raise BenchError(f"py-spy wrote no profile: {log.read_text(errors='replace').strip()}")


# -- the load ----------------------------------------------------------------------------------

def smtp_source(load: Load, port: int) -> list[str]:
    return ["smtp-source", "-s", str(load.sessions), "-m", str(load.messages),
            "-l", str(load.size), "-f", SENDER, "-t", RECIPIENT, "-M", "bench.localhost",
            "-S", "continuity-relay inbound benchmark", f"127.0.0.1:{port}"]


def send_load(load: Load, port: int) -> tuple[float, float]:
    """Run smtp-source; (seconds, machine CPU %). It aborts with a non-zero exit on any reply
    other than the expected 2xx/3xx, so a zero exit means every message got its 250."""
    busy0, total0 = cpu_ticks()
    start = time.monotonic()
    run(smtp_source(load, port), "smtp-source", load.timeout)
    seconds = time.monotonic() - start
    busy1, total1 = cpu_ticks()
    return seconds, 100.0 * (busy1 - busy0) / max(1, total1 - total0)


def expect(count: int, wanted: int, what: str) -> None:
    if count != wanted:
        raise BenchError(f"{what}: found {count}, expected {wanted}")


# -- (a) Postfix as a backup MX ----------------------------------------------------------------

def write_postfix_config(root: Path, port: int, next_hop: int) -> Path:
    etc, queue, data = root / "etc", root / "queue", root / "data"
    for path in (etc, queue, data):
        path.mkdir(parents=True)
    shutil.chown(data, "postfix")
    (etc / "main.cf").write_text(f"""\
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
myhostname = backup.localhost
mydestination =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relay_domains = {DOMAIN}
relay_transport = relay:[127.0.0.1]:{next_hop}
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
alias_maps =
alias_database =
biff = no
maillog_file_prefixes = {root}
maillog_file = {root}/maillog
""")
    (etc / "master.cf").write_text(f"127.0.0.1:{port} inet n - n - - smtpd\n" + POSTFIX_SERVICES)
    return etc


def first_fatal(maillog: Path) -> str:
    try:
        lines = maillog.read_text(errors="replace").splitlines()
    except OSError:
        return "(no maillog)"
    return next((line for line in lines if "fatal:" in line), lines[-1] if lines else "(empty)")


def postfix_pid(root: Path) -> int:
    try:
        return int((root / "queue" / "pid" / "master.pid").read_text().strip())
    except (OSError, ValueError):
        return 0


@contextmanager
def postfix(root: Path, port: int, next_hop: int) -> Iterator[int]:
    """A running private Postfix instance; yields the master's pid, stops it on the way out."""
    etc = write_postfix_config(root, port, next_hop)
    try:
        run(["postfix", "-c", str(etc), "start"], "postfix start")
    except BenchError as exc:
        raise BenchError(f"{exc}; maillog: {first_fatal(root / 'maillog')}") from None
    try:
        wait_for(lambda: alive(postfix_pid(root)), 10, "the Postfix master")
        yield postfix_pid(root)
    finally:
        pid = postfix_pid(root)
        run(["postfix", "-c", str(etc), "stop"], "postfix stop")
        wait_for(lambda: not alive(pid), 30, "the Postfix master to exit")


def postfix_queued(queue: Path) -> int:
    """Queue files, by name: a file renamed between queues while we look is not counted twice."""
    names = set()
    for name in POSTFIX_QUEUES:
        for _dir, _subdirs, files in os.walk(queue / name):
            names.update(files)
    return len(names)


def bench_postfix(load: Load, root: Path) -> Result:
    port = free_port()
    with postfix(root, port, free_port()) as master:
        seconds, cpu = send_load(load, port)
        queue = root / "queue"
        try:
            wait_for(lambda: postfix_queued(queue) == load.messages, 30, "Postfix's queue to settle")
        except BenchError:
            expect(postfix_queued(queue), load.messages, "messages in Postfix's queue")
        memory = pss_of_tree(master)
    return Result("postfix", load.messages, seconds, cpu, memory)


# -- (b) continuity-relay ----------------------------------------------------------------------

def write_relay_config(root: Path, port: int, primary: int, archive: bool = False) -> Path:
    root.mkdir(parents=True)
    since = dt.date.today() - dt.timedelta(days=1)  # a subscription active today, two years long
    until = since + dt.timedelta(days=730)
    config = root / "config.yaml"
    config.write_text(f"""\
hostname: relay.localhost
listen: {{inbound: 127.0.0.1:{port}, metrics: null}}
storage: {{maildirs: maildirs, spool: spool, owner: null{", archive: archive" if archive else ""}}}
users_file: users.passwd
message_size_limit: 50MiB
max_recipients: 100
domains:
  {DOMAIN}:
    primary: 127.0.0.1:{primary}
    continuity: {{since: {since}, until: {until}}}
""")
    return config


def register_users(config: Path, users: int) -> None:
    csv = config.parent / "users.csv"
    csv.write_text("email,name\n" + "".join(f"user{i}@{DOMAIN},User {i}\n"
                                           for i in range(1, users + 1)))
    run([str(RELAY), "users", "import", str(csv), "-c", str(config)], "users import")


@contextmanager
def relay(config: Path, log: Path) -> Iterator[int]:
    """A running `continuity-relay serve`; yields its pid, stops it with SIGTERM on the way out."""
    with log.open("wb") as out:
        proc = subprocess.Popen([str(RELAY), "serve", "-c", str(config)],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: proc.poll() is not None or b"inbound.listening" in log.read_bytes(),
                 30, "the relay to listen")
    except BenchError:
        proc.kill()
        proc.wait()
        raise
    if proc.poll() is not None:
        raise BenchError(f"relay exited with status {proc.returncode} at start-up: {last_line(log)}")
    try:
        yield proc.pid
    finally:
        stop_relay(proc, log)


def last_line(log: Path) -> str:
    lines = log.read_text(errors="replace").strip().splitlines()
    return lines[-1] if lines else "(empty log)"


def stop_relay(proc: subprocess.Popen, log: Path) -> None:
    if proc.poll() is not None:
        raise BenchError(f"relay died during the run, status {proc.returncode}: {last_line(log)}")
    proc.send_signal(signal.SIGTERM)
    try:
        status = proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise BenchError("relay did not exit within 30s of SIGTERM") from None
    if status != 0:
        raise BenchError(f"relay exited with status {status} after SIGTERM")


def relay_stored(root: Path) -> tuple[int, int]:
    """(files in maildirs/*/*/new, entries waiting in the replay queues)."""
    stored = sum(1 for _ in root.glob("maildirs/*/*/new/*"))
    waiting = sum(1 for _ in root.glob("spool/replay/*/waiting/*"))
    return stored, waiting


def log_summary(log: Path) -> str:
    """`event=count` for every event the relay logged, warnings and errors first."""
    events: Counter[str] = Counter()
    for line in log.read_text(errors="replace").splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[2] in ("INFO", "WARNING", "ERROR", "CRITICAL"):
            events[f"{parts[2]}:{parts[4]}"] += 1
        elif line.strip():
            events["other-lines"] += 1
    ordered = sorted(events.items(), key=lambda kv: (kv[0].startswith("INFO"), kv[0]))
    return " ".join(f"{name}={count}" for name, count in ordered)


@contextmanager
def primary_sink(root: Path) -> Iterator[int]:
    """An `smtp-sink` taking every message (the primary of a pass-through run); yields its port."""
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    with (root / "sink.err").open("wb") as err:
        proc = subprocess.Popen(["smtp-sink", "-u", "postfix", f"127.0.0.1:{port}", "256"],
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_for(lambda: proc.poll() is not None or listening(port), 10, "smtp-sink to listen")
        if proc.poll() is not None:
            raise BenchError(f"smtp-sink exited with status {proc.returncode}")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def bench_relay(load: Load, root: Path, archive: bool = False, through: bool = False,
                profile: Path | None = None) -> Result:
    port = free_port()
    with contextlib.ExitStack() as stack:
        primary = stack.enter_context(primary_sink(root.parent / f"{root.name}-sink")) if through \
            else free_port()
        config = write_relay_config(root, port, primary, archive)
        register_users(config, load.users)
        log = root / "relay.log"
        with relay(config, log) as pid:
            used0, threads0 = cpu_of_tree(pid), cpu_of_threads(pid)
            with spy(pid, profile):
                seconds, cpu = send_load(load, port)
            used = cpu_of_tree(pid) - used0
            threads = [b - a for a, b in zip(threads0, cpu_of_threads(pid), strict=True)]
            stored, waiting = relay_stored(root)
            memory = peak_rss(pid)
    print(f"relay log: {log_summary(log)}")
    expected = 0 if through else load.messages     # passed through: nothing kept
    expect(stored, expected, "messages in maildirs/*/*/new")
    expect(waiting, expected, "entries waiting in the replay queue")
    if archive:          # the writer flushed at SIGTERM: every message is in, and verifies
        from relay.storage.archive import Archive
        archived = Archive(root / "archive")
        expect(sum(1 for _ in archived.records()), load.messages, "archived messages")
        expect(len(archived.verify()), 0, "archive problems")
    name = "relay" + ("+pass" if through else "") + ("+archive" if archive else "")
    print(f"{name} cpu: {used * 1000 / load.messages:.2f} ms a message (the relay and its children, "
          "during the load); user/system: event loop thread {:.2f}/{:.2f} ms, other threads "
          "{:.2f}/{:.2f} ms".format(*(t * 1000 / load.messages for t in threads))
          + f"; child processes (the keeper, the index follower) "
            f"{(used - sum(threads)) * 1000 / load.messages:.2f} ms")
    return Result(name, load.messages, seconds, cpu, memory, used)


# -- (c) the disk: the same durable work in parallel, with nothing else ---------------------

def disk_writer(root: Path, names: range, payload: bytes) -> None:
    """One worker's share: each file written to a temp name, fsync'd, renamed into `done/`,
    and `done/` fsync'd, as a mail server must before its 250 (no shared fsyncs)."""
    done = os.open(root / "done", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for n in names:
            tmp = root / "tmp" / f"{n}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, payload)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, root / "done" / f"{n}")
            os.fsync(done)
    finally:
        os.close(done)


def bench_disk(load: Load, root: Path) -> Result:
    """N files of SIZE bytes by SESSIONS threads at once (fsync and rename let go of the GIL),
    in the same temp dir, so on the same file system as the servers' queues."""
    for sub in ("tmp", "done"):
        (root / sub).mkdir(parents=True)
    payload = os.urandom(load.size)
    shares = [range(i, load.messages, load.sessions) for i in range(load.sessions)]
    busy0, total0 = cpu_ticks()
    own0 = os.times()
    start = time.monotonic()
    with ThreadPoolExecutor(load.sessions) as pool:
        for future in [pool.submit(disk_writer, root, share, payload) for share in shares]:
            future.result()
    seconds = time.monotonic() - start
    own1 = os.times()
    busy1, total1 = cpu_ticks()
    print(f"disk cpu: user/system {1000 * (own1.user - own0.user) / load.messages:.2f}/"
          f"{1000 * (own1.system - own0.system) / load.messages:.2f} ms a file (this process)")
    expect(sum(1 for _ in (root / "done").iterdir()), load.messages, "files the disk leg wrote")
    return Result("disk", load.messages, seconds, 100.0 * (busy1 - busy0) / max(1, total1 - total0),
                  "-")


# -- main --------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=4096, help="payload bytes per message")
    parser.add_argument("--users", type=int, default=100, help="registered users (the load "
                        f"goes to {RECIPIENT})")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--relay-only", action="store_true")
    only.add_argument("--postfix-only", action="store_true")
    only.add_argument("--disk-only", action="store_true", help="only the disk's own rate")
    parser.add_argument("--archive", action="store_true", help="the relay with storage.archive off "
                        "and on, and their ratio")
    parser.add_argument("--profile", type=Path, metavar="DIR", help="py-spy on the relay during "
                        "the kept leg: DIR/kept.raw, summed up by bench/profile_summary.py --groups")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir for inspection")
    parser.add_argument("--pairs", type=int, default=1, help="with --archive: PAIRS pairs of "
                        "off/on legs (kept, passed), in alternating order, and their medians")
    args = parser.parse_args(argv)
    if args.profile is not None:
        if args.postfix_only or args.disk_only:
            parser.error("--profile profiles the relay's kept leg")
        args.profile = args.profile.resolve()
        args.profile.mkdir(parents=True, exist_ok=True)
    if min(args.messages, args.sessions, args.size, args.users) < 1:
        parser.error("--messages, --sessions, --size and --users must be at least 1")
    return args


def preflight(args: argparse.Namespace) -> None:
    if os.geteuid() != 0:
        raise BenchError("run as root (Postfix's start-up and queue need it)")
    for tool in ("smtp-source", "postfix"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found (Debian package postfix)")
    if not (args.postfix_only or args.disk_only) and not RELAY.exists():
        raise BenchError(f"{RELAY} not found: run with the project venv's python")
    if args.profile is not None and not PY_SPY.exists():
        raise BenchError(f"{PY_SPY} not found: .venv/bin/pip install py-spy")


def run_benches(args: argparse.Namespace, tmp: Path) -> dict[str, Result]:
    load = Load(args.messages, args.sessions, args.size, args.users)
    print(f"load: {load.messages} messages, {load.size} bytes, {load.sessions} sessions, "
          f"recipient {RECIPIENT}, {load.users} registered users")
    results: dict[str, Result] = {}
    if not (args.relay_only or args.disk_only):
        results["postfix"] = bench_postfix(load, tmp / "postfix")
        print(results["postfix"].line(), flush=True)
    if not (args.relay_only or args.postfix_only):
        results["disk"] = bench_disk(load, tmp / "disk")
        print(results["disk"].line(), flush=True)
    if not (args.postfix_only or args.disk_only):
        profile = args.profile / "kept.raw" if args.profile is not None else None
        results["relay"] = bench_relay(load, tmp / "relay", profile=profile)
        print(results["relay"].line(), flush=True)
        if profile is not None:
            from profile_summary import grouped
            print(f"\n== profile of the kept leg ({profile}) ==\n{grouped(profile)}\n")
    if args.archive and not (args.postfix_only or args.disk_only):
        results["archive"] = bench_relay(load, tmp / "relay-archive", archive=True)
        print(results["archive"].line(), flush=True)
        print(f"ratio archive on/off (kept in an outage) = "
              f"{results['archive'].rate / results['relay'].rate:.2f}; cpu a message on/off = "
              f"{results['archive'].cpu_seconds / results['relay'].cpu_seconds:.2f}")
        off = bench_relay(load, tmp / "pass", through=True)
        print(off.line(), flush=True)
        on = bench_relay(load, tmp / "pass-archive", archive=True, through=True)
        print(on.line(), flush=True)
        print(f"ratio archive on/off (passed through) = {on.rate / off.rate:.2f}; cpu a message "
              f"on/off = {on.cpu_seconds / off.cpu_seconds:.2f}")
        if args.pairs > 1:
            archive_pairs(args, load, tmp, results["archive"].rate / results["relay"].rate,
                          on.rate / off.rate)
    return results


def archive_pairs(args: argparse.Namespace, load: Load, tmp: Path, kept: float, passed: float) -> None:
    """More pairs of legs, archive off and on, kept and passed through, each pair in the other
    order than the one before (the first ran off, then on): a machine that slows or speeds up
    over the run (a neighbour, the disk writing back the legs before) weighs on both alike."""
    ratios = {"kept in an outage": [kept], "passed through": [passed]}
    for pair in range(1, args.pairs):
        order = (True, False) if pair % 2 else (False, True)
        for name, through in (("kept in an outage", False), ("passed through", True)):
            ran = {archive: bench_relay(load, tmp / f"pair{pair}-{through}-{archive}", archive=archive,
                                        through=through) for archive in order}
            ratios[name].append(ran[True].rate / ran[False].rate)
            print(f"pair {pair + 1} ({'on first' if order[0] else 'off first'}), {name}: "
                  f"on/off {ratios[name][-1]:.2f}", flush=True)
    for name, values in ratios.items():
        print(f"archive on/off ({name}) over {len(values)} pairs: {' '.join(f'{r:.2f}' for r in values)}; "
              f"median {statistics.median(values):.2f}")


def bench_main(args: argparse.Namespace, prefix: str, check: Callable[[argparse.Namespace], None],
               run: Callable[[argparse.Namespace, Path], dict[str, Result]]) -> int:
    """Shared by the benchmarks: a temp dir, the runs, the ratio line, exit status."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    tmp.chmod(0o755)  # Postfix's daemons (and smtp-sink) run as postfix and must reach it
    try:
        check(args)
        results = run(args, tmp)
    except BenchError as exc:
        print(f"FAILED: {exc}\nkept {tmp} for inspection", file=sys.stderr)
        return 1
    if args.keep:
        print(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    if "relay" in results and "postfix" in results:
        print(f"ratio relay/postfix = {results['relay'].rate / results['postfix'].rate:.2f}")
    if "relay" in results and "disk" in results:
        print(f"ratio relay/disk = {results['relay'].rate / results['disk'].rate:.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return bench_main(parse_args(argv), "bench-inbound-", preflight, run_benches)


if __name__ == "__main__":
    sys.exit(main())
