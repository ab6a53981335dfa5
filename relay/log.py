"""Logging set-up: one logger per subsystem, one key=value line per state change, to stderr.

Call sites use `event(logger, "replay.primary_up", domain=..., queued=...)`; values are quoted
when they hold spaces, and never contain a password or a message body (callers pass neither).
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


def _value(value: object) -> str:
    text = str(value).replace("\n", "\\n").replace("\r", "\\r")
    if not text or any(c.isspace() or c in '"=' for c in text):
        return '"' + text.replace('"', '\\"') + '"'
    return text


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: object) -> None:
    """Log one state change as `name key=value ...`."""
    if logger.isEnabledFor(level):
        pairs = " ".join(f"{k}={_value(v)}" for k, v in fields.items())
        logger.log(level, f"{name} {pairs}".rstrip())
