"""Replay drain: continuity-relay replaying its queue vs Postfix flushing its deferred queue.

Both sides start with the same backlog, N messages of SIZE bytes spread round-robin over USERS
recipients (`user1@example.com` ... `userU@example.com`), waiting for a next hop that was down,
and both drain it to a fresh Postfix `smtp-sink` on 127.0.0.1:

  postfix  a private Postfix instance (own config and queue directories under a temp dir, set
           up as in inbound.py) relaying example.com to a closed port. The messages go in over
           SMTP and end up deferred; the script checks that exactly N files sit in the deferred
           queue, points `relay_transport` at the sink (`postconf -e`, `postfix reload`), runs
           `postqueue -f` and times from there until the queue is empty.
  relay    `continuity-relay` with example.com's primary on a closed port and the USERS users
           registered. The queue is filled in-process through the relay's own storage code
           (`ContinuityStore.keep`, what the inbound listener calls) or, with `--fill smtp`,
           through `continuity-relay serve`; the script checks that exactly N entries wait in
           `spool/replay/*/waiting` (and N files in the Maildirs), points the primary at the
           sink and times `continuity-relay replay` from start to exit (or, with `--serve`,
           `continuity-relay serve` from start until every replay queue directory is empty).

After each drain the sink's dump files are read back: exactly N messages, each `X-Bench-Seq`
exactly once, at the recipient it was queued for, with its header and body intact (the relay
must pass on the bytes it received). Each run prints messages, seconds, msg/s, the machine's
CPU use during the drain (100% = all cores busy) and memory (the relay's peak RSS; for Postfix,
the sum of its processes' PSS at the end). `ratio relay/postfix` is the relay's msg/s over
Postfix's from the same run: 1.00 means as fast as Postfix.

`--users 1` is the one-busy-mailbox case: every message for the same recipient, so the relay's
per-user order is what limits it. `--profile FILE` runs the relay's `replay` under `py-spy
record` (installed in the venv) and `bench/profile_summary.py FILE` says where the time went.

Usage: .venv/bin/python bench/replay.py [--messages 10000] [--users 100] [--size 4096]
       [--sessions 20] [--fill direct|smtp] [--serve] [--concurrency N]
       [--relay-only | --postfix-only] [--keep] [--profile FILE]
Exit status 0 when every step succeeded and every count matched, 1 otherwise, 2 on bad usage.
Needs root, the Debian postfix package and the project venv (run it with .venv/bin/python).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import resource
import shutil
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from inbound import (
    DOMAIN,
    POSTFIX_QUEUES,
    RELAY,
    SENDER,
    BenchError,
    Result,
    alive,
    bench_main,
    children,
    cpu_ticks,
    expect,
    free_port,
    peak_rss,
    postfix,
    postfix_queued,
    proc_kb,
    pss_of_tree,
    register_users,
    run,
    wait_for,
)
from inbound import relay as serve_relay

PY_SPY = RELAY.parent / "py-spy"
QUEUE_DIRS = ("msg", "tmp", "waiting", "active", "failed", "hold")
SEQ_HEADER = re.compile(rb"^X-Bench-Seq: (\d+)$", re.MULTILINE)
RCPT_ARGS = re.compile(rb"^X-Rcpt-Args: <([^>]*)>", re.MULTILINE)
LOG_RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+ (\S+).*")


@dataclass(frozen=True)
class Load:
    messages: int
    users: int
    size: int
    sessions: int

    @property
    def timeout(self) -> float:
        """For one fill or one drain: a run at 20 msg/s still finishes; a hang does not hang us."""
        return 60 + self.messages / 20

    def recipient(self, seq: int) -> str:
        return f"user{seq % self.users + 1}@{DOMAIN}"

    def message(self, seq: int) -> bytes:
        """Message `seq`: SIZE bytes exactly (CRLF lines, no line starts with a dot)."""
        head = (f"From: Bench <{SENDER}>\r\nTo: <{self.recipient(seq)}>\r\n"
                f"Subject: continuity-relay replay benchmark {seq}\r\n"
                f"Date: Sat, 28 Nov 2026 00:00:00 +0000\r\n"
                f"Message-ID: <replay-{seq}@bench.localhost>\r\nX-Bench-Seq: {seq}\r\n\r\n").encode()
        need = max(self.size - len(head), 2)
        full, rest = divmod(need, 78)
        lines = [f"{seq:08d}.{n:04d} ".ljust(76, "x") for n in range(full)]
        if rest >= 2:
            lines.append(f"{seq:08d}.{full:04d} ".ljust(rest - 2, "x")[:rest - 2])
        elif rest == 1 and lines:
            lines[-1] += "x"
        body = "".join(line + "\r\n" for line in lines) or "\r\n"
        return head + body.encode()


class CpuMeter:
    """Machine-wide CPU use between start() and percent() (100% = all cores busy)."""

    def start(self) -> None:
        self.busy, self.total = cpu_ticks()

    def percent(self) -> float:
        busy, total = cpu_ticks()
        return 100.0 * (busy - self.busy) / max(1, total - self.total)


# -- the load: an SMTP sender ------------------------------------------------------------------

def send_all(load: Load, port: int, what: str) -> float:
    """Send every message to 127.0.0.1:port over `sessions` connections (each connection
    sends many messages in a row); seconds taken. Any refusal or error is a BenchError."""
    errors: list[str] = []
    deadline = time.monotonic() + load.timeout
    start = time.monotonic()

    def session(first: int) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", port, local_hostname="bench.localhost", timeout=60) as smtp:
                for seq in range(first, load.messages, load.sessions):
                    if errors or time.monotonic() > deadline:
                        return
                    refused = smtp.sendmail(SENDER, [load.recipient(seq)], load.message(seq))
                    if refused:
                        raise BenchError(f"message {seq} refused: {refused}")
        except (smtplib.SMTPException, OSError, BenchError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=session, args=(n,), daemon=True)
               for n in range(min(load.sessions, load.messages))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()) + 5)
    if errors:
        raise BenchError(f"{what}: {len(errors)} session(s) failed, first: {errors[0]}")
    if any(thread.is_alive() for thread in threads) or time.monotonic() > deadline:
        raise BenchError(f"{what}: not done after {load.timeout:.0f}s")
    return time.monotonic() - start


# -- the sink ----------------------------------------------------------------------------------

@dataclass
class Sink:
    port: int
    dumps: Path
    counters: Path
    proc: subprocess.Popen

    def received(self) -> int:
        """Messages dumped so far (smtp-sink closes each dump file before its 250)."""
        try:
            return len(os.listdir(self.dumps))
        except FileNotFoundError:
            return 0

    def counted(self) -> int:
        """smtp-sink's own `-c` counter of messages ended with a dot."""
        found = re.findall(rb"mesg=(\d+)", self.counters.read_bytes())
        return int(found[-1]) if found else 0

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"smtp-sink exited with status {self.proc.returncode}")


