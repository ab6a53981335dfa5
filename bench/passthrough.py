"""Pass-through: the relay handing mail to a healthy primary vs Postfix relaying it, and the
latency the relay adds to each message.

Throughput. The same load from Postfix's `smtp-source` (N messages of SIZE bytes, SESSIONS
concurrent sessions, one message per connection, all to `user1@example.com`), one leg after
the other in one run, each with a fresh `smtp-sink` as the next hop:

  postfix         a private Postfix instance (as in inbound.py) with `relay_transport =
                  relay:[127.0.0.1]:<sink>`: it queues each message (fsync) before the 250 and
                  then delivers it. Two figures: the senders' rate (smtp-source's start to exit)
                  and the delivered rate (until the sink counted N and Postfix's queue is empty).
  relay           `continuity-relay serve` with example.com's primary on the sink,
                  `storage.archive` off: each message goes to the sink inside the sender's DATA.
  relay+archive   the same with `storage.archive` on, as the shipped config has it.

Checked: the sink's own counter (`smtp-sink -c`) says N after each leg, the relay kept nothing
(no Maildir file, no queue entry) and, with the archive on, archived N messages that verify.
Printed per leg: msg/s, the machine's CPU during the load (100% = all cores busy), the
server's own CPU a message (its whole process tree: Postfix's daemons; the relay and its archive
index follower) and memory; then `ratio relay/postfix` for both relay legs, against Postfix's
senders' rate (the figure of issue 13) and against its delivered rate.

Latency. One client (Python smtplib) at a time, K messages to each target: the sink reached
directly, and the relay (archive off, and on) in front of the same sink. Two modes:

  transaction   one connection per target, K transactions one after the other on it; the time
                from sending MAIL FROM to the 250 after DATA.
  connection    one message per connection; the time from connect to the reply to QUIT (what
                an MTA mostly does: the relay then opens a primary connection for each message).

The targets take turns in rounds (K/ROUNDS messages each, the order rotating), so the
neighbours' load hits them alike. Printed: p50 and p95 of each, the relay's added p50 and
p95 (relay minus direct) and, per transaction, the p50 of each step (MAIL, RCPT, DATA to the
354, the message to the 250).

`--profile DIR` runs `py-spy record` (in the venv) on each relay leg's process tree for the
length of the load (DIR/relay.raw, DIR/relay+archive.raw) and prints a summary of where the
event loop's time went (bench/profile_summary.py --groups FILE prints it again).

Usage: .venv/bin/python bench/passthrough.py [--messages 5000] [--sessions 20] [--size 4096]
       [--users 100] [--latency 2000] [--rounds 20] [--latency-only | --throughput-only]
       [--profile DIR] [--keep] [--onoff PAIRS]
`--onoff PAIRS` runs the relay with the archive off and on PAIRS times, each pair in the other
order than the one before, and prints every on/off ratio and their median (issue 11's 10%).
Exit status 0 when every step succeeded and every count matched, 1 otherwise, 2 on bad usage.
Needs root, the Debian postfix package and the project venv (run it with .venv/bin/python).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import smtplib
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from inbound import (
    PY_SPY,
    RECIPIENT,
    RELAY,
    SENDER,
    BenchError,
    Load,
    bench_main,
    children,
    expect,
    free_port,
    listening,
    log_summary,
    peak_rss,
    postfix,
    postfix_queued,
    pss_of_tree,
    register_users,
    relay,
    relay_stored,
    send_load,
    spy,
    wait_for,
    write_relay_config,
)
from profile_summary import grouped

COUNTER = re.compile(rb"mesg=(\d+)")


# -- the sink ----------------------------------------------------------------------------------

@dataclass
class Sink:
    port: int
    counters: Path

    def count(self) -> int:
        """smtp-sink's `-c` counter of messages ended with a dot; it rewrites its line on stdout
        (`sess=.. quit=.. mesg=..\\r`) at every event and before its 250, so the tail is current."""
        with self.counters.open("rb") as out:
            out.seek(max(0, self.counters.stat().st_size - 256))
            found = COUNTER.findall(out.read())
        return int(found[-1]) if found else 0


@contextmanager
def counting_sink(root: Path) -> Iterator[Sink]:
    """A running `smtp-sink` that takes every message, keeps none and counts them."""
    root.mkdir(parents=True)
    port = free_port()
    counters = root / "sink.out"
    with counters.open("wb") as out, (root / "sink.err").open("wb") as err:
        proc = subprocess.Popen(["smtp-sink", "-u", "postfix", "-c", f"127.0.0.1:{port}", "256"],
                                stdout=out, stderr=err)
    try:
        wait_for(lambda: proc.poll() is not None or listening(port), 10, "smtp-sink to listen")
        if proc.poll() is not None:
            error = (root / "sink.err").read_text(errors="replace").strip()
            raise BenchError(f"smtp-sink exited with status {proc.returncode}: {error}")
        yield Sink(port, counters)
        if proc.poll() is not None:
            raise BenchError(f"smtp-sink died during the run, status {proc.returncode}")
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)


# -- measuring ---------------------------------------------------------------------------------

def tree_cpu(pid: int) -> float:
    """CPU seconds of `pid` and every descendant, the children they reaped included (Postfix's
    daemons come and go): compare two readings to get what a load cost."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15])     # utime stime cutime cstime
        todo += children(p)
    return total / tick


