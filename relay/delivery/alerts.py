"""Alerts: what the relay tells administrators, and users at their alternate address.

Events (`Alert.event`), each logged once as `alerts.raised event=... domain=...`:

    outage_start          a domain's primary went down (health: into `outage`)
    outage_end            it answers again (health: out of `outage`)
    replay_finished       the replay queue drained after an outage: counts and duration
    entries_failed        queue entries refused for good (failed/) or set aside (hold/): the
                          first at once, then at most one alert per queue and domain per BATCH
    disk_low              free space under a storage root holds fewer than `alerts.disk_days`
                          days of mail at the observed rate (storage/disk.py); once a day
    subscription_ending   a domain's continuity subscription ends within 30 days: at 30, 7 and
                          1 days left, remembered across restarts (storage/marks.py)

Administrators get a short text mail per alert to `alerts.to`, queued in the outbound queue
(`<spool>/outbound/`, envelope sender `<>`, so a refusal bounces nowhere) and sent through the
smarthost by the outbound runner with its retries; and, with `alerts.webhook`, a JSON POST
queued in `<spool>/alerts/webhook/` for the alerts runner. Both queues are crash-safe: an alert
queued survives a restart. What is not yet queued (an event handed over a moment ago, the
entries of a batch window) is in memory only; the facts themselves are on disk (the state
file, failed/ and hold/).

At outage start and end, each active user of the domain with an `alternate` address gets a
short notice there, through the smarthost (never the domain's own primary, which is the one
down): the webmail address, and that their usual password works. Not sent when the domain says
`notify_users: false`, when its subscription is not active today (nothing is being kept), to a
user who cannot log in (no password, outside an LDAP domain), or to an alternate in a domain of
ours that is itself in outage (logged `alerts.alternate_skipped`).

Nothing secret goes out: no password, no credential, no message content, and not the webhook's
URL (it may carry a token); every value is one printable line of at most MAX_VALUE characters,
and a webhook body at most MAX_BODY bytes.
"""

from __future__ import annotations

import datetime as dt
import email.policy
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path

from relay.addresses import AddressError, parse_mailbox
from relay.config import Config
from relay.delivery.health import OUTAGE, State
from relay.delivery.submit import options_for
from relay.directory import Directory, User
from relay.log import event
from relay.storage.continuity import ContinuityStore
from relay.storage.disk import DiskWatch
from relay.storage.durable import Owner
from relay.storage.marks import Marks, marks_path
from relay.storage.queue import Envelope, Queue

OUTAGE_START, OUTAGE_END = "outage_start", "outage_end"
REPLAY_FINISHED, ENTRIES_FAILED = "replay_finished", "entries_failed"
DISK_LOW, SUBSCRIPTION_ENDING = "disk_low", "subscription_ending"

BATCH = 300.0                  # entries_failed: at most one alert per queue and domain this often
DISK_REPEAT = 86400.0          # disk_low again, while still low, after a day
SUBSCRIPTION_DAYS = (30, 7, 1)   # reminders at these many days left
MAX_VALUE = 200
USERS_END = "users_end:"       # a mark per domain: when its users' end notice is due
MAX_IDS = 10
MAX_BODY = 8 * 1024


def webhook_queue(spool: Path, owner: Owner = Owner()) -> Queue:
    return Queue(spool / "alerts" / "webhook", owner)


def one_line(value: object, limit: int = MAX_VALUE) -> str:
    """A value fit for a header, a log field or JSON: printable characters only, bounded."""
    text = "".join(c if c.isprintable() else " " for c in str(value)).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_outage(state: State) -> bool:
    """Whether a state counts as an outage for alerts and notices (a planned outage, should it
    get a state of its own, belongs here too)."""
    return state.state == OUTAGE


