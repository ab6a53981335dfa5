"""Logging in: password checks against the passwd-file or the domain's LDAP directory, and a
throttle for failed logins.

Used by the submission port (and, later, the control panel and the webmail):
  - `authenticate` (and `check_password`, which gives only its user) reads the directory and
    verifies the hash in a worker thread, so a bcrypt or argon2 check (100-200 ms) never blocks
    the event loop. Without LDAP, whoever asks and whatever the answer, it costs one hash check:
    an unknown login is checked against a fixed dummy hash of the configured scheme, so the
    time taken does not tell who is registered.
  - A domain with `ldap` settings asks its directory first (`relay.ldap`), for registered,
    active users only; any other login in that domain costs the same round trips, about a
    name no entry has (`_ask_about_nobody`), and one dummy hash check. A login in a domain
    without `ldap`, or in none the relay serves, asks no directory: which domains use one is
    no secret, who is registered is. While the directory answers it is the truth: its yes stores a fresh
    hash of the password in the passwd-file (only when the stored one does not already verify
    it), its no is final. When it cannot be reached, the passwd-file answers with the last
    password synced, so the same password keeps working everywhere through an outage. The
    passwd-file is written by `Directory.set_password` (temp file, fsync, rename): a crash
    leaves the old hash or the new one, and the next login writes it again.
    Whether each domain's directory answers is remembered in memory, only to log the change.
  - `LoginThrottle` remembers failures in memory only (a restart forgets them, which is fine:
    a restart is rare and slow compared with the window). Failures are counted per client
    address and per account in a sliding window; an account over its limit is locked for every
    address, and an address over its limit is locked for every account.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import unicodedata
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from relay.addresses import AddressError, Mailbox, client_network, parse_mailbox
from relay.config import Domain
from relay.directory import Directory, User, password_is_usable, verify_password
from relay.errors import DirectoryError, StorageError
from relay.ldap import Outcome, ldap_bind
from relay.log import event
from relay.storage import synced
from relay.storage.durable import Owner

# Hashes of random strings nobody knows, at the cost `hash_password` uses, checked when the login
# names no usable account: the answer is always "no", after the same work as a real check.
_DUMMY_HASHES = {
    "BLF-CRYPT": "{BLF-CRYPT}$2b$12$2rOyGYXjiZCsGQ4AkeYB8.0w08kvNPmu3CUCgHkuLjPm4Mp32ej0q",
    "ARGON2ID": "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=4$wKxWXiWHJt3Rr1cjQBUM7g$"
                "PQbH33lfaCpwIfavJuClw/RFUHS4HY7FvRJlHvbiIGo",
}

MAX_KEY = 256   # longest account name the throttle remembers; longer logins are cut

NOT_SYNCED = ("You have not logged in before the directory became unreachable, so no password is "
              "stored here yet; ask your administrator to allocate one.")

# domain -> whether its LDAP directory answered the last time it was asked (for the log only)
_ldap_answers: dict[str, bool] = {}


@dataclass(frozen=True)
class LoginResult:
    """The user if the login succeeded; else `problem`, when there is more to say than "wrong
    login or password": a sentence to show as it is (`NOT_SYNCED`), or None."""

    user: User | None = None
    problem: str | None = None


def login_address(login: str) -> Mailbox | None:
    """The mailbox a login names (`Alice@Example.COM` -> alice@example.com), or None.

    This is the one normalisation of a login: the throttle, the password check and the log all
    use its result. A login with blanks, control or format characters anywhere (a tab, U+000B, a
    soft hyphen or zero-width space that IDNA would silently drop) names nobody: otherwise
    `alice@exam\u00adple.com` would be a new throttle key for alice's own account. Blanks
    around the whole login (pasted into a form) are dropped first."""
    login = login.strip(" \t")
    if any(unicodedata.category(char)[0] in "CZ" for char in login):
        return None
    try:
        return parse_mailbox(login)
    except AddressError:
        return None


def account_key(login: str) -> str:
    """The name under which failures for `login` are counted: the normalised address when it is
    one, else the lower-cased text (so junk logins are counted too, but bounded in size)."""
    address = login_address(login)
    if address:
        return str(address)
    # Junk is counted under what it looks like without its invisible characters, so a tab or a
    # soft hyphen added to a locked account's name is still that account.
    visible = "".join(char for char in login if unicodedata.category(char)[0] != "C").strip()
    address = login_address(visible)
    return str(address) if address else visible.lower()[:MAX_KEY]


async def check_password(directory: Directory, login: str, password: str) -> User | None:
    """The user `login` names if `password` is theirs and they may log in, else None.

    None for an unknown login, a user without a password, a deactivated user or a wrong
    password. A passwd-file that cannot be read, or a hash that cannot be parsed, raises: that
    is the relay's own fault, and callers answer it as temporary. See `authenticate`.
    """
    return (await authenticate(directory, login, password)).user