def process_cpu(pid: int) -> float:
    """CPU seconds of `pid` alone (serve, without its archive writer and index follower)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:13]) / os.sysconf("SC_CLK_TCK")


def poll_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """wait_for at 5 ms: the delivered time must not be rounded up to 100 ms."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.005)


@dataclass(frozen=True)
class Leg:
    name: str
    messages: int
    seconds: float              # smtp-source's start to exit: the rate the senders see
    delivered: float            # until the sink had every message
    machine_cpu: float
    server_cpu: float           # CPU seconds of the server's process tree during the load
    memory: str
    own_cpu: float | None = None    # of which the relay's own process (not the archive's)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    @property
    def delivered_rate(self) -> float:
        return self.messages / self.delivered

    def line(self) -> str:
        return (f"{self.name:13} msgs={self.messages} seconds={self.seconds:.2f} "
                f"msg/s={self.rate:.0f} delivered-msg/s={self.delivered_rate:.0f} "
                f"cpu={self.machine_cpu:.0f}% server-cpu={1000 * self.server_cpu / self.messages:.2f}"
                f"ms/msg memory={self.memory}"
                + (f" serve-process-cpu={1000 * self.own_cpu / self.messages:.2f}ms/msg"
                   if self.own_cpu is not None else ""))


# -- throughput --------------------------------------------------------------------------------

def leg_postfix(load: Load, root: Path) -> Leg:
    with counting_sink(root / "sink") as sink:
        port = free_port()
        with postfix(root / "postfix", port, sink.port) as master:
            cpu0 = tree_cpu(master)
            start = time.monotonic()
            seconds, machine = send_load(load, port)
            poll_until(lambda: sink.count() >= load.messages, load.timeout, "the sink to have all")
            delivered = time.monotonic() - start
            queue = root / "postfix" / "queue"
            wait_for(lambda: postfix_queued(queue) == 0, 30, "Postfix's queue to empty")
            server_cpu = tree_cpu(master) - cpu0
            memory = pss_of_tree(master)
        expect(sink.count(), load.messages, "messages counted by smtp-sink")
    return Leg("postfix", load.messages, seconds, delivered, machine, server_cpu, memory)


