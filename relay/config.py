"""The configuration file: YAML in, frozen dataclasses out, every problem named by file and key.

`load(path)` reads and validates the whole file and raises `ConfigErrors` listing every problem,
one per line, as `FILE: dotted.key: what is wrong`. Unknown keys are errors. Relative paths
resolve against the folder of the configuration file. Durations read like `30s`, `15m`, `90d`;
sizes like `50MiB`; listen addresses like `127.0.0.1:2525`.

A setting's default is written once, as its dataclass field's default, which the reader below
takes when the key is absent (`Web.session_lifetime`: a dataclass field's default is its class
attribute). A default path is relative and, like a relative path written in the file, resolves
against the configuration file's folder: a loaded Config holds absolute paths.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from relay.addresses import AddressError, normalise_domain, parse_mailbox
from relay.errors import ConfigError, ConfigErrors
from relay.log import FORMATS as LOG_FORMATS

PASSWORD_SCHEMES = ("BLF-CRYPT", "ARGON2ID")
STARTTLS_MODES = ("off", "opportunistic", "required")
RSPAMD_ON_FAILURE = ("keep", "defer")


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Listen:
    inbound: HostPort
    submission: HostPort | None = None
    web: HostPort | None = None
    # Prometheus scrapes here (relay/web/metrics.py); null or off: no metrics listener.
    metrics: HostPort | None = HostPort("127.0.0.1", 9125)


@dataclass(frozen=True)
class Web:
    tls: bool = False                  # serve HTTPS with tls.cert / tls.key (cookies Secure)
    # Cookie signing key, made on first start when missing; None: a key for this process only.
    secret_file: Path | None = Path("web.secret")
    # Sessions ended for good (logout, deactivation); None: remembered in memory only.
    revoked_file: Path | None = Path("web.revoked")
    session_lifetime: float = 8 * 3600.0
    # The site's public address (https://relay.example.com), for links in notices; None: made
    # from listen.web.
    url: str | None = None


@dataclass(frozen=True)
class TLS:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Smarthost:
    address: HostPort
    starttls: str = "opportunistic"
    verify_cert: bool = True
    ca_file: Path | None = None
    username: str | None = None
    password_file: Path | None = None
    timeout: float = 60.0
    connect_timeout: float = 10.0


@dataclass(frozen=True)
class Outbound:
    smarthost: Smarthost | None = None
    max_age: float = 5 * 86400.0
    retry_delay: float = 60.0


@dataclass(frozen=True)
class Storage:
    maildirs: Path
    spool: Path
    owner: str | None = None
    archive: Path | None = None        # the rolling archive (storage/archive.py); None: off


@dataclass(frozen=True)
class ArchiveSettings:
    days: int = 90                     # retention, fixed on each message as it is archived


@dataclass(frozen=True)
class Alerts:
    """Who hears of outages and trouble, and how (relay/delivery/alerts.py)."""

    to: tuple[str, ...] = ()           # administrators, mailed through outbound.smarthost
    sender: str | None = None          # key `from`; None: continuity-relay@<hostname>
    webhook: str | None = None         # a URL: one JSON POST per alert
    webhook_timeout: float = 10.0
    retry_delay: float = 30.0          # the webhook's first retry; doubles, at most an hour
    max_age: float = 86400.0           # then a webhook alert is given up (logged)
    disk_days: float | None = 7.0      # alert below this many days of mail; None: never
    disk_interval: float = 3600.0      # how often free space is measured
    users_end_delay: float = 900.0     # users hear the end once the primary stayed up this long


@dataclass(frozen=True)
class Replay:
    probe_interval: float = 30.0
    concurrency: int = 20      # Postfix's default_destination_concurrency_limit (README)
    rate: float | None = None


@dataclass(frozen=True)
class Rspamd:
    """The spam filter asked about mail the relay is about to keep (relay/delivery/rspamd.py)."""

    url: str | None = None             # the normal worker, e.g. http://127.0.0.1:11333; None: no checks
    timeout: float = 10.0
    on_failure: str = "keep"           # rspamd unreachable or confused: keep unchecked, or defer (451)


@dataclass(frozen=True)
class Limits:
    """Per SMTP listener (inbound, submission); see relay/smtp/limits.py."""

    connections: int = 400             # open sessions; capped at start-up by RLIMIT_NOFILE
    connections_per_client: int = 50   # per IPv4 address or IPv6 /64 (Postfix's default)
    idle_timeout: float = 60.0         # waiting for the client; then 421 4.4.2 and close
    max_errors: int = 20               # 5xx replies in a session; then 421 4.7.0 and close


@dataclass(frozen=True)
class Log:
    """How log lines look on stderr (relay/log.py)."""

    format: str = "text"               # or json: one object a line, for journald and collectors


@dataclass(frozen=True)
class Primary:
    address: HostPort
    starttls: str = "opportunistic"
    verify_cert: bool = True
    ca_file: Path | None = None
    timeout: float = 60.0
    connect_timeout: float = 10.0


@dataclass(frozen=True)
class Continuity:
    since: dt.date
    until: dt.date

    def active_on(self, day: dt.date) -> bool:
        return self.since <= day <= self.until


@dataclass(frozen=True)
class LDAP:
    """How to check a password against the domain's directory (Active Directory, OpenLDAP).

    Either `bind_dn` (a template: {user} the whole address, {local}, {domain}) to bind as the
    user directly, or `search_base` + `search_filter` (same placeholders, escaped) to find the
    user's DN first, binding as `service_dn` with the password in `service_password_file`.
    """

    url: str
    bind_dn: str | None = None
    search_base: str | None = None
    search_filter: str = "(mail={user})"
    service_dn: str | None = None
    service_password_file: Path | None = None
    starttls: bool = False
    verify_cert: bool = True
    ca_file: Path | None = None
    timeout: float = 5.0


@dataclass(frozen=True)
class Window:
    """A planned outage window (`domains.<d>.planned`, or the panel's): mail for the domain is
    kept from `start` to `end` (Unix times) as in an outage, and replayed after it."""

    start: float
    end: float
    reason: str = ""


@dataclass(frozen=True)
class Domain:
    name: str
    primary: Primary
    continuity: Continuity | None
    ldap: LDAP | None = None
    notify_users: bool = True          # outage start and end notices to users' alternates
    planned: tuple[Window, ...] = ()

    def continuity_active(self, day: dt.date | None = None) -> bool:
        return self.continuity is not None and self.continuity.active_on(day or dt.date.today())


@dataclass(frozen=True)
class Readiness:
    """What `continuity-relay readiness` checks against (relay/delivery/readiness.py)."""

    imap: HostPort | None = None       # Dovecot's IMAP, for a test login; None: not checked
    account: str | None = None         # the test account (a registered user)
    password_file: Path | None = None  # its password, first line
    ldap_sync_days: int = 30           # an LDAP user's password confirmed longer ago: a warning
    subscription_days: int = 30        # a subscription ending sooner: a failure
    disk_days: int = 7                 # free disk for fewer days of mail: a failure


@dataclass(frozen=True)
class Config:
    file: Path
    hostname: str
    listen: Listen
    storage: Storage
    users_file: Path = Path("users.passwd")
    password_scheme: str = "BLF-CRYPT"
    message_size_limit: int = 50 * 1024**2
    max_recipients: int = 100
    replay: Replay = Replay()
    domains: dict[str, Domain] = field(default_factory=dict)
    log_level: str = "INFO"
    tls: TLS | None = None
    outbound: Outbound = Outbound()
    web: Web = Web()
    admins_file: Path | None = Path("admins.passwd")
    audit_log: Path = Path("audit.log")
    rspamd: Rspamd = Rspamd()
    limits: Limits = Limits()
    archive: ArchiveSettings = ArchiveSettings()
    log: Log = Log()
    alerts: Alerts = Alerts()
    readiness: Readiness = Readiness()


_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|d)?\s*$")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB|k|K|M|G)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "k": 1024,
               "K": 1024, "M": 1024**2, "G": 1024**3, "KB": 1000, "MB": 1000**2, "GB": 1000**3}


def parse_duration(value: Any) -> float:
    """`30s`, `15m`, `2h`, `90d` or a bare number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 30s, 15m, 90d")
    if isinstance(value, (int, float)) and value >= 0:
        return float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise ValueError(f"expected a duration like 30s, 15m, 90d, got {value!r}")
    return float(int(m.group(1)) * _DURATION_UNITS[m.group(2)])


def parse_size(value: Any) -> int:
    """`50MiB`, `512KiB`, `1048576` -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"expected a size like 50MiB, got {value!r}")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2)]


def parse_hostport(value: Any) -> HostPort:
    """`host:port` or `[v6]:port` -> HostPort."""
    text = str(value).strip()
    m = re.match(r"^\[([0-9A-Fa-f:.]+)\]:(\d+)$", text) or re.match(r"^([^:\s\[\]]+):(\d+)$", text)
    if not m or not 0 < int(m.group(2)) < 65536:
        raise ValueError(f"expected host:port, got {value!r}")
    return HostPort(m.group(1), int(m.group(2)))


class _Reader:
    """Walks the YAML tree, collecting every problem instead of stopping at the first."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self.problems: list[ConfigError] = []

    def problem(self, key: str, message: str) -> None:
        self.problems.append(ConfigError(str(self.file), key, message))

    def section(self, data: Any, key: str, allowed: set[str], required: set[str] = frozenset()) -> dict:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            self.problem(key, "expected a mapping")
            return {}
        for name in data:
            if name not in allowed:
                self.problem(f"{key}.{name}" if key else str(name), "unknown setting")
        for name in sorted(required - set(data)):
            self.problem(f"{key}.{name}" if key else name, "missing")
        return data

    def value(self, data: dict, key: str, name: str, parse, default: Any = None) -> Any:
        if data.get(name) is None:
            return default
        try:
            return parse(data[name])
        except (ValueError, TypeError) as exc:
            self.problem(f"{key}.{name}" if key else name, str(exc))
            return default

    def path(self, data: dict, key: str, name: str, default: Path | None = None,
             nullable: bool = True) -> Path | None:
        """The path written, else `default`; relative ones resolve against the file's folder.

        Written as null it is None, whatever the default (an error when not `nullable`).
        """
        if name not in data:
            path = default
        elif data[name] is None and nullable:
            return None
        elif not isinstance(data[name], str) or not data[name].strip():
            self.problem(f"{key}.{name}" if key else name, "expected a path")
            return None
        else:
            path = Path(data[name])
        if path is None or path.is_absolute():
            return path
        return (self.file.parent / path).resolve()


def _choice(options: tuple[str, ...]):
    def parse(value: Any) -> str:
        # YAML 1.1 reads a bare `off` as false: take it as the word the user wrote.
        text = "off" if value is False and "off" in options else str(value)
        for option in options:
            if text.lower() == option.lower():
                return option
        raise ValueError(f"expected one of {', '.join(options)}, got {value!r}")
    return parse


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"expected true or false, got {value!r}")


