"""Where the time goes: a summary of a py-spy profile (`bench/replay.py --profile FILE`).

Reads py-spy's collapsed stacks (`--format raw`: one line a stack, frames separated by `;`,
the sample count last) and prints, per thread kind (the event loop's `MainThread`, asyncio's
worker threads `asyncio_N`, any other), its share of samples, then the functions that take the
most samples inclusively (anywhere on the stack) and at the top of the stack (self time).
A sample whose leaf is a wait (`select`, `epoll`, a lock, a thread pool queue) is idle time.

With `--groups` (profiles of `serve` taken with `py-spy record --subprocesses`, as
bench/passthrough.py does) it splits the samples by process and thread instead, and sorts each
sample of the relay's event loop into one group: idle, the primary connection's set-up and
QUIT (anywhere on the stack), else the innermost of logging, metrics, aiosmtplib, our delivery
client, aiosmtpd, our listener (relay/smtp), storage, other relay code; a sample in none of them
is asyncio itself (the loop, transports, tasks, stream reading not called from a library).

Usage: .venv/bin/python bench/profile_summary.py FILE [--top 15] [--groups]
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

FRAME = re.compile(r"^(?P<func>[^ ]+) \((?P<file>[^:)]+)(?::\d+)?\)$")
THREAD = re.compile(r"thread \(0x[0-9a-fA-F]+\)|\"?(?P<name>[\w.-]+)\"? \(\d+\)|^thread .*")


def frame_name(frame: str) -> str:
    """`func (path/to/module.py:12)` -> `module.func`, the line number left out."""
    match = FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    module = Path(match["file"]).stem
    return f"{module}.{match['func']}"


def thread_kind(frames: list[str]) -> str:
    head = " ".join(frames[:2])
    if "MainThread" in head:
        return "event loop (MainThread)"
    if "asyncio_" in head:
        return "storage threads (asyncio_N)"
    return "other threads"


def read(path: Path) -> dict[str, list[tuple[list[str], int]]]:
    stacks: dict[str, list[tuple[list[str], int]]] = defaultdict(list)
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        # py-spy's first frames name the process and the thread; the rest are calls, outer first
        calls = [frame_name(f) for f in frames if FRAME.match(f.strip())]
        stacks[thread_kind(frames)].append((calls, int(count)))
    return stacks


def summarise(stacks: dict[str, list[tuple[list[str], int]]], top: int) -> str:
    total = sum(n for items in stacks.values() for _, n in items) or 1
    lines = []
    for kind, items in sorted(stacks.items()):
        samples = sum(n for _, n in items)
        inclusive: Counter[str] = Counter()
        leaf: Counter[str] = Counter()
        for calls, n in items:
            for name in set(calls):
                inclusive[name] += n
            leaf[calls[-1] if calls else "(no Python frame)"] += n
        lines.append(f"== {kind}: {samples} samples, {100 * samples / total:.0f}% of all")
        lines.append("  inclusive:")
        lines += [f"    {100 * n / samples:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
        lines.append("  self (top of stack):")
        lines += [f"    {100 * n / samples:5.1f}%  {name}" for name, n in leaf.most_common(top)]
    return "\n".join(lines)


# -- --groups: by process and thread, the event loop's samples in groups ---------------------

RAW_FRAME = re.compile(r"^(?P<func>[^ ]+) \((?P<file>[^:)]+)(?::\d+)?\)$")
IDLE_LEAVES = {("selectors.py", "select"), ("threading.py", "wait"), ("queue.py", "get"),
               ("thread.py", "_worker"), ("handlers.py", "dequeue"), ("unix_events.py", "_do_waitpid"),
               ("archive_index.py", "stop")}       # the follower's poll: select on its stdin
SETUP = {"_connect", "_open", "quit", "close"}      # relay/delivery/client.py's Upstream
ROOTS = {"<module>", "main", "_run", "cmd_serve", "run", "Runner.run", "run_until_complete",
         "BaseEventLoop.run_until_complete", "BaseEventLoop.run_forever", "BaseEventLoop._run_once",
         "Handle._run"}     # on every stack of the loop: left out of the inclusive list
Sample = tuple[list[tuple[str, tuple[str, ...]]], int]   # (func, path parts) outer first; count


def where(labels: list[str]) -> str:
    """`process N:"cmd"` labels (one a level with --subprocesses) and `thread (N): Name`."""
    command = next((label for label in reversed(labels) if label.startswith("process ")), "")
    thread = next((label.split(": ", 1)[-1] for label in labels if label.startswith("thread ")), "")
    process = ("archive index follower" if "archive_index" in command else
               "relay" if "continuity-relay" in command or not command else command[:40])
    if thread == "MainThread":
        return f"{process}: event loop (MainThread)" if process == "relay" else f"{process}: main"
    return f"{process}: " + (re.sub(r"_\d+$", "_N", thread) or "other threads")


def read_raw(path: Path) -> dict[str, list[Sample]]:
    found: dict[str, list[Sample]] = defaultdict(list)
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        labels, calls = [], []
        for part in stack.split(";"):
            match = RAW_FRAME.match(part.strip())
            if match and not part.startswith(("process ", "thread ")):
                calls.append((match["func"], Path(match["file"]).parts))
            else:
                labels.append(part.strip())
        found[where(labels)].append((calls, int(count)))
    return found


def package(parts: tuple[str, ...]) -> str | None:
    """The group a frame's file belongs to, or None for the standard library and the rest."""
    if "logging" in parts or parts[-2:] == ("relay", "log.py"):
        return "logging"
    if "prometheus_client" in parts or parts[-2:] == ("relay", "metrics.py"):
        return "metrics"
    for name, group in (("aiosmtplib", "aiosmtplib client"), ("aiosmtpd", "aiosmtpd (session, parsing)")):
        if name in parts:
            return group
    if "relay" in parts and parts[-1] != "cli.py":        # cli.py: the root of every stack
        below = parts[parts.index("relay") + 1:]
        return {"delivery": "our delivery client (relay/delivery)",
                "smtp": "our listener (relay/smtp: inbound handler, server.py, limits)",
                "storage": "storage on the loop (relay/storage)"}.get(
                    below[0] if len(below) > 1 else "", f"other relay code ({'/'.join(below)})")
    return None


