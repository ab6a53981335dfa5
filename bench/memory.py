"""Memory of `continuity-relay serve` (issue 13): idle, one big message kept and replayed,
twenty big messages at once. Each figure is printed against its goal.

Each scenario starts a fresh relay (so its VmHWM, the kernel's peak RSS, is the scenario's
own), with the shipped-style configuration: web panel and metrics listening, the archive on,
`message_size_limit: 50MiB`. Mail comes from Postfix's `smtp-source` (C, so the sender's own
memory is not in the way); the primary is a closed port (an outage) or `smtp-sink`.

  idle      RSS once the relay has listened for IDLE_SECONDS         goal <= 80 MB
  keep+replay  one SIZE message kept while the primary is down, then
            the primary (smtp-sink) comes up and serve replays it:
            peak RSS over both                                       goal <= 2 x SIZE + 60 MB
  20 at once   SESSIONS messages of SIZE in parallel, primary down    goal <= 400 MB
  20 passed    the same with the primary up (pass-through)           (no goal; shown)

`limits.idle_timeout` is 10m here: on a loaded shared machine, twenty 50 MB DATA transfers
can stall a session past the default 60s while smtp-source and the disk catch up.

Figures are MB (10^6 bytes) from /proc/PID/status (VmRSS, VmHWM), of serve's own process; its
helper processes (the archive writer, the index follower, the keeper) are shown beside it.
Messages are SIZE bytes of body (default 50,000,000: under the 50 MiB limit once headers are
added).

Usage: .venv/bin/python bench/memory.py [--size 50000000] [--sessions 20]
       [--relay PATH/TO/continuity-relay] [--only idle,keep,many,pass] [--keep]
Needs root (smtp-sink -u postfix) and the Debian postfix package. Exit status 0 when every step
worked (a goal missed is printed, not an error), 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import inbound as bench  # noqa: E402  (bench/inbound.py: the helpers both scripts share)

DOMAIN, RECIPIENT, SENDER = bench.DOMAIN, bench.RECIPIENT, bench.SENDER
IDLE_SECONDS = 5
MB = 1_000_000


def status_kb(pid: int, key: str) -> int:
    return bench.proc_kb(f"/proc/{pid}/status", key)


def write_config(root: Path, port: int, primary: int) -> Path:
    root.mkdir(parents=True)
    since = dt.date.today() - dt.timedelta(days=1)
    config = root / "config.yaml"
    config.write_text(f"""\
hostname: relay.localhost
listen: {{inbound: 127.0.0.1:{port}, web: 127.0.0.1:{bench.free_port()},
          metrics: 127.0.0.1:{bench.free_port()}}}
storage: {{maildirs: maildirs, spool: spool, archive: archive, owner: null}}
users_file: users.passwd
message_size_limit: 50MiB
max_recipients: 100
web: {{tls: false, secret_file: web.secret, revoked_file: web.revoked}}
admins_file: admins.passwd
audit_log: audit.log
limits: {{idle_timeout: 10m}}
domains:
  {DOMAIN}:
    primary: 127.0.0.1:{primary}
    continuity: {{since: {since}, until: {since + dt.timedelta(days=730)}}}