@contextmanager
def sink(root: Path) -> Iterator[Sink]:
    """A running `smtp-sink` dumping each message to its own file under root/dumps."""
    dumps = root / "dumps"
    dumps.mkdir(parents=True)
    shutil.chown(dumps, "postfix")  # it writes as postfix (-u, required when run as root)
    port = free_port()
    counters = root / "sink.out"
    with counters.open("wb") as out, (root / "sink.err").open("wb") as err:
        proc = subprocess.Popen(["smtp-sink", "-u", "postfix", "-c", "-d", f"{dumps}/%H%M%S.",
                                 f"127.0.0.1:{port}", "256"], stdout=out, stderr=err)
    the_sink = Sink(port, dumps, counters, proc)
    try:
        wait_for(lambda: proc.poll() is not None or listening(port), 10, "smtp-sink to listen")
        if proc.poll() is not None:
            error = (root / "sink.err").read_text(errors="replace").strip()
            raise BenchError(f"smtp-sink exited with status {proc.returncode}: {error}")
        yield the_sink
        the_sink.check_alive()
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def check_sink(the_sink: Sink, load: Load) -> None:
    """Exactly N messages, each sequence number once, to its recipient, content intact."""
    expect(the_sink.received(), load.messages, "messages dumped by smtp-sink")
    expect(the_sink.counted(), load.messages, "smtp-sink's message counter")
    seen: Counter[int] = Counter()
    problems: list[str] = []
    for name in os.listdir(the_sink.dumps):
        dump = (the_sink.dumps / name).read_bytes()
        seqs = SEQ_HEADER.findall(dump)
        if len(seqs) != 1:
            problems.append(f"{name}: {len(seqs)} X-Bench-Seq headers")
            continue
        seq = int(seqs[0])
        seen[seq] += 1
        if not 0 <= seq < load.messages:
            problems.append(f"{name}: unknown sequence number {seq}")
            continue
        if RCPT_ARGS.findall(dump) != [load.recipient(seq).encode()]:
            problems.append(f"{name}: message {seq} delivered to {RCPT_ARGS.findall(dump)}")
        elif load.message(seq).replace(b"\r\n", b"\n") not in dump:
            problems.append(f"{name}: message {seq} altered")
    missing = load.messages - len([s for s in seen if 0 <= s < load.messages])
    twice = sum(1 for count in seen.values() if count > 1)
    if missing or twice:
        problems.insert(0, f"{missing} message(s) never arrived, {twice} arrived more than once")
    if problems:
        raise BenchError(f"smtp-sink's dumps: {len(problems)} problem(s), first: {problems[0]}")


