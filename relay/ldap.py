"""Checking a password against a domain's LDAP directory (OpenLDAP, Active Directory).

Holds no state and writes no files. `ldap_bind` blocks (callers run it through
`asyncio.to_thread`) and is the only place that imports ldap3: its exceptions and result codes
are translated here, and nowhere else, into one of three outcomes:

    ACCEPTED      the directory bound the user with this password
    REFUSED       the directory answered no: wrong password, no such user, an account that is
                  disabled, locked or expired (Active Directory's sub-codes, OpenLDAP's ppolicy
                  response control), a search that finds nobody or more than one
                  entry. An empty password is refused before any connection: it would be an
                  unauthenticated bind, which many servers answer with success.
    UNREACHABLE   no answer about the user: no connection, a timeout, a TLS failure (handshake,
                  certificate, StartTLS refused), a busy or failing server, or a service account
                  or search base the directory refuses (a configuration fault, logged as such)

Who the user is in the directory: with `bind_dn` the template is filled in and bound directly
(`uid={local},ou=people,dc=example,dc=com`, or an Active Directory name such as
`{local}@EXAMPLE.LAN` or `EXAMPLE\\{local}`); with `search_base` the filter is filled in, the
search runs as `service_dn` (anonymously without one) and the single entry found is bound.
Placeholders are {user} (the whole address), {local} and {domain}, and every value put into a
DN or a filter is escaped (RFC 4514, RFC 4515), so a login cannot name another entry. A search
that finds nobody (or two) still binds once, as a name no entry has, so every answer costs the
same round trips (security review 9.8).
"""

from __future__ import annotations

import ast
import contextlib
import enum
import math
import re
import secrets
import ssl
from collections.abc import Callable
from typing import NamedTuple

from ldap3 import ANONYMOUS, NONE, SIMPLE, SUBTREE, SYNC, Connection, Server, Tls
from ldap3.core.exceptions import LDAPException
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import escape_rdn

from relay.addresses import Mailbox
from relay.config import LDAP


class Outcome(enum.Enum):
    ACCEPTED = "accepted"
    REFUSED = "refused"
    UNREACHABLE = "unreachable"


class Answer(NamedTuple):
    outcome: Outcome
    detail: str = ""    # why, for the log; never holds a password
    gone: bool = False  # REFUSED because the account is missing, disabled, locked or expired,
                        # not only for a wrong password: no cached password may stand in for it


# Bind result codes that are the directory's answer about the account, not a fault: wrong
# password or no such entry (49, 32, 34), an entry that cannot bind this way (48), an account
# locked, disabled or expired (AD: 49 with a sub-code; OpenLDAP ppolicy and 389-DS: 19, 50, 53).
# Any other code (busy 51, unavailable 52, confidentialityRequired 13, other 80...) is a fault.
_ACCOUNT_CODES = {19, 32, 34, 48, 49, 50, 53}
# Active Directory's 49 says why in its message: "data 52e" is a wrong password; these say the
# account is unknown (525), restricted (530, 531), expired (532, 701), disabled (533), must
# change its password (773) or is locked (775).
_AD_ACCOUNT_DATA = re.compile(r"\bdata (525|530|531|532|533|701|773|775)\b")
# OpenLDAP's ppolicy overlay (and 389-DS) answer a locked or expired account with a plain 49;
# they say why only in the password policy response control (draft-behera-ldap-password-
# policy), which every user bind asks for (not critical: a server that does not know it
# ignores it). Its `error` passwordExpired (0) and accountLocked (1) mean the account is
# refused, whatever the password. OpenLDAP sends accountLocked only with `ppolicy_use_lockout`.
PPOLICY = "1.3.6.1.4.1.42.2.27.8.5.1"
_PPOLICY_GONE = {0, 1}
_SEARCH_OK = {0, 4}         # success, sizeLimitExceeded (more than one entry: refused below)
_PLACEHOLDER = re.compile(r"\{(user|local|domain)\}")

STRATEGY = SYNC             # the unit tests swap in ldap3's MOCK_SYNC