async def authenticate(directory: Directory, login: str, password: str) -> LoginResult:
    """`check_password`, with the reason a login page should show when there is one.

    Only registered users log in. In a domain with `ldap` settings, a registered, active user's
    password is the directory's while it answers (REFUSED is final, never checked against the
    passwd-file), and the last one synced while it does not. A user without a stored password
    then gets `problem=NOT_SYNCED`, whatever the password typed.
    """
    address = login_address(login)
    domain = directory.config.domains.get(address.domain) if address else None
    if address is None or domain is None or domain.ldap is None:
        return LoginResult(await asyncio.to_thread(_check, directory, login, password))
    user = await asyncio.to_thread(directory.get, address)
    if user is None or not user.active or not password_is_usable(password):
        if password_is_usable(password):    # the directory work a registered user's check costs
            await asyncio.to_thread(_ask_about_nobody, domain)
        await asyncio.to_thread(_check, directory, login, "")     # the same cost as any refusal
        return LoginResult()
    outcome, detail, gone = await asyncio.to_thread(ldap_bind, domain.ldap, address, password)
    _note_ldap(domain, outcome, detail)
    if outcome is Outcome.ACCEPTED:
        return LoginResult(await asyncio.to_thread(_keep_password, directory, user, password))
    if outcome is Outcome.REFUSED:
        event("auth.ldap_refused", user=user.email, detail=detail)
        await asyncio.to_thread(_forget_stale, directory, user, login, password, gone)
        return LoginResult()
    if not user.password_hash:
        await asyncio.to_thread(_check, directory, login, "")     # the same cost as any refusal
        return LoginResult(problem=NOT_SYNCED)
    return LoginResult(await asyncio.to_thread(_check, directory, login, password))


def _ask_about_nobody(domain: Domain) -> None:
    """The directory round trips of a real check, for a login refused without one (unknown or
    deactivated), so that the time a refusal takes does not tell who is registered (review
    9.8), nor does a directory down, which delays every check by its time-out. It asks about
    a name no entry has, with a password nobody has: no account's failure count moves, and
    the typed password never goes to an entry the relay does not serve."""
    assert domain.ldap is not None
    nobody = Mailbox(f"nobody-{secrets.token_hex(8)}", domain.name)
    answer = ldap_bind(domain.ldap, nobody, secrets.token_urlsafe(18))
    _note_ldap(domain, answer.outcome, answer.detail)


def _note_ldap(domain: Domain, outcome: Outcome, detail: str) -> None:
    """Log when a domain's directory starts or stops answering, not at every login."""
    answers = outcome is not Outcome.UNREACHABLE
    if _ldap_answers.get(domain.name) == answers:
        return
    _ldap_answers[domain.name] = answers
    assert domain.ldap is not None
    if answers:
        event("auth.ldap_ok", domain=domain.name, url=domain.ldap.url)
    else:
        event("auth.ldap_unreachable", logging.WARNING, domain=domain.name,
              url=domain.ldap.url, detail=detail)


def _keep_password(directory: Directory, user: User, password: str) -> User | None:
    """After the directory's yes: store a fresh hash of `password` unless the stored one already
    verifies it. A write that fails is logged and the login still succeeds: the directory said
    yes; the next login tries the write again."""
    _note_synced(directory, user)
    if user.password_hash and _still_verifies(user.password_hash, password):
        return user
    try:
        fresh = directory.set_password(user.email, password)
    except (DirectoryError, StorageError, OSError) as exc:
        event("auth.password_sync_failed", logging.ERROR, user=user.email,
              error=type(exc).__name__, detail=exc)
        return user
    event("auth.password_synced", user=user.email)
    return fresh if fresh.active else None


def _note_synced(directory: Directory, user: User) -> None:
    """For the readiness report: when the directory last confirmed this user's password. A
    note that cannot be written is logged; the login goes on."""
    storage = directory.config.storage
    try:
        synced.mark(storage.spool, user.address, Owner.named(storage.owner))
    except StorageError as exc:
        event("auth.sync_note_failed", logging.ERROR, user=user.email, error=exc)


def _forget_stale(directory: Directory, user: User, login: str, password: str, gone: bool) -> None:
    """After the directory's no: the stored hash goes at once when it is stale, so IMAP, POP3
    and the Outbox stop taking a password the directory no longer does. Stale means the account
    is gone, disabled or locked, or the stored hash still takes the password just refused (it
    was changed in the directory). A mistyped password proves nothing: the cache stays.

    Either way this costs one hash check, as every refusal does, so the time a refusal takes
    does not tell a registered user from an unknown one (security review 9.8)."""
    if not user.password_hash:
        _check(directory, login, "")
        return
    if not (_still_verifies(user.password_hash, password) or gone):
        return
    try:
        directory.forget_password(user.email)
    except (DirectoryError, StorageError, OSError) as exc:
        event("auth.password_forget_failed", logging.ERROR, user=user.email,
              error=type(exc).__name__, detail=exc)
        return
    event("auth.password_forgotten", logging.WARNING, user=user.email,
          reason="account refused" if gone else "password refused")