# -- (a) Postfix flushing its deferred queue ---------------------------------------------------

def queue_counts(queue: Path) -> dict[str, int]:
    counts = {}
    for name in POSTFIX_QUEUES:
        counts[name] = sum(len(files) for _dir, _subdirs, files in os.walk(queue / name))
    return counts


def qmgr_pid(master: int) -> int:
    for pid in children(master):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "qmgr":
                return pid
        except OSError:
            continue
    return 0


def reload_postfix(etc: Path, master: int) -> None:
    """`postfix reload`, then wait until a new queue manager runs (it forgets dead hops)."""
    before = qmgr_pid(master)
    run(["postfix", "-c", str(etc), "reload"], "postfix reload")
    wait_for(lambda: qmgr_pid(master) not in (0, before), 30, "a new Postfix queue manager")


def postconf(etc: Path, *settings: str) -> None:
    run(["postconf", "-c", str(etc), "-e", *settings], "postconf -e")
    for setting in settings:
        name, value = setting.split("=", 1)
        shown = run(["postconf", "-c", str(etc), "-h", name], "postconf -h").strip()
        if shown != value:
            raise BenchError(f"postconf: {name} reads {shown!r} after setting {value!r}")


def bench_postfix(load: Load, root: Path) -> Result:
    smtpd_port = free_port()
    etc = root / "etc"
    queue = root / "queue"
    with postfix(root, smtpd_port, free_port()) as master:
        # Retries only when we say so: a deferred message must not slip out before the flush.
        postconf(etc, "minimal_backoff_time=3600s", "maximal_backoff_time=3600s",
                 "queue_run_delay=3600s")
        # `postqueue -f` also wakes pickup (the maildrop queue), which inbound.py leaves out.
        run(["postconf", "-c", str(etc), "-M", "-e", "pickup/unix=pickup unix n - n 60 1 pickup"],
            "postconf -M pickup")
        reload_postfix(etc, master)
        seconds = send_all(load, smtpd_port, "sending to Postfix")
        print(f"postfix  fill: {load.messages} messages over SMTP in {seconds:.1f}s "
              f"({load.messages / seconds:.0f} msg/s)", flush=True)
        deferred = {**dict.fromkeys(POSTFIX_QUEUES, 0), "deferred": load.messages}
        try:
            wait_for(lambda: queue_counts(queue) == deferred, 60,
                     "every message in Postfix's deferred queue")
        except BenchError:
            raise BenchError(f"Postfix's queues hold {queue_counts(queue)}, expected "
                             f"{load.messages} deferred and nothing else") from None
        with sink(root / "sink") as the_sink:
            postconf(etc, f"relay_transport=relay:[127.0.0.1]:{the_sink.port}")
            reload_postfix(etc, master)
            expect(queue_counts(queue)["deferred"], load.messages, "deferred before the flush")
            cpu = CpuMeter()
            cpu.start()
            start = time.monotonic()
            run(["postqueue", "-c", str(etc), "-f"], "postqueue -f")
            try:
                wait_for(lambda: postfix_queued(queue) == 0, load.timeout, "Postfix's queue to empty")
            except BenchError as exc:
                raise BenchError(f"{exc}: {queue_counts(queue)} left, "
                                 f"{the_sink.received()} at the sink") from None
            seconds = time.monotonic() - start
            percent = cpu.percent()
            memory = pss_of_tree(master)
            check_sink(the_sink, load)
    return Result("postfix", load.messages, seconds, percent, memory)