def ldap_bind(settings: LDAP, address: Mailbox, password: str) -> Answer:
    """Ask the directory whether `password` is `address`'s password. Blocks."""
    if not password:
        return Answer(Outcome.REFUSED, "empty password")
    try:
        server = make_server(settings)
        if settings.bind_dn is not None:
            dn = user_dn(settings.bind_dn, address)
        else:
            found = _find_dn(server, settings, address)
            if isinstance(found, Answer):
                if found.outcome is Outcome.REFUSED:
                    _bind_nobody(server, settings)
                return found
            dn = found
        return _bind_as(server, settings, dn, password)
    except (LDAPException, OSError) as exc:    # OSError: a socket or TLS error ldap3 let through,
        return Answer(Outcome.UNREACHABLE, _describe(exc, password))    # or service_password_file


def user_dn(template: str, address: Mailbox) -> str:
    """The bind name for `address`: values escaped as RFC 4514 attribute values when the template
    is a DN; an Active Directory name (`{local}@EXAMPLE`, `EXAMPLE\\{local}`) takes them as
    they are, since it has no structure to break out of."""
    return _fill(template, address, escape_rdn if "=" in template else str)


def user_filter(template: str, address: Mailbox) -> str:
    """The search filter for `address`, values escaped as RFC 4515 assertion values."""
    return _fill(template, address, escape_filter_chars)


def _fill(template: str, address: Mailbox, escape: Callable[[str], str]) -> str:
    values = {"user": str(address), "local": address.local, "domain": address.domain}
    return _PLACEHOLDER.sub(lambda m: escape(values[m.group(1)]), template)


def make_server(settings: LDAP) -> Server:
    """The ldap3 Server for `settings`; TLS (ldaps:// or StartTLS) verifies the certificate and
    the host name against `ca_file`, or the system's CAs, unless `verify_cert` is off."""
    use_ssl = settings.url.lower().startswith("ldaps://")
    tls = None
    if use_ssl or settings.starttls:
        tls = _Tls(validate=ssl.CERT_REQUIRED if settings.verify_cert else ssl.CERT_NONE,
                   ca_certs_file=str(settings.ca_file) if settings.ca_file else None)
    return Server(settings.url, use_ssl=use_ssl, tls=tls, get_info=NONE,
                  connect_timeout=settings.timeout)


class _Tls(Tls):
    """ldap3's Tls with the handshake left to the ssl module's defaults (TLS 1.2 or later, host
    name checked during the handshake). ldap3 itself checks the name after the handshake, with
    the deprecated `ssl.match_hostname`, and leaves the socket open when it does not match."""

    def wrap_socket(self, connection, do_handshake=False):
        context = ssl.create_default_context(cafile=self.ca_certs_file)
        if self.validate == ssl.CERT_NONE:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        connection.socket = context.wrap_socket(connection.socket, server_hostname=connection.server.host,
                                                do_handshake_on_connect=do_handshake)


def _connect(server: Server, settings: LDAP, user: str | None, password: str | None) -> Connection:
    """An open connection (StartTLS done when asked for), not yet bound."""
    conn = Connection(server, user=user, password=password,
                      authentication=SIMPLE if user else ANONYMOUS, client_strategy=STRATEGY,
                      receive_timeout=_seconds(settings.timeout), auto_referrals=False, read_only=True,
                      check_names=False, raise_exceptions=False)
    try:
        conn.open()
        if settings.starttls and not server.ssl:
            conn.start_tls()            # raises LDAPStartTLSError when refused or not trusted
    except BaseException:
        _close(conn)
        raise
    return conn


def _close(conn: Connection) -> None:
    # The answer is already known: a server that drops the connection first changes nothing.
    with contextlib.suppress(LDAPException, OSError):
        conn.unbind()
    # ldap3 leaves the socket of a failed connect or TLS handshake open in `conn.socket`.
    if getattr(conn, "socket", None) is not None:
        with contextlib.suppress(OSError):
            conn.socket.close()


def _bind_as(server: Server, settings: LDAP, dn: str, password: str) -> Answer:
    conn = _connect(server, settings, dn, password)
    try:
        if conn.bind(controls=[(PPOLICY, False, None)]):
            return Answer(Outcome.ACCEPTED)
        return bind_failure(conn.result)
    finally:
        _close(conn)


