"""The readiness checks that need no server (issue 12, point 5): passwords, deactivated users,
LDAP sync dates, the subscription, and free disk in days of mail at the archive's rate."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import textwrap

import pytest

from relay.addresses import parse_mailbox
from relay.config import Continuity, load
from relay.delivery import readiness
from relay.directory import Directory
from relay.storage import synced


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent("""\
        listen: {inbound: 127.0.0.1:2525}
        storage: {maildirs: maildirs, spool: spool, archive: archive}
        domains:
          example.com:
            primary: 127.0.0.1:2526
            continuity: {since: 2026-01-01, until: 2027-01-31}
          ldap.example:
            primary: 127.0.0.1:2526
            ldap: {url: "ldap://127.0.0.1:1", bind_dn: "uid={local},dc=x"}
        readiness: {ldap_sync_days: 10, subscription_days: 30, disk_days: 7}
        """))
    return load(path)


def test_users_without_a_password_and_deactivated_ones_fail(config):
    directory = Directory(config)
    directory.add("alice@example.com", password="secret")
    directory.add("bob@example.com")
    directory.add("carol@example.com", password="secret")
    directory.set_active("carol@example.com", False)
    users = directory.list("example.com")
    domain = config.domains["example.com"]
    check = readiness.passwords(domain, users)
    assert (check.result, check.detail) == ("fail", "1 of 3 users without a password (they cannot "
                                                    "log in): bob@example.com")
    assert readiness.inactive(domain, users).result == "fail"
    assert "carol@example.com" in readiness.inactive(domain, users).detail
    assert readiness.passwords(domain, users[:1]).result == "ok"
    assert readiness.inactive(domain, users[:2]).result == "ok"


def test_ldap_users_never_synced_or_long_ago_fail(config):
    directory = Directory(config)
    for user in ("new@ldap.example", "old@ldap.example", "fresh@ldap.example"):
        directory.add(user, password="from-the-directory")
    now = 2e9
    spool = config.storage.spool
    synced.mark(spool, parse_mailbox("old@ldap.example"), now=now - 11 * 86400)
    synced.mark(spool, parse_mailbox("fresh@ldap.example"), now=now - 86400)
    check = readiness.ldap_sync(config, config.domains["ldap.example"], directory.list("ldap.example"), now)
    assert check.result == "fail"
    assert check.detail == ("1 never synced: new@ldap.example; 1 not synced in 10 days: old@ldap.example")
    synced.mark(spool, parse_mailbox("old@ldap.example"), now=now - 100)      # a login today
    synced.mark(spool, parse_mailbox("new@ldap.example"), now=now - 100)
    assert readiness.ldap_sync(config, config.domains["ldap.example"], directory.list("ldap.example"),
                               now).result == "ok"


def test_mark_writes_at_most_once_an_hour(config):
    spool, user = config.storage.spool, parse_mailbox("a@ldap.example")
    assert synced.last(spool, user) is None
    synced.mark(spool, user, now=1000.0)
    synced.mark(spool, user, now=1000.0 + 60)
    assert synced.last(spool, user) == 1000.0
    synced.mark(spool, user, now=1000.0 + 3601)
    assert synced.last(spool, user) == 4601.0


def test_subscription(config):
    domain = config.domains["example.com"]
    check = readiness.subscription
    assert check(config, domain, dt.date(2026, 6, 1)).result == "ok"
    assert check(config, domain, dt.date(2027, 1, 10)).detail == "ends 2027-01-31, in 21 days"
    assert check(config, domain, dt.date(2027, 2, 1)).result == "fail"
    assert check(config, config.domains["ldap.example"]).detail == "none: mail is never kept"
    assert check(config, dataclasses.replace(domain, continuity=Continuity(dt.date(2030, 1, 1),
                                                                       dt.date(2031, 1, 1)))).result == "fail"


def test_disk_rate_comes_from_the_archive_days(config, monkeypatch):
    days = config.storage.archive / "days"
    days.mkdir(parents=True)
    today = dt.date.today()
    for back in range(10):        # 10 days of 7 MiB each; only the last 7 count
        day = (today - dt.timedelta(days=back)).isoformat()
        lines = [json.dumps({"id": f"x.{n}", "size": 1024**2}) for n in range(7)]
        (days / f"{day}.jsonl").write_text("\n".join(lines) + "\n")
    rate, source = readiness.daily_rate(config)
    assert rate == pytest.approx(7 * 1024**2 * 7 / 7, rel=0.2) and "archive" in source
    monkeypatch.setattr(readiness, "_free", lambda path: 20 * 1024**2)      # 20 MiB left
    check = readiness.disk(config)
    assert check.result == "fail" and "3 days at 7.0 MiB a day" in check.detail
    monkeypatch.setattr(readiness, "_free", lambda path: 1024**3)
    assert readiness.disk(config).result == "ok"