# -- (b) continuity-relay replaying its queue --------------------------------------------------

def write_relay_config(root: Path, inbound: int, primary: int, concurrency: int | None) -> Path:
    since = dt.date.today() - dt.timedelta(days=1)  # a subscription active today, two years long
    until = since + dt.timedelta(days=730)
    replay = "probe_interval: 1s" + (f", concurrency: {concurrency}" if concurrency else "")
    config = root / "config.yaml"
    config.write_text(f"""\
hostname: relay.localhost
listen: {{inbound: 127.0.0.1:{inbound}, metrics: null}}
storage: {{maildirs: maildirs, spool: spool, owner: null}}
users_file: users.passwd
replay: {{{replay}}}
domains:
  {DOMAIN}:
    primary: 127.0.0.1:{primary}
    continuity: {{since: {since}, until: {until}}}
""")
    return config


def queue_state(root: Path) -> dict[str, int]:
    """Files in each directory of every replay queue (spool/replay/<domain>/<dir>)."""
    return {name: sum(1 for _ in root.glob(f"spool/replay/*/{name}/*")) for name in QUEUE_DIRS}


def maildir_files(root: Path) -> int:
    return sum(1 for _ in root.glob("maildirs/*/*/new/*")) + sum(1 for _ in root.glob("maildirs/*/*/cur/*"))


def fill_direct(load: Load, config: Path, _port: int) -> float:
    """Fill the queue in-process with the relay's own storage (what the listener calls)."""
    from relay.addresses import parse_mailbox
    from relay.app import build_store
    from relay.config import load as load_config

    store = build_store(load_config(config))
    start = time.monotonic()

    def keep(seq: int) -> str:
        return store.keep(parse_mailbox(load.recipient(seq)), SENDER, load.message(seq), ())

    pool = ThreadPoolExecutor(load.sessions)
    try:
        for _entry in pool.map(keep, range(load.messages), timeout=load.timeout):
            pass
    except Exception as exc:  # noqa: BLE001 - any failure of the relay's storage is a failed step
        raise BenchError(f"filling the relay's queue: {type(exc).__name__}: {exc}") from exc
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return time.monotonic() - start


def fill_smtp(load: Load, config: Path, port: int) -> float:
    """Fill the queue through `continuity-relay serve` (listening on port), the primary down."""
    log = config.parent / "fill.log"
    with serve_relay(config, log):
        seconds = send_all(load, port, "sending to the relay")
    print(f"relay fill log: {relay_log_summary(log)}")
    return seconds