def leg_relay(load: Load, root: Path, archive: bool, profile: Path | None) -> Leg:
    name = "relay+archive" if archive else "relay"
    with counting_sink(root / "sink") as sink:
        port = free_port()
        config = write_relay_config(root / "relay", port, sink.port, archive)
        register_users(config, load.users)
        log = root / "relay" / "relay.log"
        with relay(config, log) as pid:
            cpu0, own0 = tree_cpu(pid), process_cpu(pid)
            with spy(pid, profile):
                seconds, machine = send_load(load, port)
            server_cpu, own_cpu = tree_cpu(pid) - cpu0, process_cpu(pid) - own0
            memory = peak_rss(pid)
            counted = sink.count()          # the relay answers 250 after the sink's: all in
            kept = relay_stored(root / "relay")
    print(f"{name} log: {log_summary(log)}")
    expect(counted, load.messages, "messages counted by smtp-sink")
    expect(sum(kept), 0, "messages the relay kept (Maildir files + queue entries)")
    if archive:          # the writer flushed at SIGTERM: every message is in, and verifies
        from relay.storage.archive import Archive
        archived = Archive(root / "relay" / "archive")
        expect(sum(1 for _ in archived.records()), load.messages, "archived messages")
        expect(len(archived.verify()), 0, "archive problems")
    return Leg(name, load.messages, seconds, seconds, machine, server_cpu, memory, own_cpu)


def throughput(args: argparse.Namespace, tmp: Path) -> None:
    load = Load(args.messages, args.sessions, args.size, args.users)
    print(f"throughput: {load.messages} messages, {load.size} bytes, {load.sessions} sessions, "
          f"one message a connection, to {RECIPIENT}", flush=True)
    legs = [leg_postfix(load, tmp / "postfix")]
    print(legs[0].line(), flush=True)
    for archive in (False, True):
        profile = None
        if args.profile is not None:
            profile = args.profile / ("relay+archive.raw" if archive else "relay.raw")
        legs.append(leg_relay(load, tmp / ("relay-archive" if archive else "relay"), archive,
                              profile))
        print(legs[-1].line(), flush=True)
    postfix_leg = legs[0]
    for leg in legs[1:]:
        print(f"ratio {leg.name}/postfix = {leg.rate / postfix_leg.rate:.2f} (senders' rate); "
              f"{leg.rate / postfix_leg.delivered_rate:.2f} (against Postfix's delivered rate); "
              f"server cpu a message {leg.server_cpu / postfix_leg.server_cpu:.2f}x Postfix's")
    print(f"ratio relay+archive/relay = {legs[2].rate / legs[1].rate:.2f} (the archive on/off)")
    if args.onoff > 1:
        archive_pairs(args, load, tmp, (legs[1], legs[2]))
    if args.profile is not None:
        for name in ("relay", "relay+archive"):
            print(f"\n== profile {name} ({args.profile / (name + '.raw')}) ==")
            print(grouped(args.profile / f"{name}.raw"))


def archive_pairs(args: argparse.Namespace, load: Load, tmp: Path, first: tuple[Leg, Leg]) -> None:
    """More pairs of relay legs, archive off and on, each pair in the other order than the one
    before (the first pair ran off, then on): a machine that slows or speeds up over a run (a
    neighbour, the disk writing back the legs before) then weighs on both sides alike."""
    ratios = [first[1].rate / first[0].rate]
    for pair in range(1, args.onoff):
        order = (True, False) if pair % 2 else (False, True)
        ran = {archive: leg_relay(load, tmp / f"pair{pair}-{archive}", archive, None) for archive in order}
        ratios.append(ran[True].rate / ran[False].rate)
        print(f"pair {pair + 1} ({'on first' if order[0] else 'off first'}): "
              f"{ran[False].line()}\n  {ran[True].line()}\n  on/off {ratios[-1]:.2f}", flush=True)
    print(f"archive on/off over {len(ratios)} pairs: {' '.join(f'{r:.2f}' for r in ratios)}; "
          f"median {statistics.median(ratios):.2f}")


# -- latency -----------------------------------------------------------------------------------

def message(size: int) -> bytes:
    """SIZE bytes exactly: a few headers and 78-byte CRLF lines (no line starts with a dot)."""
    head = (f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: pass-through latency\r\n"
            "Message-ID: <latency@bench.localhost>\r\n\r\n").encode()
    lines, rest = divmod(max(size - len(head), 2), 78)
    body = [b"x" * 76] * lines
    if rest >= 2:
        body.append(b"y" * (rest - 2))
    elif rest == 1:
        body[-1] += b"x"
    return head + b"".join(line + b"\r\n" for line in body)