def _date(value: Any) -> dt.date:
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value))
    except ValueError:
        raise ValueError(f"expected a date like 2026-01-31, got {value!r}") from None


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected a whole number of at least 1, got {value!r}")
    return value


def _positive_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"expected a number above 0, got {value!r}")
    return float(value)


def _hostname(value: Any) -> str:
    text = str(value)
    if not re.match(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$", text):
        raise ValueError(f"expected a host name, got {value!r}")
    return text


def add_months(day: dt.date, months: int) -> dt.date:
    """The same day `months` later, clamped to the month's end (29 Feb + 12 months = 28 Feb)."""
    index = day.month - 1 + months
    year, month = day.year + index // 12, index % 12 + 1
    for last in (31, 30, 29, 28):
        try:
            return dt.date(year, month, min(day.day, last))
        except ValueError:
            continue
    raise AssertionError("unreachable")


def _primary(r: _Reader, raw: Any, key: str) -> Primary | None:
    if isinstance(raw, str):
        raw = {"address": raw}
    data = r.section(raw, key, {"address", "starttls", "verify_cert", "ca_file", "timeout",
                                "connect_timeout"}, {"address"})
    address = r.value(data, key, "address", parse_hostport)
    if address is None:
        return None
    return Primary(
        address=address,
        starttls=r.value(data, key, "starttls", _choice(STARTTLS_MODES), Primary.starttls),
        verify_cert=r.value(data, key, "verify_cert", _boolean, Primary.verify_cert),
        ca_file=r.path(data, key, "ca_file", Primary.ca_file),
        timeout=r.value(data, key, "timeout", parse_duration, Primary.timeout),
        connect_timeout=r.value(data, key, "connect_timeout", parse_duration, Primary.connect_timeout),
    )


def _smarthost(r: _Reader, raw: Any, key: str) -> Smarthost | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = {"address": raw}
    data = r.section(raw, key, {"address", "starttls", "verify_cert", "ca_file", "username",
                                "password_file", "timeout", "connect_timeout"}, {"address"})
    address = r.value(data, key, "address", parse_hostport)
    if address is None:
        return None
    username = r.value(data, key, "username", str, Smarthost.username)
    password_file = r.path(data, key, "password_file", Smarthost.password_file)
    if (username is None) != (password_file is None):
        r.problem(f"{key}.username", "username and password_file go together")
    return Smarthost(
        address=address,
        # With credentials the default is STARTTLS required: they never go out in clear.
        starttls=r.value(data, key, "starttls", _choice(STARTTLS_MODES),
                         "required" if username else Smarthost.starttls),
        verify_cert=r.value(data, key, "verify_cert", _boolean, Smarthost.verify_cert),
        ca_file=r.path(data, key, "ca_file", Smarthost.ca_file),
        username=username, password_file=password_file,
        timeout=r.value(data, key, "timeout", parse_duration, Smarthost.timeout),
        connect_timeout=r.value(data, key, "connect_timeout", parse_duration, Smarthost.connect_timeout),
    )


def _outbound(r: _Reader, raw: Any) -> Outbound:
    data = r.section(raw, "outbound", {"smarthost", "max_age", "retry_delay"})
    return Outbound(
        smarthost=_smarthost(r, data.get("smarthost"), "outbound.smarthost"),
        max_age=r.value(data, "outbound", "max_age", parse_duration, Outbound.max_age),
        retry_delay=r.value(data, "outbound", "retry_delay", parse_duration, Outbound.retry_delay),
    )


def _limits(r: _Reader, raw: Any) -> Limits:
    data = r.section(raw, "limits", {"connections", "connections_per_client", "idle_timeout",
                                     "max_errors"})
    return Limits(
        connections=r.value(data, "limits", "connections", _positive_int, Limits.connections),
        connections_per_client=r.value(data, "limits", "connections_per_client", _positive_int,
                                       Limits.connections_per_client),
        idle_timeout=r.value(data, "limits", "idle_timeout", _at_least_a_second, Limits.idle_timeout),
        max_errors=r.value(data, "limits", "max_errors", _positive_int, Limits.max_errors),
    )


def _at_least_a_second(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds < 1:
        raise ValueError(f"expected a duration of at least 1s, got {value!r}")
    return seconds


def _tls(r: _Reader, raw: Any, needed: bool) -> TLS | None:
    if raw is None:
        if needed:
            r.problem("tls", "listen.submission needs tls.cert and tls.key (STARTTLS before AUTH)")
        return None
    data = r.section(raw, "tls", {"cert", "key"}, {"cert", "key"})
    cert, key = r.path(data, "tls", "cert"), r.path(data, "tls", "key")
    for name, path in (("cert", cert), ("key", key)):
        if path is not None and not path.is_file():
            r.problem(f"tls.{name}", f"no such file: {path}")
    return TLS(cert, key) if cert and key else None


def _ldap(r: _Reader, raw: Any, key: str) -> LDAP | None:
    if raw is None:
        return None
    data = r.section(raw, key, {"url", "bind_dn", "search_base", "search_filter", "service_dn",
                                "service_password_file", "starttls", "verify_cert", "ca_file",
                                "timeout"}, {"url"})
    url = r.value(data, key, "url", _ldap_url)
    bind_dn, search_base = data.get("bind_dn", LDAP.bind_dn), data.get("search_base", LDAP.search_base)
    if (bind_dn is None) == (search_base is None):
        r.problem(f"{key}.bind_dn", "give either bind_dn or search_base (with search_filter)")
    service_dn = data.get("service_dn", LDAP.service_dn)
    service_password = r.path(data, key, "service_password_file", LDAP.service_password_file)
    if (service_dn is None) != (service_password is None):
        r.problem(f"{key}.service_dn", "service_dn and service_password_file go together")
    if url is None:
        return None
    return LDAP(url=url, bind_dn=bind_dn, search_base=search_base,
                search_filter=str(data.get("search_filter", LDAP.search_filter)), service_dn=service_dn,
                service_password_file=service_password,
                starttls=r.value(data, key, "starttls", _boolean, LDAP.starttls),
                verify_cert=r.value(data, key, "verify_cert", _boolean, LDAP.verify_cert),
                ca_file=r.path(data, key, "ca_file", LDAP.ca_file),
                timeout=r.value(data, key, "timeout", parse_duration, LDAP.timeout))


def _ldap_url(value: Any) -> str:
    text = str(value)
    if not re.match(r"^ldaps?://[^\s/]+(:\d+)?/?$", text):
        raise ValueError(f"expected ldap://host[:port] or ldaps://host[:port], got {value!r}")
    return text


def _web(r: _Reader, raw: Any, tls: TLS | None) -> Web:
    data = r.section(raw, "web", {"tls", "secret_file", "revoked_file", "session_lifetime", "url"})
    use_tls = r.value(data, "web", "tls", _boolean, Web.tls)
    if use_tls and tls is None:
        r.problem("web.tls", "needs tls.cert and tls.key")
    return Web(tls=use_tls, secret_file=r.path(data, "web", "secret_file", Web.secret_file),
               revoked_file=r.path(data, "web", "revoked_file", Web.revoked_file),
               session_lifetime=r.value(data, "web", "session_lifetime", parse_duration,
                                        Web.session_lifetime),
               url=r.value(data, "web", "url", _http_url, Web.url))


def _archive(r: _Reader, raw: Any) -> ArchiveSettings:
    data = r.section(raw, "archive", {"days"})
    return ArchiveSettings(days=r.value(data, "archive", "days", _positive_int, ArchiveSettings.days))


def _log(r: _Reader, raw: Any) -> Log:
    data = r.section(raw, "log", {"format"})
    return Log(format=r.value(data, "log", "format", _choice(LOG_FORMATS), Log.format))


def _rspamd(r: _Reader, raw: Any) -> Rspamd:
    data = r.section(raw, "rspamd", {"url", "timeout", "on_failure"})
    return Rspamd(url=r.value(data, "rspamd", "url", _http_url, Rspamd.url),
                  timeout=r.value(data, "rspamd", "timeout", _positive_duration, Rspamd.timeout),
                  on_failure=r.value(data, "rspamd", "on_failure", _choice(RSPAMD_ON_FAILURE),
                                     Rspamd.on_failure))


def _positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"expected a duration above 0, got {value!r}")
    return seconds


def _http_url(value: Any) -> str:
    text = str(value).strip()
    if not re.match(r"^https?://[^\s/?#]+(/[^\s?#]*)?$", text):
        raise ValueError(f"expected http://host:port, got {value!r}")
    return text.rstrip("/")


def _continuity(r: _Reader, raw: Any, key: str) -> Continuity | None:
    if raw is None:
        return None
    data = r.section(raw, key, {"since", "until"}, {"since", "until"})
    since = r.value(data, key, "since", _date)
    until = r.value(data, key, "until", _date)
    if since is None or until is None:
        return None
    if until < add_months(since, 12):
        r.problem(f"{key}.until", f"a subscription runs at least 12 months: until must be on or "
                                   f"after {add_months(since, 12).isoformat()}")
        return None
    return Continuity(since, until)


# -- planned outage windows and readiness (issue 12) ----------------------------------------------

REASON_MAX = 200


def parse_time(value: Any) -> float:
    """A moment as a Unix time: ISO 8601 (`2026-12-05 20:00`, `2026-12-05T20:00:00+01:00`,
    `...Z`), or a YAML timestamp; without an offset it is the machine's local time."""
    if isinstance(value, dt.datetime):
        moment = value
    elif isinstance(value, str):
        try:
            moment = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"expected a time like 2026-12-05 20:00 or 2026-12-05T20:00:00+01:00, "
                             f"got {value!r}") from None
    else:
        raise ValueError(f"expected a time like 2026-12-05 20:00, got {value!r}")
    return moment.timestamp()      # a naive datetime counts as local time