def _check(directory: Directory, login: str, password: str) -> User | None:
    address = login_address(login)
    user = directory.get(address) if address else None
    stored = user.password_hash if user is not None and user.password_hash else None
    if stored is None:
        stored = _DUMMY_HASHES.get(directory.config.password_scheme, _DUMMY_HASHES["BLF-CRYPT"])
    well_formed = password_is_usable(password)
    matches = verify_password(stored, password if well_formed else "")
    if user is None or not user.can_log_in or not matches or not well_formed:
        return None
    return user


def _still_verifies(password_hash: str, password: str) -> bool:
    try:
        return verify_password(password_hash, password)
    except ValueError:              # an unreadable stored hash: the caller replaces it
        return False


class LoginThrottle:
    """Failed logins per client address and per account, in a sliding window of `window` seconds.

    Use: if `blocked(address, account)`, refuse without checking the password; after a wrong
    password call `failed(...)` and wait `delay(...)` seconds before answering; after a right
    one call `succeeded(...)`, which forgets the account's failures (not the address's: one good
    account must not launder an address that guesses at others).

    `account_limit` failures lock an account for the client network they came from (an IPv4
    /24, an IPv6 /64), `address_limit` failures lock an address for every account, until the
    oldest of them leaves the window. The lock is per network so that it is no lever against
    the user: a stranger who types alice's address with wrong passwords locks out only their
    own network, not alice at home or at the office. A guesser spread over many networks is
    slowed by the delays and by `address_limit` at each address. The delay grows
    0, base, 2*base, 4*base ... up to `max_delay` with the larger of the two counts.

    Memory is bounded: each key keeps at most its limit of timestamps, keys whose failures all
    left the window are dropped as failures come in, and beyond `max_keys` keys per table the
    least recently failed are forgotten.
    """

    def __init__(self, window: float = 900.0, account_limit: int = 5, address_limit: int = 20,
                 base_delay: float = 1.0, max_delay: float = 10.0, max_keys: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if window <= 0 or account_limit < 1 or address_limit < 1 or max_keys < 1:
            raise ValueError("window, limits and max_keys must be positive")
        self.window = window
        self.account_limit = account_limit
        self.address_limit = address_limit
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.max_keys = max_keys
        self.clock = clock
        # key -> failure times, oldest first; dicts ordered by each key's latest failure
        self._accounts: dict[str, deque[float]] = {}
        self._addresses: dict[str, deque[float]] = {}

    def blocked(self, address: str, account: str) -> bool:
        accounts, addresses = self._counts(address, account)
        return accounts >= self.account_limit or addresses >= self.address_limit

    def delay(self, address: str, account: str) -> float:
        failures = max(self._counts(address, account))
        if failures <= 1:
            return 0.0
        return min(self.max_delay, self.base_delay * 2.0 ** min(failures - 2, 60))

    def failed(self, address: str, account: str) -> None:
        now = self.clock()
        self._record(self._accounts, _account_from(account, address), self.account_limit, now)
        self._record(self._addresses, address, self.address_limit, now)

    def succeeded(self, address: str, account: str) -> None:
        self._accounts.pop(_account_from(account, address), None)

    @property
    def tracked(self) -> int:
        """How many accounts and addresses have failures remembered (for tests and status)."""
        return len(self._accounts) + len(self._addresses)

    def _counts(self, address: str, account: str) -> tuple[int, int]:
        now = self.clock()
        return (self._count(self._accounts, _account_from(account, address), now),
                self._count(self._addresses, address, now))

    def _count(self, table: dict[str, deque[float]], key: str, now: float) -> int:
        times = table.get(key)
        if times is None:
            return 0
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del table[key]
        return len(times)

    def _record(self, table: dict[str, deque[float]], key: str, limit: int, now: float) -> None:
        times = table.pop(key, None) or deque(maxlen=limit)
        times.append(now)
        table[key] = times              # re-inserted: the table stays ordered by latest failure
        self._prune(table, now)

    def _prune(self, table: dict[str, deque[float]], now: float) -> None:
        """Drop keys whose latest failure left the window (they sit at the front), then the
        least recently failed keys beyond `max_keys`."""
        while table:
            key, times = next(iter(table.items()))
            if times[-1] > now - self.window and len(table) <= self.max_keys:
                break
            del table[key]


def _account_from(account: str, address: str) -> str:
    return f"{account_key(account)} from {client_network(address, 24) or address}"
