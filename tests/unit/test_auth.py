"""Password checks against the passwd-file, and the failed-login throttle (with a fake clock)."""

from __future__ import annotations

import asyncio
import textwrap
import threading

import argon2
import bcrypt
import pytest

from relay import auth
from relay.addresses import parse_mailbox
from relay.auth import LoginThrottle, account_key, check_password
from relay.config import load
from relay.directory import Directory, User, verify_password

# Cheap hashes (cost 4, small argon2): verify_password reads the cost from the hash itself.
FAST_BCRYPT = "{BLF-CRYPT}" + bcrypt.hashpw(b"bcrypt pass", bcrypt.gensalt(4)).decode()
FAST_ARGON2 = "{ARGON2ID}" + argon2.PasswordHasher(time_cost=1, memory_cost=64,
                                                   parallelism=1).hash("argon2 pass")


def make_directory(tmp_path, users: list[User], scheme: str = "BLF-CRYPT") -> Directory:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(f"""\
        listen: {{inbound: "127.0.0.1:2525"}}
        storage: {{maildirs: maildirs, spool: spool}}
        users_file: users.passwd
        password_scheme: {scheme}
        domains:
          example.com: {{primary: "127.0.0.1:2526"}}
        """))
    directory = Directory(load(path))
    directory.file.write_text("".join(u.line() + "\n" for u in users))
    return directory


def user(email: str, password_hash: str = "", active: bool = True) -> User:
    return User(parse_mailbox(email), "", password_hash, active)


@pytest.fixture
def directory(tmp_path):
    return make_directory(tmp_path, [
        user("alice@example.com", FAST_BCRYPT),
        user("carol@example.com", FAST_ARGON2),
        user("bob@example.com"),                                    # no password
        user("dave@example.com", FAST_BCRYPT, active=False),        # deactivated
    ])


@pytest.fixture
def checks(monkeypatch):
    """Every hash verification check_password does: (stored hash, thread name)."""
    seen: list[tuple[str, str]] = []

    def recording(stored: str, password: str) -> bool:
        seen.append((stored, threading.current_thread().name))
        if stored in auth._DUMMY_HASHES.values():
            return False    # the real cost-12 check is shown once, in test_dummy_hashes...
        return verify_password(stored, password)

    monkeypatch.setattr(auth, "verify_password", recording)
    return seen


def check(directory, login, password):
    return asyncio.run(check_password(directory, login, password))


@pytest.mark.parametrize("login, password", [
    ("alice@example.com", "bcrypt pass"),
    ("  Alice@EXAMPLE.com ", "bcrypt pass"),
    ("carol@example.com", "argon2 pass"),
])
def test_right_password_gives_the_user(directory, checks, login, password):
    found = check(directory, login, password)
    assert found is not None and found.email == account_key(login)
    (_, thread), = checks
    assert thread != threading.main_thread().name  # verified off the event loop's thread


@pytest.mark.parametrize("login, password", [
    ("alice@example.com", "wrong"),
    ("alice@example.com", "bcrypt pass\x00"),
    ("alice@example.com", ""),
    ("carol@example.com", "bcrypt pass"),
    ("dave@example.com", "bcrypt pass"),      # deactivated, even with the right password
])
def test_wrong_password_or_deactivated_gives_none(directory, checks, login, password):
    assert check(directory, login, password) is None
    assert len(checks) == 1


@pytest.mark.parametrize("login", ["nobody@example.com", "bob@example.com", "not an address"])
def test_unknown_login_or_no_password_costs_one_dummy_check(directory, checks, login):
    assert check(directory, login, "anything") is None
    ((stored, _),) = checks
    assert stored.startswith("{BLF-CRYPT}$2b$12$")  # the configured scheme, at the real cost


def test_dummy_follows_the_configured_scheme(tmp_path, checks):
    directory = make_directory(tmp_path, [], scheme="ARGON2ID")
    assert check(directory, "nobody@example.com", "x") is None
    ((stored, _),) = checks
    assert stored.startswith("{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=4$")


def test_dummy_hashes_are_well_formed():
    for stored in auth._DUMMY_HASHES.values():
        assert verify_password(stored, "guess") is False


def test_unreadable_hash_raises_so_callers_answer_temporarily(tmp_path):
    directory = make_directory(tmp_path, [user("alice@example.com", "{BLF-CRYPT}$2b$12$garbage")])
    with pytest.raises(ValueError):
        check(directory, "alice@example.com", "x")


# -- LoginThrottle -------------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


def test_account_locked_after_its_limit_for_every_address(clock):
    throttle = LoginThrottle(window=60, account_limit=3, address_limit=100, clock=clock)
    for n in range(3):
        assert not throttle.blocked(f"10.0.0.{n}", "alice@example.com")
        throttle.failed(f"10.0.0.{n}", "alice@example.com")
    assert throttle.blocked("10.0.0.99", "Alice@Example.COM")      # same account, any address
    assert not throttle.blocked("10.0.0.0", "bob@example.com")     # other accounts unaffected


