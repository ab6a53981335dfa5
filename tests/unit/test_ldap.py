"""LDAP password checks without a network: escaping, how ldap3's answers and exceptions become
outcomes (against ldap3's MOCK_SYNC directory), and what `authenticate` does with each outcome
(with `ldap_bind` replaced by a script). The real slapd runs in tests/integration/test_ldap.py."""

from __future__ import annotations

import asyncio
import logging
import textwrap
from dataclasses import replace
from pathlib import Path

import bcrypt
import pytest
from ldap3 import MOCK_SYNC, Connection, Server
from ldap3.core.exceptions import LDAPSocketOpenError, LDAPSocketReceiveError, LDAPStartTLSError
from ldap3.strategy.mockSync import MockSyncStrategy

from relay import auth, ldap
from relay.addresses import Mailbox
from relay.auth import NOT_SYNCED, authenticate, check_password
from relay.config import LDAP, load
from relay.directory import Directory, verify_password
from relay.ldap import PPOLICY, Answer, Outcome, bind_failure, ldap_bind, user_dn, user_filter

ALICE = Mailbox("alice", "example.com")
PEOPLE = "ou=people,dc=example,dc=com"
SERVICE_DN = "cn=relay,dc=example,dc=com"
BIND = LDAP(url="ldap://directory.invalid", bind_dn=f"uid={{local}},{PEOPLE}", timeout=1)


# -- escaping ----------------------------------------------------------------------------------

@pytest.mark.parametrize("local, dn", [
    ("alice", f"uid=alice,{PEOPLE}"),
    ("a,uid=root", f"uid=a\\,uid\\=root,{PEOPLE}"),
    ("a+cn=x", f"uid=a\\+cn\\=x,{PEOPLE}"),
    ('a\\"<>;', f'uid=a\\\\\\"\\<\\>\\;,{PEOPLE}'),
    ("#a", f"uid=\\#a,{PEOPLE}"),
    (" a ", f"uid=\\ a\\ ,{PEOPLE}"),
    ("a\x00", f"uid=a\\\x00,{PEOPLE}"),
])
def test_dn_values_are_escaped(local, dn):
    assert user_dn(f"uid={{local}},{PEOPLE}", Mailbox(local, "example.com")) == dn


def test_dn_placeholders():
    address = Mailbox("a=b", "example.com")
    assert user_dn("mail={user},ou={domain},dc=example,dc=com", address) == \
        "mail=a\\=b@example.com,ou=example.com,dc=example,dc=com"
    assert user_dn("cn={other},uid={local}", address) == "cn={other},uid=a\\=b"


@pytest.mark.parametrize("template, name", [
    ("{local}@EXAMPLE.LAN", "a+b=c@EXAMPLE.LAN"),     # an AD user principal name: no DN to escape
    ("EXAMPLE\\{local}", "EXAMPLE\\a+b=c"),           # a down-level logon name
    ("{user}", "a+b=c@example.com"),
])
def test_active_directory_names_are_not_dn_escaped(template, name):
    assert user_dn(template, Mailbox("a+b=c", "example.com")) == name


@pytest.mark.parametrize("local, value", [
    ("alice", "alice@example.com"),
    ("*", "\\2a@example.com"),
    ("a*)(uid=*", "a\\2a\\29\\28uid=\\2a@example.com"),
    ("a\\b", "a\\5cb@example.com"),
    ("a\x00", "a\\00@example.com"),
])
def test_filter_values_are_escaped(local, value):
    template = "(&(objectClass=inetOrgPerson)(mail={user}))"
    assert user_filter(template, Mailbox(local, "example.com")) == \
        f"(&(objectClass=inetOrgPerson)(mail={value}))"


# -- outcomes, against ldap3's mock directory --------------------------------------------------

