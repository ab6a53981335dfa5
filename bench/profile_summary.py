"""Where the time goes: a summary of a py-spy profile (`bench/replay.py --profile FILE`).

Reads py-spy's collapsed stacks (`--format raw`: one line a stack, frames separated by `;`,
the sample count last) and prints, per thread kind (the event loop's `MainThread`, asyncio's
worker threads `asyncio_N`, any other), its share of samples, then the functions that take the
most samples inclusively (anywhere on the stack) and at the top of the stack (self time).
A sample whose leaf is a wait (`select`, `epoll`, a lock, a thread pool queue) is idle time.

Usage: .venv/bin/python bench/profile_summary.py FILE [--top 15]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    print(summarise(read(args.file), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
