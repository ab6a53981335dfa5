"""The readiness report: what would hurt if the primary went down now (`continuity-relay
readiness`, the panel's Readiness page).

Each check gives one `Check`: a name, `ok`, `warn` or `fail`, and a detail line. `fail` is
something an outage would make hurt (the command exits 1); `warn` is a check that could not be
made as configured (say `readiness.imap` not set) or a choice worth a second look.

Per domain:
  passwords     registered users without a password cannot log in anywhere (not for `ldap`
                domains: there the password comes from the directory; see ldap_sync)
  inactive      deactivated users: their mail is kept but they cannot read it
  ldap_sync     (domains with `ldap`) users whose password the directory never confirmed here,
                or not within `readiness.ldap_sync_days`: while the directory is down with
                the primary, only a password synced here works (relay/storage/synced.py)
  subscription  none, not active today, or ending within `readiness.subscription_days`
For the relay:
  disk          free space under each storage root, in days of mail at the rate of the last
                7 days, today so far included (the sizes in the archive's day files when
                `storage.archive` is set, else the Maildir files written in those days);
                fewer than `readiness.disk_days` fails. An outage keeps each message once in
                the Maildirs (the spool and the archive hold hard links to it), so a day of
                mail needs about a day's rate there
  imap          Dovecot answers an IMAP login for `readiness.account` at `readiness.imap`
  smarthost     `outbound.smarthost` answers EHLO (users send through it during an outage)
"""

from __future__ import annotations

import asyncio
import datetime as dt
import imaplib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from relay.config import Config, Domain
from relay.delivery.client import probe
from relay.directory import Directory, User
from relay.errors import DirectoryError
from relay.storage import synced

OK, WARN, FAIL = "ok", "warn", "fail"
RATE_DAYS = 7
NAMES_SHOWN = 5
IMAP_TIMEOUT = 15.0
_SIZE = re.compile(rb'"size": ?(\d+)')


@dataclass(frozen=True)
class Check:
    name: str
    result: str          # ok | warn | fail
    detail: str
    domain: str = ""     # "" for the relay as a whole


async def report(config: Config, domain: str | None = None) -> list[Check]:
    """Every check, for one domain or all (the relay's own checks always). Blocking parts run
    in worker threads."""
    names = [domain] if domain else sorted(config.domains)
    checks = await asyncio.to_thread(_domain_checks, config, names)
    checks += [await asyncio.to_thread(disk, config), await asyncio.to_thread(imap, config),
               await smarthost(config)]
    return checks


def failed(checks: list[Check]) -> bool:
    return any(check.result == FAIL for check in checks)


def _domain_checks(config: Config, names: list[str]) -> list[Check]:
    directory = Directory(config)
    checks = []
    for name in names:
        users = directory.list(name)
        domain = config.domains[name]
        checks += [passwords(domain, users), inactive(domain, users)]
        if domain.ldap is not None:
            checks.append(ldap_sync(config, domain, users))
        checks.append(subscription(config, domain))
    return checks


def _some(users: list[User]) -> str:
    shown = ", ".join(u.email for u in users[:NAMES_SHOWN])
    return shown + (f" and {len(users) - NAMES_SHOWN} more" if len(users) > NAMES_SHOWN else "")


def passwords(domain: Domain, users: list[User]) -> Check:
    if domain.ldap is not None:
        return Check("passwords", OK, "passwords come from the directory (see ldap_sync)", domain.name)
    if not users:
        return Check("passwords", WARN, "no users registered: nobody's mail is kept", domain.name)
    missing = [u for u in users if not u.password_hash]
    if missing:
        return Check("passwords", FAIL, f"{len(missing)} of {len(users)} users without a password "
                     f"(they cannot log in): {_some(missing)}", domain.name)
    return Check("passwords", OK, f"all {len(users)} users have a password", domain.name)


def inactive(domain: Domain, users: list[User]) -> Check:
    off = [u for u in users if not u.active]
    if off:
        return Check("inactive", FAIL, f"{len(off)} deactivated (mail kept, but they cannot read it): "
                     f"{_some(off)}", domain.name)
    return Check("inactive", OK, "no deactivated users", domain.name)


def ldap_sync(config: Config, domain: Domain, users: list[User], now: float | None = None) -> Check:
    now = time.time() if now is None else now
    days = config.readiness.ldap_sync_days
    never, stale = [], []
    for user in users:
        seen = synced.last(config.storage.spool, user.address)
        if not user.password_hash or seen is None:
            never.append(user)
        elif now - seen > days * 86400:
            stale.append(user)
    if never or stale:
        parts = [f"{len(never)} never synced: {_some(never)}"] if never else []
        parts += [f"{len(stale)} not synced in {days} days: {_some(stale)}"] if stale else []
        return Check("ldap_sync", FAIL, "; ".join(parts), domain.name)
    return Check("ldap_sync", OK, f"all {len(users)} users synced within {days} days", domain.name)