@pytest.fixture
def mock_directory(monkeypatch):
    """An ldap3 MOCK_SYNC server with alice, albert and two entries sharing a mail address."""
    server = Server("mock-directory")
    loader = Connection(server, client_strategy=MOCK_SYNC)
    entries = {
        SERVICE_DN: {"cn": "relay", "userPassword": "service pass"},
        f"uid=alice,{PEOPLE}": {"uid": "alice", "mail": "alice@example.com", "userPassword": "alice pw"},
        f"uid=albert,{PEOPLE}": {"uid": "albert", "mail": "albert@example.com", "userPassword": "al pw"},
        f"uid=s1,{PEOPLE}": {"uid": "s1", "mail": "shared@example.com", "userPassword": "s1 pw"},
        f"uid=s2,{PEOPLE}": {"uid": "s2", "mail": "shared@example.com", "userPassword": "s2 pw"},
    }
    for dn, attributes in entries.items():
        loader.strategy.add_entry(dn, {"objectClass": "inetOrgPerson", **attributes})
    monkeypatch.setattr(ldap, "STRATEGY", MOCK_SYNC)
    monkeypatch.setattr(ldap, "make_server", lambda settings: server)
    return server


@pytest.fixture
def search(tmp_path) -> LDAP:
    secret = tmp_path / "service.secret"
    secret.write_text("service pass\n")
    return LDAP(url="ldap://directory.invalid", search_base=PEOPLE, search_filter="(mail={user})",
                service_dn=SERVICE_DN, service_password_file=secret, timeout=1)


@pytest.mark.parametrize("local, password, outcome", [
    ("alice", "alice pw", Outcome.ACCEPTED),
    ("alice", "wrong", Outcome.REFUSED),
    ("nobody", "alice pw", Outcome.REFUSED),
    ("alic*", "alice pw", Outcome.REFUSED),
    ("alice,ou=people", "alice pw", Outcome.REFUSED),
])
def test_bind_dn_outcomes(mock_directory, local, password, outcome):
    assert ldap_bind(BIND, Mailbox(local, "example.com"), password).outcome is outcome


@pytest.mark.parametrize("local, password, outcome, detail", [
    ("alice", "alice pw", Outcome.ACCEPTED, ""),
    ("alice", "wrong", Outcome.REFUSED, "invalidCredentials (49)"),
    ("nobody", "alice pw", Outcome.REFUSED, "no entry matches search_filter"),
    ("shared", "s1 pw", Outcome.REFUSED, "search_filter matches more than one entry"),
    ("al*", "alice pw", Outcome.REFUSED, "no entry matches search_filter"),
    ("*", "alice pw", Outcome.REFUSED, "no entry matches search_filter"),
])
def test_search_outcomes(mock_directory, search, local, password, outcome, detail):
    gone = detail == "no entry matches search_filter"      # the account is not there at all
    assert ldap_bind(search, Mailbox(local, "example.com"), password) == Answer(outcome, detail, gone)


def test_unescaped_filter_would_let_a_wildcard_in(mock_directory, search, monkeypatch):
    """The check above means something: without escaping, `alic*` binds as alice."""
    monkeypatch.setattr(ldap, "escape_filter_chars", lambda text: text)
    assert ldap_bind(search, Mailbox("alic*", "example.com"), "alice pw").outcome is Outcome.ACCEPTED


def test_service_account_refused_is_a_fault_not_a_refusal(mock_directory, search):
    search.service_password_file.write_text("not the service password\n")
    answer = ldap_bind(search, ALICE, "alice pw")
    assert answer.outcome is Outcome.UNREACHABLE and "service_dn bind refused" in answer.detail


def test_unreadable_service_password_file_is_unreachable(mock_directory, search):
    settings = replace(search, service_password_file=Path("/nonexistent/service.secret"))
    answer = ldap_bind(settings, ALICE, "alice pw")
    assert answer.outcome is Outcome.UNREACHABLE and "FileNotFoundError" in answer.detail


