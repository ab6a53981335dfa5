"""Free space under the storage roots, and how many days of mail it holds at the rate observed.

`DiskWatch.sample()` (blocking: one statvfs per root) measures each file system once, however
many roots share it, and keeps the samples of the last `WINDOW` seconds in memory. The rate is
the fall in free space from the oldest sample in the window to the newest, per day: what every
writer (Maildirs, queues, archive) took, net of purges. A window shorter than `MIN_SPAN`, or
free space that did not fall, gives no rate (None: no estimate, never an alert). A restart
starts the window over: nothing is written.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

WINDOW = 86400.0       # the samples a rate is taken from: the last day
MIN_SPAN = 600.0       # a rate needs samples at least this far apart


@dataclass(frozen=True)
class Reading:
    """One file system under the storage roots."""

    roots: tuple[str, ...]         # the configured roots on it
    free: int                      # bytes free to an unprivileged writer
    per_day: float | None          # bytes taken a day, as observed; None: not known (yet)

    @property
    def days(self) -> float | None:
        """Days until it is full at `per_day`; None without a rate."""
        return self.free / self.per_day if self.per_day else None


def rate_per_day(samples: Iterable[tuple[float, int]]) -> float | None:
    """Bytes a day taken, from (time, free bytes) samples oldest first; None when they span
    less than MIN_SPAN or free space did not fall."""
    points = list(samples)
    if len(points) < 2:
        return None
    (start, free_then), (end, free_now) = points[0], points[-1]
    if end - start < MIN_SPAN or free_now >= free_then:
        return None
    return (free_then - free_now) / (end - start) * 86400.0


def free_bytes(path: Path) -> tuple[int, int]:
    """(device, bytes free to a non-root writer) of the file system holding `path`. The device
    number tells file systems apart (statvfs's f_fsid is 0 on some, e.g. overlayfs)."""
    st = os.statvfs(path)
    return os.stat(path).st_dev, st.f_bavail * st.f_frsize


class DiskWatch:
    """Samples of the storage roots' file systems; `sample()` returns a Reading per file system."""

    def __init__(self, roots: Iterable[Path], measure: Callable[[Path], tuple[int, int]] = free_bytes,
                 clock: Callable[[], float] | None = None) -> None:
        self.roots = [root for root in roots if root is not None]
        self.measure = measure
        self.clock = clock or time.time
        self._samples: dict[int, deque[tuple[float, int]]] = {}

    def sample(self) -> list[Reading]:
        now = self.clock()
        systems: dict[int, tuple[list[str], int]] = {}
        for root in self.roots:
            try:
                fsid, free = self.measure(root)
            except OSError:           # not there (yet): nothing to fill; the others still count
                continue
            systems.setdefault(fsid, ([], free))[0].append(str(root))
        readings = []
        for fsid, (roots, free) in systems.items():
            samples = self._samples.setdefault(fsid, deque())
            samples.append((now, free))
            while samples and now - samples[0][0] > WINDOW:
                samples.popleft()
            readings.append(Reading(tuple(roots), free, rate_per_day(samples)))
        return readings