class Target:
    """One SMTP server to time against: a name, its port, and the samples taken."""

    def __init__(self, name: str, port: int) -> None:
        self.name, self.port = name, port
        self.session: smtplib.SMTP | None = None
        self.samples: dict[str, list[float]] = {"transaction": [], "connection": []}
        self.steps: list[list[float]] = []      # per transaction, seconds per step (STEPS)

    def connect(self) -> smtplib.SMTP:
        smtp = smtplib.SMTP("127.0.0.1", self.port, local_hostname="bench.localhost", timeout=30)
        smtp.ehlo()
        return smtp

    def one_transaction(self, data: bytes) -> None:
        if self.session is None:
            self.session = self.connect()
        start = time.perf_counter()
        self.steps.append(send(self.session, data))
        self.samples["transaction"].append(time.perf_counter() - start)

    def one_connection(self, data: bytes) -> None:
        start = time.perf_counter()
        smtp = self.connect()
        send(smtp, data)
        code, text = smtp.quit()
        self.samples["connection"].append(time.perf_counter() - start)
        if code != 221:
            raise BenchError(f"{self.name}: QUIT answered {code} {text!r}")

    def close(self) -> None:
        if self.session is not None:
            self.session.quit()
            self.session = None


STEPS = ("MAIL", "RCPT", "DATA", "message")   # DATA: to the 354; message: to the final 250


def send(smtp: smtplib.SMTP, data: bytes) -> list[float]:
    """MAIL, RCPT, DATA and the message (CRLF lines, none starting with a dot: sent as it is),
    one round trip each; anything but the expected reply fails. Seconds each step took."""
    marks = [time.perf_counter()]
    for step, call, wanted in (("MAIL", lambda: smtp.mail(SENDER), 250),
                               ("RCPT", lambda: smtp.rcpt(RECIPIENT), 250),
                               ("DATA", lambda: smtp.docmd("DATA"), 354),
                               ("message", lambda: (smtp.send(data + b".\r\n"), smtp.getreply())[1],
                                250)):
        code, text = call()
        if code != wanted:
            raise BenchError(f"{step} answered {code} {text!r}")
        marks.append(time.perf_counter())
    return [b - a for a, b in zip(marks, marks[1:], strict=False)]


def percentile(samples: list[float], p: float) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[p - 1] if len(samples) > 1 \
        else samples[0]