def subscription(config: Config, domain: Domain, today: dt.date | None = None) -> Check:
    today = today or dt.date.today()
    sub = domain.continuity
    if sub is None:
        return Check("subscription", FAIL, "none: mail is never kept", domain.name)
    if not sub.active_on(today):
        return Check("subscription", FAIL, f"not active today ({sub.since} to {sub.until})", domain.name)
    left = (sub.until - today).days
    if left < config.readiness.subscription_days:
        return Check("subscription", FAIL, f"ends {sub.until}, in {left} days", domain.name)
    return Check("subscription", OK, f"active until {sub.until} ({left} days)", domain.name)


def daily_rate(config: Config, now: float | None = None) -> tuple[float, str]:
    """Bytes of mail a day over the last RATE_DAYS days, and where the figure comes from."""
    now = time.time() if now is None else now
    if config.storage.archive is not None:
        days = config.storage.archive / "days"
        first = dt.date.fromtimestamp(now - RATE_DAYS * 86400)
        total = 0
        try:
            names = [n for n in os.listdir(days) if n.endswith(".jsonl") and n[:-6] > first.isoformat()]
        except FileNotFoundError:
            names = []
        for name in names:
            total += sum(int(m) for m in _SIZE.findall((days / name).read_bytes()))
        return total / RATE_DAYS, f"the archive's last {RATE_DAYS} days"
    total = 0
    for folder, _, files in os.walk(config.storage.maildirs):
        for name in files:
            st = os.lstat(os.path.join(folder, name))
            if st.st_mtime > now - RATE_DAYS * 86400:
                total += st.st_size
    return total / RATE_DAYS, f"the Maildir files of the last {RATE_DAYS} days"


def disk(config: Config) -> Check:
    rate, source = daily_rate(config)
    roots = [config.storage.maildirs, config.storage.spool, *filter(None, [config.storage.archive])]
    free = {root: _free(root) for root in roots}
    root, left = min(free.items(), key=lambda item: item[1])
    gib = left / 1024**3
    if rate <= 0:
        return Check("disk", OK, f"{gib:.1f} GiB free under {root}; no mail in {source} to measure a rate")
    days = left / rate
    detail = (f"{gib:.1f} GiB free under {root}: {days:.0f} days at {rate / 1024**2:.1f} MiB a day "
              f"({source})")
    return Check("disk", FAIL if days < config.readiness.disk_days else OK, detail)


def _free(path: Path) -> int:
    while not path.exists():           # a root not made yet: its nearest existing parent
        path = path.parent
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def imap(config: Config) -> Check:
    """An IMAP LOGIN as the test account, then LOGOUT (plain IMAP: readiness.imap is meant
    for Dovecot on this machine, as the drill's)."""
    settings = config.readiness
    if settings.imap is None or settings.account is None or settings.password_file is None:
        return Check("imap", WARN, "readiness.imap is not set: Dovecot not checked")
    try:
        password = read_password(settings.password_file)
    except DirectoryError as exc:
        return Check("imap", FAIL, str(exc))
    where = f"{settings.account} at {settings.imap}"
    try:
        login_imap(str(settings.imap.host), settings.imap.port, settings.account, password).logout()
    except (imaplib.IMAP4.error, OSError) as exc:
        return Check("imap", FAIL, f"no login for {where}: {_imap_reason(exc)}")
    return Check("imap", OK, f"logged in as {where}")


def login_imap(host: str, port: int, account: str, password: str) -> imaplib.IMAP4:
    connection = imaplib.IMAP4(host, port, timeout=IMAP_TIMEOUT)
    try:
        connection.login(account, password)
    except BaseException:
        connection.shutdown()
        raise
    return connection


def _imap_reason(exc: BaseException) -> str:
    text = exc.args[0] if exc.args else exc
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return str(getattr(exc, "strerror", None) or text)[:200]


def read_password(path: Path) -> str:
    """The first line of a password file."""
    try:
        line = path.read_text(encoding="utf-8").split("\n", 1)[0].rstrip("\r")
    except (OSError, UnicodeDecodeError) as exc:
        raise DirectoryError(f"{path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not line:
        raise DirectoryError(f"{path}: no password on its first line")
    return line


async def smarthost(config: Config) -> Check:
    host = config.outbound.smarthost
    if host is None:
        return Check("smarthost", WARN, "outbound.smarthost is not set: users cannot send in an outage")
    reply = await probe(host, config.hostname)
    if reply.ok:
        return Check("smarthost", OK, f"{host.address} answers EHLO")
    return Check("smarthost", FAIL, f"{host.address}: {reply.code} {reply.text}"[:300])
