"""Logging set-up (the `log.*` keys): one logger per subsystem, one line per state change, to
stderr (journald, under systemd).

Call sites use `event("replay.primary_up", domain=..., queued=...)`: the event's prefix names its
logger (`relay.replay`), so a logger and its events can never disagree. Values never contain a
password or a message body (callers pass neither). Two formats (`log.format`):

    text  2026-12-01 10:00:00,123 INFO relay.replay replay.primary_up domain=example.com queued=3
          (values quoted by `quote` when they hold spaces, quotes, backslashes or control
          characters, so no value can forge another field)
    json  {"ts": "2026-12-01T10:00:00.123Z", "level": "INFO", "event": "replay.primary_up",
           "domain": "example.com", "queued": 3}
          (one object a line; a line from a library's logger has its logger's name as `event`
          and its text as `message`)
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import json
import logging
import logging.handlers
import queue
import sys
from collections.abc import Iterator

FORMATS = ("text", "json")
MAX_QUEUED = 10_000       # lines waiting for stderr; past that a line is counted, not kept

_listener: logging.handlers.QueueListener | None = None
_queued: _Bounded | None = None
_format = "text"


def setup(level: str = "INFO", format: str = "text") -> None:
    """Send every log line to stderr in `format`, through a queue and a thread of its own: a log
    line never blocks the event loop on a slow pipe or a disk busy flushing. The handler sits on
    the root logger, so libraries' warnings (asyncio, aiohttp, aiosmtpd) come out in the same
    format; `relay.*` loggers log from `level`, the others from WARNING."""
    global _listener, _queued, _format
    _format = format
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter())
    stop()
    lines: queue.Queue[logging.LogRecord] = queue.Queue(MAX_QUEUED)
    _listener = _Listener(lines, handler)
    _listener.start()
    _queued = _Bounded(lines)
    root = logging.getLogger()
    root.addHandler(_queued)
    root.setLevel(logging.WARNING)
    logging.getLogger("relay").setLevel(level)
    # aiosmtpd logs every peer and recipient at INFO: that is ours to say, once.
    logging.getLogger("mail.log").setLevel(logging.WARNING)


@contextlib.contextmanager
def queued(handler: logging.Handler) -> Iterator[logging.Handler]:
    """`handler` behind a queue and a thread of its own, as `setup` puts stderr: a caller's
    line costs it a put, never a wait for the handler's lock (the replay command's progress
    bar redraws itself for each line, and 20 connections' worker threads log a line a
    message). What is queued is written before the block ends."""
    lines: queue.Queue[logging.LogRecord] = queue.Queue(MAX_QUEUED)
    listener = _Listener(lines, handler)
    listener.start()
    through = _Bounded(lines)
    try:
        yield through
    finally:
        with through.lock:
            through.say_dropped(block=True)
        listener.stop()


def formatter() -> logging.Formatter:
    """The formatter of the format set up (`setup`), for a handler of one's own (the replay
    command's lines above its progress bar)."""
    if _format == "json":
        return JsonFormatter()
    return logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")


def set_level(level: str) -> None:
    """The `relay.*` loggers' level, now (a SIGHUP reload)."""
    logging.getLogger("relay").setLevel(level)


def stop() -> None:
    """Write what is queued, then end the writing thread (at exit, at the end of a command, and
    before a new set-up)."""
    global _listener, _queued
    if _queued is not None:
        logging.getLogger().removeHandler(_queued)
        with _queued.lock:                          # no line being queued meanwhile
            _queued.say_dropped(block=True)         # the count of the last lines dropped
        _queued = None
    if _listener is not None:
        _listener.stop()
        _listener = None


class _Bounded(logging.handlers.QueueHandler):
    """Never more than `MAX_QUEUED` lines in memory: when stderr stops taking them (a pipe
    nobody reads, a stalled journald), a line that finds the queue full is dropped and counted,
    and `log.dropped lines=N` goes out first once there is room, as syslog does. The caller
    (the event loop too) never waits. `emit` runs under the handler's lock."""

    def __init__(self, lines: queue.Queue[logging.LogRecord]) -> None:
        super().__init__(lines)
        self.dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        if self.dropped and not self.say_dropped(block=False):
            self.dropped += 1
            return
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1

    def say_dropped(self, block: bool) -> bool:
        """Queue `log.dropped` for the lines counted so far; whether there was room."""
        if not self.dropped:
            return True
        note = logging.getLogger("relay.log").makeRecord(
            "relay.log", logging.WARNING, __file__, 0, f"log.dropped lines={self.dropped}", (), None,
            extra={"event": "log.dropped", "fields": {"lines": self.dropped}})
        try:
            self.queue.put(note, block=block)
        except queue.Full:
            return False
        self.dropped = 0
        return True


class _Listener(logging.handlers.QueueListener):
    def enqueue_sentinel(self) -> None:
        self.queue.put(self._sentinel)      # waits for room: a full queue is still written out


class JsonFormatter(logging.Formatter):
    """One JSON object a line: `ts` (UTC, milliseconds), `level`, `event`, then the event's
    fields (numbers and booleans as they are, anything else as its text). A field never
    replaces `ts`, `level` or `event`."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = dt.datetime.fromtimestamp(record.created, dt.UTC)
        ts = stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"
        line: dict[str, object] = {"ts": ts, "level": record.levelname}
        name = getattr(record, "event", None)
        if name is None:                        # a library's line, or a plain logger call
            line["event"] = record.name
            line["message"] = record.getMessage()
        else:
            line["event"] = name
            for key, value in getattr(record, "fields", {}).items():
                line.setdefault(key, value if isinstance(value, (int, float, bool)) or value is None
                                else str(value))
        if record.exc_info:
            line.setdefault("traceback", self.formatException(record.exc_info))
        return json.dumps(line, ensure_ascii=False)


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
        logger.log(level, f"{name} {pairs}".rstrip(), extra={"event": name, "fields": fields})