@pytest.mark.parametrize("settings", ["bind", "search"])
def test_empty_password_is_refused_without_a_connection(monkeypatch, search, settings):
    def no_connection(*args, **kwargs):
        raise AssertionError("an empty password must not reach the directory")
    monkeypatch.setattr(ldap, "Connection", no_connection)
    monkeypatch.setattr(ldap, "make_server", no_connection)
    answer = ldap_bind(BIND if settings == "bind" else search, ALICE, "")
    assert answer == Answer(Outcome.REFUSED, "empty password")


@pytest.mark.parametrize("code, outcome", [
    (49, Outcome.REFUSED), (32, Outcome.REFUSED), (34, Outcome.REFUSED), (48, Outcome.REFUSED),
    (50, Outcome.REFUSED), (53, Outcome.REFUSED), (19, Outcome.REFUSED),
    (1, Outcome.UNREACHABLE), (13, Outcome.UNREACHABLE), (51, Outcome.UNREACHABLE),
    (52, Outcome.UNREACHABLE), (80, Outcome.UNREACHABLE), (None, Outcome.UNREACHABLE),
])
def test_bind_result_codes(code, outcome):
    assert bind_failure({"result": code, "description": "x"}).outcome is outcome
    assert bind_failure(None).outcome is Outcome.UNREACHABLE


@pytest.mark.parametrize("failing, error", [
    ("open", LDAPSocketOpenError("socket connection error while opening: [Errno 111] refused")),
    ("open", OSError("network is unreachable")),
    ("start_tls", LDAPStartTLSError("wrap socket error: certificate verify failed")),
    ("bind", LDAPSocketReceiveError("Connection(user='uid=alice', password='alice pw') lost")),
])
def test_exceptions_become_unreachable_and_never_show_the_password(
        mock_directory, monkeypatch, failing, error):
    def fail(self, *args, **kwargs):
        raise error
    # Connection.open is the strategy's, bound in Connection.__init__
    monkeypatch.setattr(MockSyncStrategy if failing == "open" else Connection, failing, fail)
    answer = ldap_bind(replace(BIND, starttls=failing == "start_tls"), ALICE, "alice pw")
    assert answer.outcome is Outcome.UNREACHABLE
    assert type(error).__name__ in answer.detail and "alice pw" not in answer.detail


