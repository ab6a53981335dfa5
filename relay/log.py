"""Logging set-up: one logger per subsystem, one key=value line per state change, to stderr.

Call sites use `event("replay.primary_up", domain=..., queued=...)`: the event's prefix names its
logger (`relay.replay`), so a logger and its events can never disagree. Values are quoted
(`quote`) when they hold spaces, quotes, backslashes or control characters, and never contain a
password or a message body (callers pass neither).
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue
import sys

_listener: logging.handlers.QueueListener | None = None


def setup(level: str = "INFO") -> None:
    """Send every `relay.*` logger to stderr with a timestamp, through a queue and a thread of
    its own: a log line never blocks the event loop on a slow pipe or a disk busy flushing."""
    global _listener
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    stop()
    lines: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    _listener = logging.handlers.QueueListener(lines, handler)
    _listener.start()
    root = logging.getLogger("relay")
    root.handlers[:] = [logging.handlers.QueueHandler(lines)]
    root.setLevel(level)
    root.propagate = False
    # aiosmtpd logs every peer and recipient at INFO: that is ours to say, once.
    logging.getLogger("mail.log").setLevel(logging.WARNING)


def stop() -> None:
    """Write what is queued, then end the writing thread (at exit, and before a new set-up)."""
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None


atexit.register(stop)


def quote(value: object) -> str:
    """A value for a `key=value` line, readable back unambiguously: bare when it is plain text,
    else in double quotes with `\\` and `"` escaped by a backslash, and line ends and other
    control characters written as `\\n`, `\\r`, `\\t`, `\\xNN`. So no value can end its own
    quotes and start another field (the audit log uses this too)."""
    text = str(value)
    if text and not any(c.isspace() or c in '"=\\' or not c.isprintable() for c in text):
        return text
    return '"' + "".join(_ESCAPES.get(c) or (c if c.isprintable() or c == " " else _hex(c))
                         for c in text) + '"'


_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _hex(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def event(name: str, level: int = logging.INFO, **fields: object) -> None:
    """Log one state change as `name key=value ...` to the logger `relay.<prefix of name>`."""
    logger = logging.getLogger("relay." + name.split(".", 1)[0])
    if logger.isEnabledFor(level):
        pairs = " ".join(f"{k}={quote(v)}" for k, v in fields.items())
        logger.log(level, f"{name} {pairs}".rstrip())
