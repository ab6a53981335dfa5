"""Logging set-up: one logger per subsystem, one key=value line per state change, to stderr.

Call sites use `event("replay.primary_up", domain=..., queued=...)`: the event's prefix names its
logger (`relay.replay`), so a logger and its events can never disagree. Values are quoted
(`quote`) when they hold spaces, quotes, backslashes or control characters, and never contain a
password or a message body (callers pass neither).
"""

from __future__ import annotations

import logging
import sys


def setup(level: str = "INFO") -> None:
    """Send every `relay.*` logger to stderr with a timestamp."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger("relay")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    # aiosmtpd logs every peer and recipient at INFO: that is ours to say, once.
    logging.getLogger("mail.log").setLevel(logging.WARNING)


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