@dataclass(frozen=True)
class Alert:
    event: str
    domain: str | None             # None: about the relay as a whole (disk)
    summary: str                   # one line: the mail's Subject, the webhook's "summary"
    details: dict[str, object] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def json(self, hostname: str) -> bytes:
        """The webhook body: at least `event` and `domain`; bounded by MAX_BODY."""
        body = {"event": self.event, "domain": self.domain, "summary": one_line(self.summary),
                "time": _iso(self.time), "relay": hostname,
                **{one_line(k, 40): _json_value(v) for k, v in self.details.items()}}
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        if len(data) > MAX_BODY:     # the details give way, never event and domain
            data = json.dumps({k: body[k] for k in ("event", "domain", "summary", "time", "relay")},
                              ensure_ascii=False).encode("utf-8")
        return data


def _json_value(value: object) -> object:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if isinstance(value, (list, tuple)):
        return [one_line(v) for v in value[:MAX_IDS]]
    return one_line(value)


def _iso(when: float) -> str:
    return dt.datetime.fromtimestamp(when, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 86400:
        return f"{seconds // 86400}d{seconds % 86400 // 3600}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def text_mail(sender: str, to: list[str], subject: str, body: str, hostname: str) -> bytes:
    """One plain-text mail of the relay's own (never a message it passes on: rule 3 is not
    at stake), marked `Auto-Submitted: auto-generated` (RFC 3834) so nobody auto-replies."""
    message = EmailMessage(policy=email.policy.SMTP)
    message["From"] = sender
    message["To"] = ", ".join(to)
    message["Subject"] = one_line(subject, 180)
    message["Date"] = format_datetime(dt.datetime.now(dt.UTC))
    message["Message-ID"] = make_msgid("alert", domain=hostname)
    message["Auto-Submitted"] = "auto-generated"
    message.set_content(body)
    return message.as_bytes()


def admin_body(alert: Alert, hostname: str) -> str:
    lines = [one_line(alert.summary, 500), "",
             f"event:  {alert.event}", f"domain: {alert.domain or '-'}", f"time:   {_iso(alert.time)}",
             f"relay:  {hostname}"]
    for key, value in alert.details.items():
        shown = ", ".join(one_line(v) for v in value[:MAX_IDS]) if isinstance(value, (list, tuple)) \
            else one_line(value)
        lines.append(f"{one_line(key, 40)}: {shown}")
    return "\n".join(lines) + "\n"


def user_notice_body(user: User, domain: str, starting: bool, webmail: str | None) -> tuple[str, str]:
    """(subject, body) of a notice to a user's alternate address: short, no reason or detail
    from the primary, only what the user needs."""
    if starting:
        where = f"Read and send it on the web at:\n\n  {webmail}\n\n" if webmail else \
            "Read and send it with your usual mail program's continuity settings.\n\n"
        return (f"Your mail ({user.email}) is kept safe meanwhile",
                f"The mail server for {domain} is not answering right now. Mail to "
                f"{user.email} is\nkept safe meanwhile. {where}"
                f"Log in as {user.email} with your usual password.\n"
                "Once the server is back, everything goes to your usual mailbox.\n")
    return (f"Your mail ({user.email}) is back to normal",
            f"The mail server for {domain} answers again: use your usual mail program.\n"
            "Mail kept meanwhile, and what you sent, is on its way to your usual mailbox.\n")


def webmail_url(config: Config) -> str | None:
    """Where users read their continuity mail: `web.url` + /mail, else made from listen.web
    (the relay's host name for a wildcard address); None without a web site."""
    if config.web.url:
        return config.web.url + "/mail"
    listen = config.listen.web
    if listen is None:
        return None
    host = config.hostname if listen.host in ("0.0.0.0", "::", "") else listen.host
    host = f"[{host}]" if ":" in host else host
    scheme = "https" if config.web.tls else "http"
    port = "" if (scheme, listen.port) in (("http", 80), ("https", 443)) else f":{listen.port}"
    return f"{scheme}://{host}{port}/mail"


@dataclass
class _Trouble:
    failed: int = 0
    held: int = 0
    ids: list[str] = field(default_factory=list)
    last: str = ""


class Alerter:
    """Turns events into queued alerts and notices. Every method but `entry_trouble` blocks
    (queue writes, a passwd-file read): call them from a worker thread, one at a time."""

    def __init__(self, config: Config, store: ContinuityStore, directory: Directory,
                 health: Callable[[str], State], states: dict[str, State],
                 disk: DiskWatch | None = None) -> None:
        owner = Owner.named(config.storage.owner)
        self.config = config
        self.settings = config.alerts
        self.sender = self.settings.sender or f"continuity-relay@{config.hostname}"
        self.store = store
        self.directory = directory
        self.health = health
        self.webhooks = webhook_queue(config.storage.spool, owner) if self.settings.webhook else None
        self.marks = Marks(marks_path(config.storage.spool), owner)
        self.disk = disk
        self._states = dict(states)       # the last state seen per domain
        self._troubles: dict[tuple[str, str], _Trouble] = {}
        self._trouble_sent: dict[tuple[str, str], float] = {}
        self._trouble_lock = threading.Lock()
        self._disk_sent: dict[tuple[str, ...], float] = {}
        self._next_end: float | None = None     # the next end notice due; None: not read yet
        self._ends_lock = threading.Lock()       # events and the checks run in two threads

    # -- sending -----------------------------------------------------------------------------

    def send(self, alert: Alert) -> None:
        """Queue the alert's mail to `alerts.to` and its webhook POST; log it once."""
        mails = 0
        if self.settings.to and self.config.outbound.smarthost is not None:
            data = text_mail(self.sender, list(self.settings.to), f"[continuity-relay] {alert.summary}",
                             admin_body(alert, self.config.hostname), self.config.hostname)
            mails = len(self.store.outbound.enqueue_many(data, [
                self._envelope(data, rcpt, alert.event) for rcpt in self.settings.to]))
        if self.webhooks is not None:
            self.webhooks.enqueue_bytes(alert.json(self.config.hostname), Envelope(
                mail_from="", rcpt="webhook", received_at=time.time(), extra={"alert": alert.event}))
        level = logging.WARNING if alert.event in (OUTAGE_START, DISK_LOW, ENTRIES_FAILED) else logging.INFO
        event("alerts.raised", level, event=alert.event, domain=alert.domain or "-",
              mails=mails, webhook="yes" if self.webhooks is not None else "no",
              summary=one_line(alert.summary))

    @staticmethod
    def _envelope(data: bytes, rcpt: str, kind: str, user: str | None = None) -> Envelope:
        extra: dict[str, str] = {"alert": kind}
        if user is not None:      # shown with the user's domain in `queue list` and the panel
            extra["user"] = user
        return Envelope(mail_from="", rcpt=rcpt, received_at=time.time(),
                        mail_options=options_for(data, "", rcpt), extra=extra)

    # -- outages -----------------------------------------------------------------------------

    def health_changed(self, domain: str, state: State) -> None:
        """A health listener's event: an alert (and user notices) when the domain enters or
        leaves an outage; other changes (replaying -> normal) are replay_finished's."""
        before = self._states.get(domain, State())
        if is_outage(before) and is_outage(state):
            return                         # the same outage (since when: its first event)
        self._states[domain] = state
        if is_outage(state) and not is_outage(before):
            self.send(Alert(OUTAGE_START, domain, f"{domain}: primary down, mail is kept",
                            {"reason": state.reason or "-", "since": _iso(state.since or time.time())}))
            self._users_outage_started(domain)
        elif is_outage(before) and not is_outage(state):
            lasted = (state.since or time.time()) - before.since if before.since else 0.0
            self.send(Alert(OUTAGE_END, domain, f"{domain}: primary back after {_duration(lasted)}",
                            {"outage_seconds": int(lasted), "now": state.state}))
            due = time.time() + self.settings.users_end_delay
            with self._ends_lock:
                self.marks.set(USERS_END + domain, f"{due:.0f}")
                self._next_end = min(due, self._next_end if self._next_end is not None else due)

    # A primary that flaps (down, up, down in a few minutes) must not send each user a notice a
    # time: the end notice waits until the primary stayed up `alerts.users_end_delay`, and an
    # outage starting again before that is the same outage to the users (they were never told it
    # ended). The wait is a mark, so a restart keeps it.

    def _users_outage_started(self, domain: str) -> None:
        with self._ends_lock:
            untold = self.marks.get(USERS_END + domain) is not None
            if untold:
                self.marks.set(USERS_END + domain, None)
        if untold:
            event("alerts.users_not_notified", domain=domain,
                  reason="the last outage's end was not told yet: the same outage to them")
            return
        self.notify_users(domain, starting=True)

    def users_ends_due(self) -> bool:
        """Whether an end notice may be due (from memory: the event loop asks every tick)."""
        return self._next_end is None or self._next_end <= time.time()

    def tell_users_ends(self, now: float | None = None) -> None:
        """Send the end notices that are due (blocking: reads the marks). Queued before the
        mark goes: a crash between tells the users twice, never not at all."""
        now = time.time() if now is None else now
        later = math.inf
        with self._ends_lock:
            for domain, text in self.marks.starting(USERS_END).items():
                due = _number(text, 0.0)
                if due > now:
                    later = min(later, due)
                    continue
                self.notify_users(domain, starting=False)
                self.marks.set(USERS_END + domain, None)
            self._next_end = later

    def notify_users(self, domain: str, starting: bool) -> None:
        """A notice to each user of `domain` with an alternate address (see the module doc)."""
        settings = self.config.domains.get(domain)
        if settings is None or not settings.notify_users or self.config.outbound.smarthost is None:
            return
        if not settings.continuity_active():
            event("alerts.users_not_notified", domain=domain, reason="subscription not active today")
            return
        webmail = webmail_url(self.config)
        sent = skipped = 0
        for user in self.directory.list(domain):
            if not user.alternate or not user.active:
                continue
            if not user.password_hash and settings.ldap is None:
                skipped += 1
                continue
            alternate = self._usable_alternate(user)
            if alternate is None:
                skipped += 1
                continue
            subject, body = user_notice_body(user, domain, starting, webmail)
            data = text_mail(self.sender, [alternate], subject, body, self.config.hostname)
            self.store.outbound.enqueue_many(data, [self._envelope(
                data, alternate, OUTAGE_START if starting else OUTAGE_END, user.email)])
            sent += 1
        if sent or skipped:
            event("alerts.users_notified", domain=domain, notice="start" if starting else "end",
                  sent=sent, skipped=skipped)

    def _usable_alternate(self, user: User) -> str | None:
        """The alternate as an address to send to; None (logged) when it cannot be: unreadable,
        or in a domain of ours whose primary is down too."""
        try:
            address = parse_mailbox(user.alternate)
        except AddressError:
            event("alerts.alternate_skipped", logging.WARNING, user=user.email, reason="not an address")
            return None
        if address.domain == user.address.domain or (
                address.domain in self.config.domains and is_outage(self.health(address.domain))):
            event("alerts.alternate_skipped", logging.WARNING, user=user.email,
                  alternate_domain=address.domain, reason="its domain is in outage")
            return None
        return str(address)

    def replay_finished(self, domain: str, delivered: int, failed: int, held: int,
                        seconds: float) -> None:
        self.send(Alert(REPLAY_FINISHED, domain,
                        f"{domain}: replay finished, {delivered} delivered, {failed} refused, "
                        f"{held} set aside in {_duration(seconds)}",
                        {"delivered": delivered, "failed": failed, "held": held,
                         "seconds": round(seconds, 1)}))

    # -- queue entries that went wrong -------------------------------------------------------

    def entry_trouble(self, queue: str, domain: str, entry: str, moved_to: str,
                      envelope: Envelope | None, note: str) -> None:
        """A runner moved an entry to failed/ or hold/ (from any thread; no I/O, never
        raises). Our own alerts and notices failing are logged by the runner, not alerted:
        an alert about an alert that cannot be sent would only loop."""
        if envelope is not None and "alert" in envelope.extra:
            return
        with self._trouble_lock:
            trouble = self._troubles.setdefault((queue, domain), _Trouble())
            trouble.failed += moved_to == "failed"
            trouble.held += moved_to == "hold"
            if len(trouble.ids) < MAX_IDS:
                trouble.ids.append(entry)
            trouble.last = note

    def has_trouble(self) -> bool:
        with self._trouble_lock:
            return bool(self._troubles)

    def flush_troubles(self, now: float | None = None) -> None:
        """Send one alert per queue and domain with entries gone wrong, unless one went out
        less than BATCH seconds ago (those wait for the next flush)."""
        now = time.time() if now is None else now
        with self._trouble_lock:
            due = {key: t for key, t in self._troubles.items()
                   if now - self._trouble_sent.get(key, 0.0) >= BATCH}
            for key in due:
                del self._troubles[key]
                self._trouble_sent[key] = now
        for (queue, domain), trouble in sorted(due.items()):
            where = f"{domain}: " if domain else ""
            self.send(Alert(ENTRIES_FAILED, domain or None,
                            f"{where}{trouble.failed} refused for good, {trouble.held} set aside "
                            f"in the {queue} queue",
                            {"queue": queue, "failed": trouble.failed, "held": trouble.held,
                             "ids": trouble.ids, "last_error": trouble.last or "-"}))

    # -- periodic checks ---------------------------------------------------------------------

    def check_disk(self) -> None:
        """Measure the storage roots; alert when one holds fewer than `alerts.disk_days` days."""
        if self.disk is None or self.settings.disk_days is None:
            return
        now = time.time()
        for reading in self.disk.sample():
            days = reading.days
            if days is None or days >= self.settings.disk_days:
                self._disk_sent.pop(reading.roots, None)
                continue
            if now - self._disk_sent.get(reading.roots, 0.0) < DISK_REPEAT:
                continue
            self._disk_sent[reading.roots] = now
            self.send(Alert(DISK_LOW, None, f"disk: {days:.1f} days of mail left under "
                                            f"{', '.join(reading.roots)}",
                            {"roots": list(reading.roots), "free_bytes": reading.free,
                             "bytes_per_day": int(reading.per_day or 0), "days": round(days, 1),
                             "threshold_days": self.settings.disk_days}))

    def check_subscriptions(self, today: dt.date | None = None) -> None:
        """A reminder at 30, 7 and 1 days before a subscription ends, each once."""
        today = today or dt.date.today()
        for name, domain in sorted(self.config.domains.items()):
            if domain.continuity is None or not domain.continuity.active_on(today):
                continue
            left = (domain.continuity.until - today).days
            if left > SUBSCRIPTION_DAYS[0]:
                continue
            step = min(d for d in SUBSCRIPTION_DAYS if left <= d)
            until = domain.continuity.until.isoformat()
            key = f"subscription:{name}"
            if _reminded(self.marks.get(key), until) <= step:
                continue
            self.send(Alert(SUBSCRIPTION_ENDING, name, f"{name}: continuity subscription ends "
                                                       f"{until}, in {left} day(s)",
                            {"until": until, "days_left": left}))
            self.marks.set(key, f"{until}:{step}")


def _number(text: str, otherwise: float) -> float:
    try:
        return float(text)
    except ValueError:           # a damaged mark: due now, rather than never
        return otherwise


def _reminded(mark: str | None, until: str) -> int:
    """The last reminder's days-left step for this end date (a large number: none yet)."""
    done_until, _, step = (mark or "").rpartition(":")
    return int(step) if done_until == until and step.isdigit() else 1 << 30
