"""What serve's helper processes share: the archive writer (storage/archive_feed.py), the
index follower (storage/archive_index.py) and the keeper (storage/keeper.py) each run as
`python -m relay.storage.<module>`, fed down a pipe by serve, and end when it closes."""

from __future__ import annotations

import signal


def ignore_stop_signals() -> None:
    """A helper process of serve ends when its standard input ends, never on a signal: Ctrl-C
    signals the whole foreground group, and systemd's stop every process of the unit, at once;
    serve then drains its sessions, writes what it holds and closes the pipe, and the helper
    finishes what it was given."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