def _bind_nobody(server: Server, settings: LDAP) -> None:
    """After a search that found no one entry: the bind a found user would have cost, as a name
    under `search_base` that no entry has, with a password nobody has, so the time a refusal
    takes does not tell whether the directory knows the address. Its answer changes nothing."""
    assert settings.search_base is not None
    dn = f"cn={escape_rdn('nobody-' + secrets.token_hex(8))},{settings.search_base}"
    with contextlib.suppress(LDAPException, OSError):
        _bind_as(server, settings, dn, secrets.token_urlsafe(18))


def bind_failure(result: dict | None) -> Answer:
    """The outcome of a user bind the directory did not accept, from ldap3's `conn.result`."""
    result = result or {}
    code = result.get("result")
    detail = f"{result.get('description') or 'no result'} ({code})"
    if code in _ACCOUNT_CODES:
        message = str(result.get("message") or "")
        policy = ppolicy_error(((result.get("controls") or {}).get(PPOLICY) or {}).get("value"))
        gone = (code != 49 or bool(_AD_ACCOUNT_DATA.search(message))
                or policy in _PPOLICY_GONE)
        if policy is not None:
            detail += f" ppolicy error {policy}"
        return Answer(Outcome.REFUSED, detail, gone)
    return Answer(Outcome.UNREACHABLE, detail)


def ppolicy_error(value: object) -> int | None:
    """The `error` of a password policy response control's BER value, or None:
    SEQUENCE { warning [0] ... OPTIONAL, error [1] ENUMERATED OPTIONAL }. The value is a
    handful of bytes, so only short-form lengths are read; anything else is no error."""
    if not isinstance(value, bytes) or len(value) < 2 or value[0] != 0x30 or value[1] >= 0x80:
        return None
    body, at = value[2:2 + value[1]], 0
    while at + 2 <= len(body) and body[at + 1] < 0x80:
        tag, size = body[at], body[at + 1]
        if tag == 0x81 and 1 <= size <= 4 and at + 2 + size <= len(body):
            return int.from_bytes(body[at + 2:at + 2 + size], "big")
        at += 2 + size
    return None


def _find_dn(server: Server, settings: LDAP, address: Mailbox) -> str | Answer:
    """The DN of the one entry `search_filter` finds for `address`, or the outcome to give."""
    assert settings.search_base is not None
    password = None
    if settings.service_password_file is not None:
        text = settings.service_password_file.read_text(encoding="utf-8")
        password = text.rstrip("\r\n")
    conn = _connect(server, settings, settings.service_dn, password)
    try:
        if not conn.bind():
            return Answer(Outcome.UNREACHABLE, f"service_dn bind refused: {_result(conn)}")
        conn.search(settings.search_base, user_filter(settings.search_filter, address), SUBTREE,
                    attributes=["1.1"], size_limit=2, time_limit=_seconds(settings.timeout))
        if (conn.result or {}).get("result") not in _SEARCH_OK:
            return Answer(Outcome.UNREACHABLE, f"search failed: {_result(conn)}")
        found = [entry["dn"] for entry in conn.response or [] if entry.get("type") == "searchResEntry"]
    finally:
        _close(conn)
    if not found:
        return Answer(Outcome.REFUSED, "no entry matches search_filter", gone=True)
    if len(found) > 1:
        return Answer(Outcome.REFUSED, "search_filter matches more than one entry")
    return found[0]


def _seconds(timeout: float) -> int:
    """Whole seconds, at least one: ldap3 packs the receive timeout into SO_RCVTIMEO as integers."""
    return max(1, math.ceil(timeout))


def _result(conn: Connection) -> str:
    result = conn.result or {}
    return f"{result.get('description') or 'no result'} ({result.get('result')})"


def _describe(exc: BaseException, password: str) -> str:
    """One line for the log. ldap3's repr of a connection shows its password: should a message
    ever carry one, it is blanked out."""
    text = str(exc)
    for _ in range(3):      # ldap3 wraps messages in tuples: "('(\"socket ssl wrapping error...\",)',)"
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            break
        if not isinstance(value, tuple) or not value:
            break
        text = str(value[0])
    text = text or type(exc).__name__
    if password:
        text = text.replace(password, "***")
    return f"{type(exc).__name__}: {text}"[:300]