def reason_text(value: Any) -> str:
    """A planned outage's reason: one printable line, at most REASON_MAX characters."""
    text = str(value).strip()
    if len(text) > REASON_MAX or not all(c.isprintable() for c in text):
        raise ValueError(f"expected one printable line of at most {REASON_MAX} characters")
    return text


def _windows(r: _Reader, raw: Any, key: str) -> tuple[Window, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        r.problem(key, "expected a list of windows, each with start, end and an optional reason")
        return ()
    windows = []
    for n, item in enumerate(raw):
        where = f"{key}[{n}]"
        data = r.section(item, where, {"start", "end", "reason"}, {"start", "end"})
        start, end = r.value(data, where, "start", parse_time), r.value(data, where, "end", parse_time)
        reason = r.value(data, where, "reason", reason_text, "")
        if start is None or end is None:
            continue
        if end <= start:
            r.problem(f"{where}.end", "must be after start")
            continue
        windows.append(Window(start, end, reason))
    return tuple(sorted(windows, key=lambda w: w.start))


def _readiness(r: _Reader, raw: Any) -> Readiness:
    data = r.section(raw, "readiness", {"imap", "account", "password_file", "ldap_sync_days",
                                        "subscription_days", "disk_days"})
    readiness = Readiness(
        imap=r.value(data, "readiness", "imap", parse_hostport, Readiness.imap),
        account=r.value(data, "readiness", "account", lambda v: str(v).strip().lower(), Readiness.account),
        password_file=r.path(data, "readiness", "password_file", Readiness.password_file),
        ldap_sync_days=r.value(data, "readiness", "ldap_sync_days", _positive_int, Readiness.ldap_sync_days),
        subscription_days=r.value(data, "readiness", "subscription_days", _positive_int,
                                  Readiness.subscription_days),
        disk_days=r.value(data, "readiness", "disk_days", _positive_int, Readiness.disk_days))
    if readiness.imap is not None and (readiness.account is None or readiness.password_file is None):
        r.problem("readiness.imap", "needs readiness.account and readiness.password_file")
    return readiness


def _domains(r: _Reader, raw: Any) -> dict[str, Domain]:
    if not isinstance(raw, dict) or not raw:
        r.problem("domains", "expected a mapping of at least one domain")
        return {}
    domains: dict[str, Domain] = {}
    for name, body in raw.items():
        key = f"domains.{name}"
        try:
            domain = normalise_domain(str(name))
        except AddressError as exc:
            r.problem(key, f"not a valid domain: {exc}")
            continue
        data = r.section(body, key, {"primary", "continuity", "ldap", "notify_users", "planned"}, {"primary"})
        primary = _primary(r, data["primary"], f"{key}.primary") if "primary" in data else None
        continuity = _continuity(r, data.get("continuity"), f"{key}.continuity")
        ldap = _ldap(r, data.get("ldap"), f"{key}.ldap")
        notify = r.value(data, key, "notify_users", _boolean, Domain.notify_users)
        planned = _windows(r, data.get("planned"), f"{key}.planned")
        if domain in domains:
            r.problem(key, "domain listed twice")
        elif primary is not None:
            domains[domain] = Domain(domain, primary, continuity, ldap, notify, planned)
    return domains


def load(path: str | Path) -> Config:
    """Read and validate a configuration file; raise ConfigErrors naming every problem."""
    file = Path(path).absolute()
    r = _Reader(file)
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigErrors([ConfigError(str(file), "(file)", exc.strerror or str(exc))]) from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f"line {where.line + 1}: " if where else ""
        raise ConfigErrors([ConfigError(str(file), "(file)", f"{line}not valid YAML")]) from None
    top = r.section(raw, "", {"hostname", "listen", "storage", "users_file", "password_scheme",
                              "message_size_limit", "max_recipients", "replay", "domains",
                              "log_level", "tls", "outbound", "web", "admins_file", "audit_log",
                              "rspamd", "limits", "archive", "log", "alerts", "readiness"},
                    {"listen", "storage", "domains"})
    listen = r.section(top.get("listen"), "listen", {"inbound", "submission", "web", "metrics"},
                       {"inbound"})
    storage = r.section(top.get("storage"), "storage", {"maildirs", "spool", "owner", "archive"},
                        {"maildirs", "spool"})
    replay = r.section(top.get("replay"), "replay", {"probe_interval", "concurrency", "rate"})
    config = Config(
        file=file,
        hostname=r.value(top, "", "hostname", _hostname, None) or socket.getfqdn(),
        listen=Listen(inbound=r.value(listen, "listen", "inbound", parse_hostport),
                      submission=r.value(listen, "listen", "submission", parse_hostport, Listen.submission),
                      web=r.value(listen, "listen", "web", parse_hostport, Listen.web),
                      metrics=_metrics_address(r, listen)),
        storage=Storage(
            maildirs=r.path(storage, "storage", "maildirs"),
            spool=r.path(storage, "storage", "spool"),
            owner=r.value(storage, "storage", "owner", _owner, Storage.owner),
            archive=r.path(storage, "storage", "archive", Storage.archive),
        ),
        users_file=r.path(top, "", "users_file", Config.users_file),
        password_scheme=r.value(top, "", "password_scheme", _choice(PASSWORD_SCHEMES),
                                Config.password_scheme),
        message_size_limit=r.value(top, "", "message_size_limit", parse_size, Config.message_size_limit),
        max_recipients=r.value(top, "", "max_recipients", _positive_int, Config.max_recipients),
        replay=Replay(
            probe_interval=r.value(replay, "replay", "probe_interval", parse_duration,
                                   Replay.probe_interval),
            concurrency=r.value(replay, "replay", "concurrency", _positive_int, Replay.concurrency),
            rate=r.value(replay, "replay", "rate", _positive_number, Replay.rate),
        ),
        domains=_domains(r, top.get("domains")) if "domains" in top else {},
        log_level=r.value(top, "", "log_level", _choice(("DEBUG", "INFO", "WARNING", "ERROR")),
                          Config.log_level),
        tls=(tls := _tls(r, top.get("tls"), needed="submission" in listen)),
        outbound=_outbound(r, top.get("outbound")),
        web=_web(r, top.get("web"), tls),
        admins_file=r.path(top, "", "admins_file", Config.admins_file),
        audit_log=r.path(top, "", "audit_log", Config.audit_log, nullable=False),   # never off
        rspamd=_rspamd(r, top.get("rspamd")),
        limits=_limits(r, top.get("limits")),
        archive=_archive(r, top.get("archive")),
        log=_log(r, top.get("log")),
        alerts=_alerts(r, top.get("alerts")),
        readiness=_readiness(r, top.get("readiness")),
    )
    if config.alerts.to and config.outbound.smarthost is None:
        r.problem("alerts.to", "alert mail goes through outbound.smarthost, which is not set")
    if r.problems:
        raise ConfigErrors(r.problems)
    return config


def changed_keys(old: Config, new: Config) -> list[str]:
    """The dotted keys whose values differ between two loaded configurations (a SIGHUP
    reload), in field order, as deep as they go (`domains.example.com.primary.address`, a
    host:port being one value); a domain added or removed is `domains.<name>`, a block set or
    unset its own key (`tls`)."""
    return _diff(old, new, "")


def _diff(old: Any, new: Any, key: str) -> list[str]:
    if dataclasses.is_dataclass(old) and type(old) is type(new) and not isinstance(old, HostPort):
        return [changed for f in dataclasses.fields(old) if f.name != "file"
                for changed in _diff(getattr(old, f.name), getattr(new, f.name),
                                     f"{key}.{f.name}" if key else f.name)]
    if isinstance(old, dict) and isinstance(new, dict):
        return [changed for name in sorted(set(old) | set(new))
                for changed in ([f"{key}.{name}"] if (name in old) != (name in new)
                                else _diff(old[name], new[name], f"{key}.{name}"))]
    return [] if old == new else [key]


def _metrics_address(r: _Reader, listen: dict) -> HostPort | None:
    """`listen.metrics`: on by default (`Listen.metrics`); written as null or off, none."""
    if "metrics" in listen:
        value = listen["metrics"]
        if value is None or value is False or value == "off":   # YAML reads a bare off as false
            return None
    return r.value(listen, "listen", "metrics", parse_hostport, Listen.metrics)


def _alerts(r: _Reader, raw: Any) -> Alerts:
    data = r.section(raw, "alerts", {"to", "from", "webhook", "webhook_timeout", "retry_delay",
                                     "max_age", "disk_days", "disk_interval", "users_end_delay"})
    return Alerts(
        to=r.value(data, "alerts", "to", _addresses, Alerts.to),
        sender=r.value(data, "alerts", "from", _address, Alerts.sender),
        webhook=r.value(data, "alerts", "webhook", _http_url, Alerts.webhook),
        webhook_timeout=r.value(data, "alerts", "webhook_timeout", _positive_duration,
                                Alerts.webhook_timeout),
        retry_delay=r.value(data, "alerts", "retry_delay", _positive_duration, Alerts.retry_delay),
        max_age=r.value(data, "alerts", "max_age", _positive_duration, Alerts.max_age),
        # Written as null it is off; absent, the default.
        disk_days=None if "disk_days" in data and data["disk_days"] is None else
        r.value(data, "alerts", "disk_days", _positive_number, Alerts.disk_days),
        disk_interval=r.value(data, "alerts", "disk_interval", _at_least_a_second, Alerts.disk_interval),
        users_end_delay=r.value(data, "alerts", "users_end_delay", _positive_duration,
                                Alerts.users_end_delay),
    )


def _address(value: Any) -> str:
    try:
        return str(parse_mailbox(str(value)))
    except AddressError as exc:
        raise ValueError(f"not a usable address {value!r}: {exc}") from None


def _addresses(value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ValueError("expected an address or a list of addresses")
    return tuple(_address(item) for item in items)


def _owner(value: Any) -> str:
    import pwd

    try:
        pwd.getpwnam(str(value))
    except KeyError:
        raise ValueError(f"no such user {value!r} on this machine") from None
    return str(value)