def test_tls_settings_reach_the_server_object(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("not parsed until a handshake")
    server = ldap.make_server(replace(BIND, url="ldaps://dc1.example.com:636", ca_file=ca))
    assert server.ssl and server.port == 636 and server.tls.ca_certs_file == str(ca)
    assert server.tls.validate == 2                                     # ssl.CERT_REQUIRED
    server = ldap.make_server(replace(BIND, starttls=True, verify_cert=False))
    assert not server.ssl and server.tls.validate == 0                  # ssl.CERT_NONE
    assert ldap.make_server(BIND).tls is None


# -- authenticate, with a scripted directory ----------------------------------------------------

@pytest.fixture
def directory(tmp_path, monkeypatch) -> Directory:
    cheap = bcrypt.gensalt(4)
    monkeypatch.setattr(bcrypt, "gensalt", lambda rounds=12: cheap)    # hashes stored here only
    (tmp_path / "config.yaml").write_text(textwrap.dedent("""\
        listen: {inbound: "127.0.0.1:2525"}
        storage: {maildirs: maildirs, spool: spool}
        users_file: users.passwd
        domains:
          example.com:
            primary: "127.0.0.1:2526"
            ldap: {url: "ldap://directory.invalid", bind_dn: "uid={local},ou=people,dc=example,dc=com"}
          plain.org: {primary: "127.0.0.1:2526"}
        """))
    directory = Directory(load(tmp_path / "config.yaml"))
    directory.add("alice@example.com")
    directory.add("bob@example.com")
    directory.add("dave@example.com", password="dave pw")
    directory.set_active("dave@example.com", False)
    directory.add("paul@plain.org", password="paul pw")
    return directory


@pytest.fixture
def answers(monkeypatch):
    """Script the directory: set `answers.outcome`; `answers.calls` lists (address, password)."""
    class Script:
        outcome = Outcome.ACCEPTED
        calls: list[tuple[str, str]] = []

    def fake_bind(settings, address, password):
        Script.calls.append((str(address), password))
        return Answer(Script.outcome, "scripted")
    Script.calls = []
    monkeypatch.setattr(auth, "ldap_bind", fake_bind)
    monkeypatch.setattr(auth, "_ldap_answers", {})
    return Script


def login(directory, user, password):
    return asyncio.run(authenticate(directory, user, password))


def test_accepted_stores_a_hash_once(directory, answers):
    found = login(directory, "Alice@Example.com", "directory pw").user
    assert found is not None and found.email == "alice@example.com"
    stored = directory.get(ALICE).password_hash
    assert verify_password(stored, "directory pw")
    before = directory.file.stat().st_mtime_ns, directory.file.stat().st_ino
    assert login(directory, "alice@example.com", "directory pw").user is not None
    assert (directory.file.stat().st_mtime_ns, directory.file.stat().st_ino) == before
    assert directory.get(ALICE).password_hash == stored


def test_refused_is_final_even_when_the_cache_matches(directory, answers):
    directory.set_password("alice@example.com", "old pw")
    answers.outcome = Outcome.REFUSED
    assert login(directory, "alice@example.com", "a typo") == auth.LoginResult()
    assert verify_password(directory.get(ALICE).password_hash, "old pw")   # a typo proves nothing
    assert login(directory, "alice@example.com", "old pw") == auth.LoginResult()
    assert directory.get(ALICE).password_hash == ""   # stale: gone at once (security review 9.6)


def test_unreachable_falls_back_to_the_cache(directory, answers):
    directory.set_password("alice@example.com", "cached pw")
    answers.outcome = Outcome.UNREACHABLE
    assert login(directory, "alice@example.com", "cached pw").user is not None
    assert login(directory, "alice@example.com", "wrong") == auth.LoginResult()


def test_unreachable_without_a_cache_says_so(directory, answers):
    answers.outcome = Outcome.UNREACHABLE
    assert login(directory, "bob@example.com", "any") == auth.LoginResult(problem=NOT_SYNCED)
    assert asyncio.run(check_password(directory, "bob@example.com", "any")) is None


@pytest.mark.parametrize("who, password", [
    ("alice@example.com", ""),
    ("alice@example.com", "a\nb"),
    ("not an address", "pw"),
])
def test_no_bind_for_a_malformed_login_or_password(directory, answers, who, password):
    assert login(directory, who, password) == auth.LoginResult()
    assert answers.calls == []


@pytest.mark.parametrize("who, password", [
    ("carol@example.com", "pw"),        # in the directory maybe, but not registered here
    ("dave@example.com", "dave pw"),    # deactivated
])
def test_unregistered_or_deactivated_ask_about_nobody(directory, answers, who, password):
    """The same round trips as a registered user's check (review 9.8), but never as the user
    named nor with the password typed."""
    assert login(directory, who, password) == auth.LoginResult()
    ((asked, sent),) = answers.calls
    assert asked.startswith("nobody-") and asked.endswith("@example.com") and sent != password


def test_domains_without_ldap_use_the_passwd_file(directory, answers):
    assert login(directory, "paul@plain.org", "paul pw").user is not None
    assert login(directory, "paul@plain.org", "wrong").user is None
    assert answers.calls == []


def test_deactivated_while_syncing_is_refused(directory, answers, monkeypatch):
    real = directory.set_password

    def deactivate_first(email, password):
        directory.set_active(email, False)
        return real(email, password)
    monkeypatch.setattr(directory, "set_password", deactivate_first)
    assert login(directory, "alice@example.com", "pw").user is None


def test_a_failed_sync_is_logged_and_the_login_succeeds(directory, answers, monkeypatch, caplog):
    def full(email, password):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(directory, "set_password", full)
    with caplog.at_level(logging.INFO, logger="relay.auth"):
        assert login(directory, "alice@example.com", "pw").user is not None
    assert "auth.password_sync_failed user=alice@example.com error=OSError" in caplog.text


def test_directory_state_is_logged_when_it_changes(directory, answers, caplog):
    directory.set_password("alice@example.com", "pw")
    script = [Outcome.ACCEPTED, Outcome.REFUSED, Outcome.UNREACHABLE, Outcome.UNREACHABLE,
              Outcome.UNREACHABLE, Outcome.ACCEPTED, Outcome.ACCEPTED]
    with caplog.at_level(logging.INFO, logger="relay.auth"):
        for outcome in script:
            answers.outcome = outcome
            login(directory, "alice@example.com", "pw")
    events = [r.getMessage().split()[0] for r in caplog.records]
    assert events == ["auth.ldap_ok", "auth.ldap_refused", "auth.password_forgotten",
                      "auth.ldap_unreachable", "auth.ldap_ok", "auth.password_synced"]
    assert "pw" not in [word.split("=", 1)[-1] for r in caplog.records for word in r.getMessage().split()]


@pytest.mark.parametrize("result, gone", [
    ({"result": 49, "message": "80090308: LdapErr: DSID-0C09044E, data 52e, v4563"}, False),
    ({"result": 49, "message": "80090308: LdapErr: DSID-0C09044E, data 533, v4563"}, True),
    ({"result": 49, "message": "80090308: LdapErr: DSID-0C09044E, data 775, v4563"}, True),
    ({"result": 49, "message": ""}, False),
    ({"result": 32}, True),
    ({"result": 53}, True),
    # OpenLDAP ppolicy: a plain 49, and why in the response control (as slapd 2.5 sends it)
    ({"result": 49, "controls": {PPOLICY: {"value": b"0\x03\x81\x01\x01"}}}, True),   # locked
    ({"result": 49, "controls": {PPOLICY: {"value": b"0\x03\x81\x01\x00"}}}, True),   # expired
    ({"result": 49, "controls": {PPOLICY: {"value": b"0\x00"}}}, False),   # no error: a typo
    ({"result": 49, "controls": {PPOLICY: {"value": b"0\x08\xa0\x03\x81\x01\x02\x81\x01\x01"}}},
     True),                                                          # a warning first, then locked
    ({"result": 49, "controls": {PPOLICY: {"value": b"0\x83\x81\x01\x01"}}}, False),  # junk
    ({"result": 49, "controls": {PPOLICY: {"value": b"0\x05\x81\x09\x01"}}}, False),  # short
])
def test_a_refusal_says_whether_the_account_is_gone(result, gone):
    from relay.ldap import bind_failure

    answer = bind_failure({"description": "x", **result})
    assert answer.outcome is Outcome.REFUSED and answer.gone is gone


@pytest.mark.parametrize("login_as, outcome, cached", [
    ("nobody@example.com", Outcome.REFUSED, None),          # not registered: a bind as nobody
    ("dave@example.com", Outcome.REFUSED, None),            # deactivated: likewise
    ("alice@example.com", Outcome.REFUSED, "other pw"),      # the directory says no (a typo)
    ("alice@example.com", Outcome.REFUSED, "pw"),            # ... to what the cache takes
    ("alice@example.com", Outcome.REFUSED, ""),              # ... with nothing cached
    ("alice@example.com", Outcome.UNREACHABLE, ""),          # not synced yet
    ("alice@example.com", Outcome.UNREACHABLE, "other pw"),  # the cache says no
])
def test_every_refusal_costs_one_hash_check(directory, answers, monkeypatch, login_as, outcome, cached):
    """Security review 9.8: refusals of registered users in LDAP domains took 3-6 ms, of unknown
    ones about 276 ms (the dummy hash): the time told who is registered. Counted, not timed."""
    if cached:
        directory.set_password("alice@example.com", cached)
    checks = []
    real = auth.verify_password
    monkeypatch.setattr(auth, "verify_password", lambda h, p: checks.append(1) or real(h, p))
    answers.outcome = outcome
    result = login(directory, login_as, "pw")
    assert result.user is None and len(checks) == 1 and len(answers.calls) == 1