def take_turns(targets: list[Target], mode: str, count: int, rounds: int, data: bytes) -> None:
    """`count` messages to each target, in `rounds` turns whose order rotates."""
    per_round = max(1, count // rounds)
    done = 0
    for turn in range(rounds):
        todo = per_round if turn < rounds - 1 else count - done
        done += todo
        order = targets[turn % len(targets):] + targets[:turn % len(targets)]
        for target in order:
            for _ in range(todo):
                try:
                    if mode == "transaction":
                        target.one_transaction(data)
                    else:
                        target.one_connection(data)
                except (smtplib.SMTPException, OSError) as exc:
                    raise BenchError(f"{target.name} ({mode}): {type(exc).__name__}: {exc}") from None


def report(targets: list[Target], mode: str, what: str) -> None:
    direct = targets[0].samples[mode]
    p50, p95 = percentile(direct, 50), percentile(direct, 95)
    print(f"latency, {what}:")
    print(f"  {targets[0].name:13} n={len(direct)} p50={1000 * p50:.2f} ms p95={1000 * p95:.2f} ms")
    for target in targets[1:]:
        samples = target.samples[mode]
        q50, q95 = percentile(samples, 50), percentile(samples, 95)
        print(f"  {target.name:13} n={len(samples)} p50={1000 * q50:.2f} ms p95={1000 * q95:.2f} ms"
              f"  added p50={1000 * (q50 - p50):.2f} ms p95={1000 * (q95 - p95):.2f} ms")
    if mode == "transaction":
        print("  p50 of each step (" + ", ".join(STEPS) + "; DATA: to the 354, message: to the 250):")
        for target in targets:
            p50s = [statistics.median(column) for column in zip(*target.steps, strict=True)]
            print(f"  {target.name:13} " + " ".join(f"{1000 * v:.2f}" for v in p50s) + " ms")


def latency(args: argparse.Namespace, tmp: Path) -> None:
    data = message(args.size)
    print(f"latency: {args.latency} messages of {len(data)} bytes to each target, one client, "
          f"{args.rounds} rounds taking turns", flush=True)
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(counting_sink(tmp / "latency-sink"))
        targets = [Target("direct", sink.port)]
        for name, archive in (("relay", False), ("relay+archive", True)):
            port = free_port()
            config = write_relay_config(tmp / f"latency-{name}", port, sink.port, archive)
            register_users(config, args.users)
            stack.enter_context(relay(config, config.parent / "relay.log"))
            targets.append(Target(name, port))
        warm = [Target(t.name, t.port) for t in targets]   # imports, first connections: not timed
        take_turns(warm, "transaction", 20, 1, data)
        take_turns(warm, "connection", 20, 1, data)
        for target in warm:
            target.close()
        take_turns(targets, "transaction", args.latency, args.rounds, data)
        for target in targets:
            target.close()
        take_turns(targets, "connection", args.latency, args.rounds, data)
        expected = 2 * len(targets) * (args.latency + 20)
        poll_until(lambda: sink.count() >= expected, 30, "the sink to count every message")
        expect(sink.count(), expected, "messages counted by smtp-sink")
    for name in ("relay", "relay+archive"):
        expect(sum(relay_stored(tmp / f"latency-{name}")), 0, f"messages {name} kept")
    report(targets, "transaction", f"one connection, {args.latency} transactions in a row "
           "(MAIL FROM to the 250 after DATA)")
    report(targets, "connection", "one message a connection (connect to the reply to QUIT)")


# -- main --------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--messages", type=int, default=5000, help="throughput: messages a leg")
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=4096, help="bytes a message")
    parser.add_argument("--users", type=int, default=100, help="registered users")
    parser.add_argument("--latency", type=int, default=2000, metavar="K",
                        help="latency: messages to each target in each mode")
    parser.add_argument("--rounds", type=int, default=20, help="latency: turns the targets take")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--latency-only", action="store_true")
    only.add_argument("--throughput-only", action="store_true")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="py-spy on each relay throughput leg, collapsed stacks into DIR")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir for inspection")
    parser.add_argument("--onoff", type=int, default=1, metavar="PAIRS",
                        help="throughput: relay legs with the archive off and on, PAIRS times, "
                             "in alternating order; prints each ratio and their median")
    args = parser.parse_args(argv)
    if min(args.messages, args.sessions, args.size, args.users, args.latency, args.rounds) < 1:
        parser.error("--messages, --sessions, --size, --users, --latency and --rounds must be "
                     "at least 1")
    if args.profile is not None and args.latency_only:
        parser.error("--profile profiles the throughput legs: not with --latency-only")
    return args


def preflight(args: argparse.Namespace) -> None:
    if os.geteuid() != 0:
        raise BenchError("run as root (Postfix's start-up and queue, smtp-sink -u, need it)")
    for tool in ("smtp-source", "smtp-sink", "postfix"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found (Debian package postfix)")
    if not RELAY.exists():
        raise BenchError(f"{RELAY} not found: run with the project venv's python")
    if args.profile is not None:
        if not PY_SPY.exists():
            raise BenchError(f"{PY_SPY} not found: .venv/bin/pip install py-spy")
        args.profile = args.profile.resolve()
        args.profile.mkdir(parents=True, exist_ok=True)


def run_benches(args: argparse.Namespace, tmp: Path) -> dict:
    if not args.latency_only:
        throughput(args, tmp)
    if not args.throughput_only:
        latency(args, tmp)
    return {}


def main(argv: list[str] | None = None) -> int:
    return bench_main(parse_args(argv), "bench-passthrough-", preflight, run_benches)


if __name__ == "__main__":
    sys.exit(main())