def wait_exit(proc: subprocess.Popen, timeout: float) -> tuple[int, float]:
    """Wait for `proc` (exit status, peak RSS in MiB); kill it after `timeout` seconds.

    The peak is the process's VmHWM, read while it runs: `wait4`'s ru_maxrss would also count
    the memory of this script, which the child shares between (v)fork and exec."""
    deadline = time.monotonic() + timeout
    peak_kb = 0
    while True:
        peak_kb = max(peak_kb, proc_kb(f"/proc/{proc.pid}/status", "VmHWM"))
        try:
            return proc.wait(0.05), peak_kb / 1024
        except subprocess.TimeoutExpired:
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise BenchError(f"continuity-relay replay: no exit after {timeout:.0f}s") from None


def drain_replay(load: Load, config: Path, log: Path, profile: Path | None = None) -> tuple[float, str]:
    """`continuity-relay replay`, timed from start to exit; it must exit 0. With `profile`, it
    runs under `py-spy record` (collapsed stacks, every thread, idle included, into that file);
    the peak RSS is then py-spy's own."""
    command = [str(RELAY), "replay", "-c", str(config)]
    if profile is not None:
        command = [str(PY_SPY), "record", "--format", "raw", "--idle", "--threads", "--rate", "200",
                   "-o", str(profile), "--", *command]
    with log.open("wb") as out:
        start, used = time.monotonic(), children_cpu()
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        status, rss = wait_exit(proc, load.timeout)
        seconds, used = time.monotonic() - start, children_cpu() - used
    if status != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        raise BenchError(f"continuity-relay replay: exit status {status}: {' | '.join(tail)}")
    return seconds, f"{rss:.0f}MiB(peak-RSS) cpu/msg={used / load.messages * 1000:.2f}ms"