""")
    return config


def source(port: int, size: int, sessions: int) -> None:
    """`sessions` messages of `size` bytes, all at once, one `smtp-source` process each (one
    process with -s N writes one session's DATA at a time); every one must get its 250."""
    cmd = ["smtp-source", "-s", "1", "-m", "1", "-l", str(size), "-f", SENDER, "-t", RECIPIENT,
           f"127.0.0.1:{port}"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for _ in range(sessions)]
    errors = [(p.wait(600), p.stderr.read()) for p in procs if p.stderr is not None]
    for status, err in errors:
        if status != 0:
            raise bench.BenchError(f"smtp-source exited {status}: {err[-300:]!r}")


def queued(root: Path) -> int:
    return sum(1 for state in ("waiting", "active") for _ in root.glob(f"spool/replay/*/{state}/*"))


@contextlib.contextmanager
def sink_on(port: int):
    """`smtp-sink` taking every message on `port`."""
    proc = subprocess.Popen(["smtp-sink", "-u", "postfix", f"127.0.0.1:{port}", "256"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        bench.wait_for(lambda: proc.poll() is not None or bench.listening(port), 10, "smtp-sink")
        if proc.poll() is not None:
            raise bench.BenchError(f"smtp-sink exited with status {proc.returncode}")
        yield
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def running(root: Path, primary: int):
    port = bench.free_port()
    config = write_config(root, port, primary)
    bench.register_users(config, 1)
    with bench.relay(config, root / "relay.log") as pid:
        yield pid, port


def helpers(pid: int, field: str = "VmHWM") -> str:
    """serve's helper processes (archive writer, index follower, keeper: not in the goals'
    figure, which is serve's own): each one's `field` and their PSS now, summed."""
    found = bench.children(pid)
    peak = sum(status_kb(p, field) for p in found) * 1024 / MB
    pss = sum(bench.proc_kb(f"/proc/{p}/smaps_rollup", "Pss") for p in found) * 1024 / MB
    return f"helpers ({len(found)} processes): {field} {peak:.0f} MB, PSS now {pss:.0f} MB"


def idle(root: Path, size: int, sessions: int) -> tuple[float, float, str]:
    with running(root, bench.free_port()) as (pid, _):
        time.sleep(IDLE_SECONDS)       # settled: the runners' first sweeps and probes done
        return status_kb(pid, "VmRSS") * 1024 / MB, 80, helpers(pid, "VmRSS")


def keep_and_replay(root: Path, size: int, sessions: int) -> tuple[float, float, str]:
    primary = bench.free_port()
    with running(root, primary) as (pid, port):
        source(port, size, 1)
        bench.expect(queued(root), 1, "kept messages waiting")
        with sink_on(primary):         # the primary comes back: serve replays by itself
            bench.wait_for(lambda: queued(root) == 0, 300, "the replay to finish")
        return status_kb(pid, "VmHWM") * 1024 / MB, 2 * size / MB + 60, helpers(pid)


def many(root: Path, size: int, sessions: int) -> tuple[float, float, str]:
    with running(root, bench.free_port()) as (pid, port):
        source(port, size, sessions)
        bench.expect(queued(root), sessions, "kept messages waiting")
        return status_kb(pid, "VmHWM") * 1024 / MB, 400, helpers(pid)


def passed(root: Path, size: int, sessions: int) -> tuple[float, float, str]:
    sink = bench.free_port()
    with sink_on(sink), running(root, sink) as (pid, port):
        source(port, size, sessions)
        bench.expect(queued(root), 0, "kept messages")
        return status_kb(pid, "VmHWM") * 1024 / MB, 0, helpers(pid)


SCENARIOS = {"idle": ("idle RSS", idle), "keep": ("1 message kept, then replayed: peak", keep_and_replay),
             "many": ("{n} at once, kept: peak", many), "pass": ("{n} at once, passed: peak", passed)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=50_000_000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--relay", type=Path, default=bench.RELAY)
    parser.add_argument("--only", default=",".join(SCENARIOS))
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = parser.parse_args(argv)
    bench.RELAY = args.relay
    tmp = Path(tempfile.mkdtemp(prefix="relay-memory-"))
    failed = False
    try:
        for name in args.only.split(","):
            label, scenario = SCENARIOS[name]
            try:
                figure, goal, beside = scenario(tmp / name, args.size, args.sessions)
            except bench.BenchError as exc:
                print(f"{name}: FAILED: {exc}")
                failed = True
                continue
            verdict = "(no goal)" if not goal else ("ok" if figure <= goal else "MISSED")
            shown = f"goal <= {goal:.0f} MB {verdict}" if goal else verdict
            print(f"{label.format(n=args.sessions):40} {figure:7.0f} MB   {shown}   {beside}", flush=True)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