def group_of(calls: list[tuple[str, tuple[str, ...]]]) -> str:
    if calls and (calls[-1][1][-1], calls[-1][0].rsplit(".", 1)[-1]) in IDLE_LEAVES:
        return "idle (waiting)"
    if any(func.rsplit(".", 1)[-1] in SETUP and parts[-2:] == ("delivery", "client.py")
           for func, parts in calls):
        return "primary connection: set-up and QUIT"
    for _func, parts in reversed(calls):
        if (group := package(parts)) is not None:
            return group
    return "asyncio itself (loop, transports, tasks)"


def grouped(path: Path, top: int = 10) -> str:
    """Per process and thread its share; for the relay's event loop, the groups, then its top
    functions by self and inclusive samples."""
    found = read_raw(path)
    total = sum(n for items in found.values() for _, n in items) or 1
    lines = [f"{len(found)} threads, {total} samples"]
    for name, items in sorted(found.items(), key=lambda kv: -sum(n for _, n in kv[1])):
        samples = sum(n for _, n in items)
        idle = sum(n for calls, n in items if group_of(calls) == "idle (waiting)")
        lines.append(f"  {name}: {samples} samples, busy {100 * (samples - idle) / samples:.0f}%")
    loop = found.get("relay: event loop (MainThread)", [])
    samples = sum(n for _, n in loop) or 1
    groups: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    for calls, n in loop:
        groups[group_of(calls)] += n
        if group_of(calls) == "idle (waiting)":
            continue
        for name in {f"{Path(parts[-1]).stem}.{func}" for func, parts in calls if func not in ROOTS}:
            inclusive[name] += n
        leaf[f"{Path(calls[-1][1][-1]).stem}.{calls[-1][0]}" if calls else "(no Python frame)"] += n
    lines.append("event loop, all its samples, in groups:")
    lines += [f"  {100 * n / samples:5.1f}%  {name}" for name, n in groups.most_common()]
    lines.append("event loop, busy samples, inclusive:")
    lines += [f"  {100 * n / samples:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    lines.append("event loop, busy samples, self (top of stack):")
    lines += [f"  {100 * n / samples:5.1f}%  {name}" for name, n in leaf.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--groups", action="store_true", help="by process and thread; the event "
                        "loop's samples in groups (aiosmtpd, aiosmtplib, logging, ...)")
    args = parser.parse_args(argv)
    print(grouped(args.file, args.top) if args.groups else summarise(read(args.file), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