def children_cpu() -> float:
    """CPU seconds (user + system) of this script's children reaped so far: around the drain,
    the `replay` process's own, which a busy machine moves less than msg/s."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def drain_serve(load: Load, config: Path, log: Path, root: Path) -> tuple[float, str]:
    """`continuity-relay serve`, timed from start until every replay queue dir is empty."""
    start = time.monotonic()
    with serve_relay(config, log) as pid:
        empty = dict.fromkeys(QUEUE_DIRS, 0)
        try:
            wait_for(lambda: queue_state(root) == empty or not alive(pid), load.timeout,
                     "the replay queue to empty")
        except BenchError as exc:
            raise BenchError(f"{exc}: {queue_state(root)}") from None
        seconds = time.monotonic() - start
        memory = peak_rss(pid)
    return seconds, memory


def relay_log_summary(log: Path) -> str:
    """Events the relay logged (`LEVEL:event=count`, warnings and errors first) and the last
    other line (the replay command's summary). The progress bar on the same stderr redraws
    with carriage returns and log records can follow it on the same line: search, not split."""
    text = log.read_text(errors="replace")
    events = Counter(f"{level}:{name}" for level, name in LOG_RECORD.findall(text))
    others = [line.strip() for line in re.split(r"[\r\n]+", LOG_RECORD.sub("", text))
              if line.strip() and "|" not in line]  # "|": a progress bar
    ordered = sorted(events.items(), key=lambda kv: (kv[0].startswith("INFO"), kv[0]))
    return " ".join(f"{name}={count}" for name, count in ordered) + (f"; {others[-1]}" if others else "")


def bench_relay(load: Load, root: Path, fill: str, serve: bool, concurrency: int | None,
                profile: Path | None = None) -> Result:
    root.mkdir(parents=True)
    inbound = free_port()
    config = write_relay_config(root, inbound, free_port(), concurrency)
    register_users(config, load.users)
    seconds = (fill_smtp if fill == "smtp" else fill_direct)(load, config, inbound)
    print(f"relay    fill ({fill}): {load.messages} messages in {seconds:.1f}s "
          f"({load.messages / seconds:.0f} msg/s)", flush=True)
    before = queue_state(root)
    expect(before["waiting"], load.messages, "entries waiting in the replay queue")
    expect(before["msg"], load.messages, "message files in the replay queue")
    expect(maildir_files(root), load.messages, "messages in the Maildirs")
    with sink(root / "sink") as the_sink:
        write_relay_config(root, inbound, the_sink.port, concurrency)
        log = root / ("serve.log" if serve else "replay.log")
        cpu = CpuMeter()
        cpu.start()
        if serve:
            seconds, memory = drain_serve(load, config, log, root)
        else:
            seconds, memory = drain_replay(load, config, log, profile)
        percent = cpu.percent()
        print(f"relay log: {relay_log_summary(log)}")
        expect(queue_state(root), dict.fromkeys(QUEUE_DIRS, 0), "replay queue files left (per dir)")
        check_sink(the_sink, load)
    expect(maildir_files(root), load.messages, "messages left in the Maildirs after replay")
    return Result("relay", load.messages, seconds, percent, memory)


# -- main --------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--messages", type=int, default=10000)
    parser.add_argument("--users", type=int, default=100, help="recipients, round-robin")
    parser.add_argument("--size", type=int, default=4096, help="bytes per message, headers included")
    parser.add_argument("--sessions", type=int, default=20,
                        help="SMTP sessions (or storage threads) that fill the queues")
    parser.add_argument("--fill", choices=("direct", "smtp"), default="direct",
                        help="fill the relay's queue in-process (default) or through `serve`")
    parser.add_argument("--serve", action="store_true",
                        help="drain with `continuity-relay serve` instead of `replay`")
    parser.add_argument("--concurrency", type=int,
                        help="set replay.concurrency in the relay's config (default: not set)")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--relay-only", action="store_true")
    only.add_argument("--postfix-only", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir for inspection")
    parser.add_argument("--profile", type=Path, metavar="FILE",
                        help="run the relay's `replay` under py-spy, collapsed stacks into FILE")
    args = parser.parse_args(argv)
    if args.profile is not None and (args.serve or args.postfix_only):
        parser.error("--profile profiles the `replay` command: not with --serve or --postfix-only")
    if min(args.messages, args.users, args.size, args.sessions, args.concurrency or 1) < 1:
        parser.error("--messages, --users, --size, --sessions and --concurrency must be at least 1")
    return args


def preflight(args: argparse.Namespace) -> None:
    if os.geteuid() != 0:
        raise BenchError("run as root (Postfix and smtp-sink need it)")
    for tool in ("postfix", "postconf", "postqueue", "smtp-sink"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found (Debian package postfix)")
    if args.postfix_only:
        return
    if not RELAY.exists():
        raise BenchError(f"{RELAY} not found: run with the project venv's python")
    if args.profile is not None and not PY_SPY.exists():
        raise BenchError(f"{PY_SPY} not found: .venv/bin/pip install py-spy")
    if not args.serve:
        help_run = subprocess.run([str(RELAY), "replay", "--help"], capture_output=True, text=True,
                                  timeout=60)
        if help_run.returncode != 0:
            last = (help_run.stderr.strip().splitlines() or ["(no output)"])[-1]
            hint = "; drain with --serve instead" if "invalid choice" in last else ""
            raise BenchError(f"`continuity-relay replay --help` failed: {last}{hint}")


def run_benches(args: argparse.Namespace, tmp: Path) -> dict[str, Result]:
    load = Load(args.messages, args.users, args.size, args.sessions)
    drain = "serve" if args.serve else "replay"
    print(f"load: {load.messages} messages of {load.size} bytes to {load.users} users; "
          f"relay fill {args.fill}, drain `continuity-relay {drain}`"
          f"{f', replay.concurrency {args.concurrency}' if args.concurrency else ''}", flush=True)
    results: dict[str, Result] = {}
    if not args.relay_only:
        results["postfix"] = bench_postfix(load, tmp / "postfix")
        print(results["postfix"].line(), flush=True)
    if not args.postfix_only:
        results["relay"] = bench_relay(load, tmp / "relay", args.fill, args.serve, args.concurrency,
                                       args.profile and args.profile.resolve())
        print(results["relay"].line(), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    return bench_main(parse_args(argv), "bench-replay-", preflight, run_benches)


if __name__ == "__main__":
    sys.exit(main())
