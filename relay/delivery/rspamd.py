"""Rspamd: the spam and virus filter's verdict on one message, over its HTTP protocol.

This module owns the conversation with rspamd's normal worker (`rspamd.url`, production
http://127.0.0.1:11333) and is the only one that uses aiohttp's client. One `POST /checkv2`
per message: the body is the message as it would be kept (our Received header on top), and
the envelope goes in rspamd's request headers: `From` (the envelope sender, empty for <>),
one `Rcpt` per recipient, `IP` and `Helo` of the sending client, `Queue-Id` (our transaction
id), `User` for an authenticated sender, and `MTA-Name` (our host name). No `Hostname`: the
relay does not resolve the client's name, so rspamd looks it up itself.

The JSON answer gives `action` (one of ACTIONS), `score`, `required_score` and, for some
rules, `messages.smtp_message`. Anything else (no connection, timeout, HTTP error, an answer
over MAX_ANSWER bytes, not JSON, an action we do not know) is one outcome: UNAVAILABLE, with a
reason for the log. A message from rspamd is passed on only when it is one line of printable
ASCII of at most MAX_MESSAGE characters; otherwise the verdict has none.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDict

from relay.config import Rspamd as Settings
from relay.log import event

NO_ACTION = "no action"
GREYLIST = "greylist"
ADD_HEADER = "add header"
REWRITE_SUBJECT = "rewrite subject"
SOFT_REJECT = "soft reject"
REJECT = "reject"
ACTIONS = (NO_ACTION, GREYLIST, ADD_HEADER, REWRITE_SUBJECT, SOFT_REJECT, REJECT)
UNAVAILABLE = "unavailable"

MAX_ANSWER = 1024 * 1024      # bytes of JSON read from rspamd; its answers are a few KiB
MAX_MESSAGE = 200             # characters of rspamd's smtp_message passed to the sender


@dataclass(frozen=True)
class Scan:
    """What rspamd is told about a message besides its bytes."""

    queue_id: str
    mail_from: str               # the envelope sender, "" for <>
    rcpts: tuple[str, ...]
    ip: str | None = None
    helo: str | None = None
    user: str | None = None      # the authenticated sender, if any


@dataclass(frozen=True)
class Verdict:
    """Rspamd's answer: `action` is one of ACTIONS, or UNAVAILABLE with `reason` saying why."""

    action: str
    score: float | None = None
    required: float | None = None
    message: str | None = None   # rspamd's smtp_message, safe to put in a reply line
    reason: str | None = None    # for the log only, when UNAVAILABLE


class Rspamd:
    """Asks rspamd's normal worker at `settings.url` for a verdict; never raises."""

    def __init__(self, settings: Settings, hostname: str) -> None:
        assert settings.url is not None
        self.url = settings.url + "/checkv2"
        self.timeout = settings.timeout
        self.hostname = hostname

    async def check(self, message: bytes, scan: Scan) -> Verdict:
        try:
            answer = await asyncio.wait_for(self._post(message, scan), self.timeout)
        except TimeoutError:
            return self._unavailable(scan, f"no answer within {self.timeout:g}s")
        except aiohttp.ClientError as exc:
            return self._unavailable(scan, f"{type(exc).__name__}: {exc}")
        except (OSError, ValueError) as exc:   # includes UnicodeError, JSONDecodeError
            return self._unavailable(scan, f"{type(exc).__name__}: {exc}")
        if isinstance(answer, str):
            return self._unavailable(scan, answer)
        return self._verdict(scan, answer)

    async def _post(self, message: bytes, scan: Scan) -> dict | str:
        async with aiohttp.ClientSession() as session, \
                session.post(self.url, data=message, headers=self._headers(scan)) as response:
            if response.status != 200:
                return f"HTTP {response.status}"
            body = bytearray()
            async for chunk in response.content.iter_any():
                body += chunk
                if len(body) > MAX_ANSWER:
                    return f"answer over {MAX_ANSWER} bytes"
            answer = json.loads(body)
            return answer if isinstance(answer, dict) else "answer is not a JSON object"

    def _headers(self, scan: Scan) -> CIMultiDict[str]:
        headers: CIMultiDict[str] = CIMultiDict()
        headers["From"] = _one_line(scan.mail_from)
        for rcpt in scan.rcpts:
            headers.add("Rcpt", _one_line(rcpt))
        headers["Queue-Id"] = _one_line(scan.queue_id)
        headers["MTA-Name"] = _one_line(self.hostname)
        for name, value in (("IP", scan.ip), ("Helo", scan.helo), ("User", scan.user)):
            if value:
                headers[name] = _one_line(value)
        return headers

    def _verdict(self, scan: Scan, answer: dict) -> Verdict:
        action = answer.get("action")
        if action not in ACTIONS:
            return self._unavailable(scan, f"unknown action {str(action)[:40]!r}")
        messages = answer.get("messages")
        smtp_message = messages.get("smtp_message") if isinstance(messages, dict) else None
        return Verdict(action, _number(answer.get("score")), _number(answer.get("required_score")),
                       safe_message(smtp_message))

    @staticmethod
    def _unavailable(scan: Scan, reason: str) -> Verdict:
        event("rspamd.unavailable", logging.WARNING, id=scan.queue_id, reason=reason)
        return Verdict(UNAVAILABLE, reason=reason)


def safe_message(text: object) -> str | None:
    """`text` if it may go into an SMTP reply line as it is: one line of printable ASCII, bounded."""
    if not isinstance(text, str):
        return None
    text = text.strip()
    if not text or len(text) > MAX_MESSAGE or not all(" " <= c <= "~" for c in text):
        return None
    return text


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _one_line(value: str) -> str:
    """A header value for rspamd: printable characters only, so nothing can start another header."""
    return "".join(c for c in value if c.isprintable())[:1000]