def test_address_locked_after_its_limit_for_every_account(clock):
    throttle = LoginThrottle(window=60, account_limit=100, address_limit=4, clock=clock)
    for n in range(4):
        assert not throttle.blocked("10.0.0.1", f"user{n}@example.com")
        throttle.failed("10.0.0.1", f"user{n}@example.com")
    assert throttle.blocked("10.0.0.1", "someone.else@example.com")
    assert not throttle.blocked("10.0.0.2", "user0@example.com")


def test_window_slides(clock):
    throttle = LoginThrottle(window=60, account_limit=2, address_limit=100, clock=clock)
    throttle.failed("a", "alice@example.com")
    clock.now += 30
    throttle.failed("a", "alice@example.com")
    assert throttle.blocked("a", "alice@example.com")
    clock.now += 30            # the first failure leaves the window: one more try allowed
    assert not throttle.blocked("a", "alice@example.com")
    throttle.failed("a", "alice@example.com")
    assert throttle.blocked("a", "alice@example.com")
    clock.now += 61
    assert not throttle.blocked("a", "alice@example.com")
    assert throttle.delay("a", "alice@example.com") == 0


def test_success_clears_the_account_but_not_the_address(clock):
    throttle = LoginThrottle(window=60, account_limit=2, address_limit=3, clock=clock)
    throttle.failed("a", "alice@example.com")
    throttle.failed("a", "alice@example.com")
    throttle.succeeded("a", "alice@example.com")
    assert not throttle.blocked("b", "alice@example.com")
    throttle.failed("a", "bob@example.com")
    assert throttle.blocked("a", "carol@example.com")   # three failures from address a


def test_delay_grows_and_is_capped(clock):
    throttle = LoginThrottle(window=600, account_limit=100, address_limit=100, base_delay=1,
                             max_delay=10, clock=clock)
    delays = []
    for _ in range(8):
        throttle.failed("a", "alice@example.com")
        delays.append(throttle.delay("a", "alice@example.com"))
    assert delays == [0, 1, 2, 4, 8, 10, 10, 10]
    # the larger of the two counts decides: a fresh account from a busy address waits too
    assert throttle.delay("a", "new@example.com") == 10
    assert throttle.delay("b", "new@example.com") == 0


def test_huge_counts_do_not_overflow(clock):
    throttle = LoginThrottle(account_limit=5000, address_limit=5000, max_delay=10, clock=clock)
    for _ in range(2000):
        throttle.failed("a", "x")
    assert throttle.delay("a", "x") == 10


def test_expired_entries_are_pruned(clock):
    throttle = LoginThrottle(window=60, clock=clock)
    for n in range(50):
        throttle.failed(f"10.0.0.{n}", f"user{n}@example.com")
    assert throttle.tracked == 100
    clock.now += 61
    throttle.failed("10.0.1.1", "last@example.com")   # any new failure sweeps the stale ones
    assert throttle.tracked == 2


def test_memory_bounded_by_max_keys(clock):
    throttle = LoginThrottle(window=3600, max_keys=10, clock=clock)
    for n in range(1000):
        clock.now += 1
        throttle.failed(f"10.0.{n // 256}.{n % 256}", f"user{n}@example.com")
    assert throttle.tracked == 20
    assert throttle.delay("10.0.3.231", "user999@example.com") == 0  # the newest kept, 1 failure
    assert throttle._count(throttle._accounts, "user0@example.com", clock.now) == 0


def test_timestamps_per_key_are_bounded(clock):
    throttle = LoginThrottle(account_limit=3, address_limit=5, clock=clock)
    for _ in range(100):
        throttle.failed("a", "alice@example.com")
    assert len(throttle._accounts["alice@example.com from a"]) == 3
    assert len(throttle._addresses["a"]) == 5


def test_junk_logins_are_counted_under_a_bounded_key():
    assert account_key(" Alice@Example.COM ") == "alice@example.com"
    assert account_key("NOT AN ADDRESS") == "not an address"
    assert len(account_key("x" * 10_000)) == auth.MAX_KEY


def test_the_account_lock_holds_for_the_network_the_failures_came_from(clock):
    """Security review 9.4: the lock is no lever against the user. Failures from one network
    (IPv4 /24, IPv6 /64) lock the account there only."""
    throttle = LoginThrottle(account_limit=3, address_limit=50, clock=clock)
    for peer in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
        throttle.failed(peer, "alice@example.com")
    assert throttle.blocked("192.0.2.200", "alice@example.com")
    assert not throttle.blocked("198.51.100.1", "alice@example.com")
    for n in range(3):
        throttle.failed(f"2001:db8:1:2::{n}", "bob@example.com")
    assert throttle.blocked("2001:db8:1:2:ffff::1", "bob@example.com")
    assert not throttle.blocked("2001:db8:1:3::1", "bob@example.com")
    assert not throttle.blocked("::ffff:198.51.100.1", "alice@example.com")
    assert throttle.blocked("::ffff:192.0.2.9", "alice@example.com")
