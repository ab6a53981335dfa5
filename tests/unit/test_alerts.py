"""Alerts without sockets (issue 12, point 3): what an event queues (admin mail, webhook body,
user notices to alternates), the alternate address in the passwd-file, the CLI and the CSV
column, the configuration, the disk-days estimate and the subscription reminders. The same
events over real SMTP and HTTP are in tests/smtp/test_alerts.py."""

from __future__ import annotations

import dataclasses
import datetime as dt
import email
import email.policy
import json
import os
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from relay.cli import main
from relay.config import load
from relay.delivery.alerts import (
    DISK_LOW,
    OUTAGE_END,
    OUTAGE_START,
    SUBSCRIPTION_ENDING,
    Alert,
    Alerter,
    webhook_queue,
    webmail_url,
)
from relay.delivery.health import Health, State
from relay.directory import Directory, parse_line
from relay.errors import ConfigErrors, DirectoryError
from relay.storage.continuity import ContinuityStore
from relay.storage.disk import MIN_SPAN, DiskWatch, Reading, free_bytes, rate_per_day
from relay.storage.maildir import MaildirStore
from relay.storage.queue import Envelope

CONFIG = """\
hostname: relay.test
listen: {{inbound: "127.0.0.1:2525", web: "0.0.0.0:8443"}}
web: {{tls: false}}
storage: {{maildirs: maildirs, spool: {spool}}}
users_file: users.passwd
outbound: {{smarthost: "127.0.0.1:2599"}}
alerts:
  to: [ops@admins.example.net, Boss@Admins.Example.NET]
  webhook: https://hooks.example.net/T0KEN/relay
domains:
  example.com:
    primary: 127.0.0.1:2526
    continuity: {{since: 2026-01-01, until: {until}}}
  example.org:
    primary: 127.0.0.1:2527
    continuity: {{since: 2026-01-01, until: 2030-01-01}}
    notify_users: false
"""
HASH = "{BLF-CRYPT}$2b$04$abcdefghijklmnopqrstuu5Tg5R9x3QhU6fZV7p1r9w9gGd3kT0m6"


def make_config(tmp_path, until: str = "2030-01-01", spool: str = "spool"):
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG.format(until=until, spool=spool))
    return load(path)


def add_user(config, email: str, alternate: str = "", password_hash: str = HASH) -> None:
    """A user with a (made-up, never checked here) hash: notices go only to users who can log in."""
    lines = config.users_file.read_text() if config.users_file.exists() else ""
    config.users_file.write_text(lines + f"{email}:{password_hash}::::::\n")
    if alternate:
        Directory(config).set_alternate(email, alternate)


def alerter_for(config, disk=None):
    store = ContinuityStore(MaildirStore(config.storage.maildirs), config.storage.spool)
    health = Health(config.storage.spool)
    alerter = Alerter(config, store, Directory(config), health.get,
                      {name: health.get(name) for name in config.domains}, disk)
    return alerter, store, health


def queued(store) -> list[tuple[Envelope, bytes]]:
    return [store.outbound.read(entry) for entry in store.outbound.list()]


def test_outage_start_mails_the_admins_posts_the_webhook_and_tells_users_at_their_alternate(tmp_path):
    config = make_config(tmp_path)
    add_user(config, "alice@example.com", "alice@home.example.net")
    add_user(config, "bob@example.com")                                  # no alternate: nothing
    add_user(config, "carol@example.com", "carol@home.example.net", password_hash="")   # cannot log in
    alerter, store, _health = alerter_for(config)
    alerter.health_changed("example.com", State("outage", 1_800_000_000.0, "451 4.3.0 try later"))
    mails = queued(store)
    admins = [(e, d) for e, d in mails if "user" not in e.extra]
    users = [(e, d) for e, d in mails if "user" in e.extra]
    assert sorted(e.rcpt for e, _ in admins) == ["boss@admins.example.net", "ops@admins.example.net"]
    envelope, data = admins[0]
    assert envelope.mail_from == "" and envelope.extra["alert"] == OUTAGE_START
    assert b"Subject: [continuity-relay] example.com: primary down" in data
    assert b"reason: 451 4.3.0 try later" in data and b"Auto-Submitted: auto-generated" in data
    ((envelope, data),) = users
    assert envelope.rcpt == "alice@home.example.net" and envelope.extra["user"] == "alice@example.com"
    assert b"http://relay.test:8443/mail" in data and b"usual password" in data
    assert b"451" not in data.split(b"\r\n\r\n", 1)[1]    # the primary's words stay with the admins
    ((entry,),) = [webhook_queue(config.storage.spool).list()]
    body = json.loads(webhook_queue(config.storage.spool).read(entry)[1])
    assert body["event"] == OUTAGE_START and body["domain"] == "example.com"
    assert "T0KEN" not in json.dumps(body)


def test_outage_end_tells_admins_and_users_and_a_second_outage_event_is_not_news(tmp_path):
    config = make_config(tmp_path)
    add_user(config, "alice@example.com", "alice@home.example.net")
    alerter, store, _health = alerter_for(config)
    alerter.health_changed("example.com", State("outage", 1000.0, "451"))
    alerter.health_changed("example.com", State("outage", 1001.0, "451 again"))   # still the same
    assert len(queued(store)) == 3
    alerter.health_changed("example.com", State("replaying", 4600.0))
    alerter.health_changed("example.com", State("normal", 4700.0))               # replay's business
    ends = [(e, d) for e, d in queued(store) if e.extra["alert"] == OUTAGE_END]
    assert len(ends) == 2            # the admins at once; the users once it stayed up (below)
    alerter.tell_users_ends(time.time() + config.alerts.users_end_delay - 5)
    assert len([e for e, _ in queued(store) if e.extra["alert"] == OUTAGE_END]) == 2
    alerter.tell_users_ends(time.time() + config.alerts.users_end_delay + 1)
    ends = [(e, d) for e, d in queued(store) if e.extra["alert"] == OUTAGE_END]
    assert len(ends) == 3
    (notice,) = [d for e, d in ends if e.rcpt == "alice@home.example.net"]
    assert b"back to normal" in notice
    (admin,) = [d for e, d in ends if e.rcpt == "ops@admins.example.net"]
    assert b"back after 1h00m" in admin


def test_a_flapping_primary_tells_the_users_one_start_and_one_end(tmp_path):
    """Down, up, down again within `alerts.users_end_delay`: to the users it is one outage
    (the admins hear every change); the end notice survives a restart, as a mark."""
    config = make_config(tmp_path)
    add_user(config, "alice@example.com", "alice@home.example.net")
    alerter, store, _health = alerter_for(config)
    for since in (1000.0, 1300.0, 1600.0):
        alerter.health_changed("example.com", State("outage", since, "451"))
        alerter.health_changed("example.com", State("replaying", since + 60))
        alerter.tell_users_ends(time.time())                 # none due yet: it came back just now
    alerter, _, _ = alerter_for(config)                     # a restart: the wait is remembered
    alerter.tell_users_ends(time.time() + config.alerts.users_end_delay + 1)
    alerter.tell_users_ends(time.time() + config.alerts.users_end_delay + 2)    # told once only
    told = [e.extra["alert"] for e, _ in queued(store) if e.rcpt == "alice@home.example.net"]
    admins = [e.extra["alert"] for e, _ in queued(store) if e.rcpt == "ops@admins.example.net"]
    assert told == [OUTAGE_START, OUTAGE_END]
    assert admins == [OUTAGE_START, OUTAGE_END] * 3


def test_notify_users_false_switches_the_user_notices_off_for_that_domain_only(tmp_path):
    config = make_config(tmp_path)
    add_user(config, "dave@example.org", "dave@home.example.net")
    alerter, store, _health = alerter_for(config)
    alerter.health_changed("example.org", State("outage", 1000.0, "451"))
    assert sorted(e.rcpt for e, _ in queued(store)) == ["boss@admins.example.net", "ops@admins.example.net"]


def test_an_alternate_in_a_domain_of_ours_that_is_down_too_is_skipped_with_a_log_line(tmp_path, caplog):
    config = make_config(tmp_path)
    add_user(config, "alice@example.com", "alice@example.org")
    add_user(config, "erin@example.com", "erin@home.example.net")
    alerter, store, health = alerter_for(config)
    health.primary_failed("example.org", "451 down too")
    alerter.health_changed("example.com", State("outage", 1000.0, "451"))
    users = [e.rcpt for e, _ in queued(store) if "user" in e.extra]
    assert users == ["erin@home.example.net"]
    assert "alerts.alternate_skipped user=alice@example.com alternate_domain=example.org" in caplog.text
    health.flush()


def test_no_user_notice_while_the_subscription_is_not_active(tmp_path):
    config = make_config(tmp_path, until="2027-01-01")
    add_user(config, "alice@example.com", "alice@home.example.net")
    alerter, store, _health = alerter_for(config)
    alerter.config = dataclasses.replace(config, domains={
        **config.domains, "example.com": dataclasses.replace(config.domains["example.com"], continuity=None)})
    alerter.health_changed("example.com", State("outage", 1000.0, "451"))
    assert all("user" not in e.extra for e, _ in queued(store))


def test_entry_trouble_is_batched_and_our_own_alerts_failing_are_not_alerted(tmp_path):
    config = make_config(tmp_path)
    alerter, store, _health = alerter_for(config)
    mail = Envelope(mail_from="x@example.net", rcpt="alice@example.com", received_at=0.0)
    alerter.entry_trouble("replay", "example.com", "id1", "failed", mail, "550 5.1.1 no")
    alerter.entry_trouble("replay", "example.com", "id2", "hold", None, "unreadable")
    ours = Envelope(mail_from="", rcpt="ops@x.net", received_at=0.0, extra={"alert": "x"})
    alerter.entry_trouble("outbound", "", "id3", "failed", ours, "550")
    alerter.flush_troubles(now=10_000.0)
    ((envelope, data), (_, _)) = queued(store)
    assert envelope.extra["alert"] == "entries_failed"
    assert b"example.com: 1 refused for good, 1 set aside in the replay queue" in data
    assert b"ids: id1, id2" in data
    alerter.entry_trouble("replay", "example.com", "id4", "failed", mail, "550")
    alerter.flush_troubles(now=10_010.0)            # within the batch window: waits
    assert len(queued(store)) == 2 and alerter.has_trouble()
    alerter.flush_troubles(now=20_000.0)
    assert len(queued(store)) == 4 and not alerter.has_trouble()


def test_subscription_reminders_at_30_7_and_1_days_once_each_across_restarts(tmp_path):
    config = make_config(tmp_path, until="2027-03-31")
    alerter, store, _health = alerter_for(config)
    end = dt.date(2027, 3, 31)
    alerter.check_subscriptions(end - dt.timedelta(days=31))
    assert queued(store) == []
    alerter.check_subscriptions(end - dt.timedelta(days=30))
    alerter.check_subscriptions(end - dt.timedelta(days=29))
    first = queued(store)
    assert len(first) == 2 and all(e.extra["alert"] == SUBSCRIPTION_ENDING for e, _ in first)
    assert b"example.com: continuity subscription ends 2027-03-31, in 30 day(s)" in first[0][1]
    again, store, _ = alerter_for(config)            # a restart remembers what went out
    again.check_subscriptions(end - dt.timedelta(days=20))
    assert len(queued(store)) == 2
    again.check_subscriptions(end - dt.timedelta(days=7))
    again.check_subscriptions(end)
    assert len(queued(store)) == 6


def test_rate_and_days_of_mail_left():
    assert rate_per_day([(0.0, 1000)]) is None
    assert rate_per_day([(0.0, 1000), (MIN_SPAN - 1, 500)]) is None       # too short to tell
    assert rate_per_day([(0.0, 1000), (3600.0, 2000)]) is None             # a purge: no rate
    assert rate_per_day([(0.0, 10_000), (1800.0, 9_000), (3600.0, 8_000)]) == 48_000
    assert Reading(("spool",), 96_000, 48_000).days == 2.0
    assert Reading(("spool",), 96_000, None).days is None


def test_disk_watch_measures_each_file_system_once_and_keeps_a_day():
    now = [0.0]
    free = {"/a": (1, 10_000), "/b": (1, 10_000), "/c": (2, 5_000)}
    watch = DiskWatch([Path(p) for p in free], lambda p: free[str(p)], lambda: now[0])
    first = watch.sample()
    assert sorted(r.roots for r in first) == [("/a", "/b"), ("/c",)]
    now[0], free["/a"] = 3600.0, (1, 9_000)
    free["/b"] = (1, 9_000)
    (ab,) = [r for r in watch.sample() if r.roots == ("/a", "/b")]
    assert ab.per_day == 24_000 and ab.days == 9_000 / 24_000
    now[0] = 3600.0 + 86400.0 + 1                   # the first samples fell out of the window
    (ab,) = [r for r in watch.sample() if r.roots == ("/a", "/b")]
    assert ab.per_day is None


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (the tests run as root), so a megabyte is a real share of the disk."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_disk_low_alert_from_the_real_free_space_and_the_observed_rate(tmp_path, small_disk):
    config = make_config(tmp_path, spool=str(small_disk / "spool"))
    now = [1_000_000.0]
    watch = DiskWatch([config.storage.spool], free_bytes, lambda: now[0])
    (small_disk / "spool").mkdir()
    alerter, store, _health = alerter_for(config, watch)
    alerter.check_disk()                                     # the first sample: no rate yet
    assert store.outbound.list() == []
    (small_disk / "mail").write_bytes(os.urandom(1024 * 1024))   # a megabyte an hour: days < 7
    now[0] += 3600.0
    alerter.check_disk()
    ((envelope, data), _) = queued(store)
    assert envelope.extra["alert"] == DISK_LOW
    text = email.message_from_bytes(data, policy=email.policy.default).get_content()
    assert f"days of mail left under {config.storage.spool}" in text and "days: 0.1" in text
    alerter.check_disk()                                      # once a day, not every measurement
    assert len(queued(store)) == 2


def test_webhook_body_has_event_and_domain_and_stays_small():
    body = json.loads(Alert(DISK_LOW, None, "disk", {"ids": ["x" * 500] * 50, "note": "a\r\nb"}).json("h"))
    assert body["event"] == DISK_LOW and body["domain"] is None
    assert len(body["ids"]) == 10 and all(len(i) <= 200 for i in body["ids"]) and body["note"] == "a  b"
    huge = Alert(OUTAGE_START, "example.com", "s", {f"k{i}": "v" * 200 for i in range(100)})
    data = huge.json("h")
    assert len(data) <= 8192 and json.loads(data)["domain"] == "example.com"


def test_webmail_url_prefers_web_url(tmp_path):
    config = make_config(tmp_path)
    assert webmail_url(config) == "http://relay.test:8443/mail"
    path = tmp_path / "config.yaml"
    path.write_text(path.read_text().replace("web: {tls: false}", "web: {url: 'https://mail.example.com/'}"))
    assert webmail_url(load(path)) == "https://mail.example.com/mail"


# -- the alternate address: passwd-file, CLI, CSV, configuration ----------------------------------

def test_alternate_lives_in_the_unused_shell_field_and_is_checked(tmp_path):
    config = make_config(tmp_path)
    directory = Directory(config)
    directory.add("alice@example.com", "Alice")
    user = directory.set_alternate("alice@example.com", "Alice@Home.Example.NET")
    assert user.alternate == "alice@home.example.net"
    (line,) = config.users_file.read_text().splitlines()
    assert line == "alice@example.com::::Alice::alice@home.example.net:"
    assert parse_line(line).alternate == "alice@home.example.net"
    directory.set_active("alice@example.com", False)        # other changes keep it
    assert directory.get(user.address).alternate == "alice@home.example.net"
    for bad in ("alice@example.com", "bob@example.com", "x:y@home.example.net", "a b@home.example.net"):
        with pytest.raises(DirectoryError):
            directory.set_alternate("alice@example.com", bad)
    assert directory.set_alternate("alice@example.com", "").alternate == ""


def test_cli_users_set_alternate(tmp_path, capsys):
    config = make_config(tmp_path)
    Directory(config).add("alice@example.com")
    args = ["users", "set", "alice@example.com", "-c", str(config.file)]
    assert main([*args, "--alternate", "alice@home.example.net"]) == 0
    assert "alice@example.com: alternate alice@home.example.net" in capsys.readouterr().out
    assert Directory(config).list()[0].alternate == "alice@home.example.net"
    assert main([*args, "--alternate", "alice@example.com"]) == 1
    assert "must be outside example.com" in capsys.readouterr().err
    assert main(args) == 2
    assert main([*args, "--alternate", ""]) == 0 and Directory(config).list()[0].alternate == ""


def test_csv_import_takes_an_alternate_column(tmp_path):
    config = make_config(tmp_path)
    csv = tmp_path / "users.csv"
    csv.write_text("email,name,alternate\nalice@example.com,Alice,alice@home.example.net\n"
                   "bob@example.com,Bob,\ncarol@example.com,Carol,carol@example.com\n")
    added, problems = Directory(config).import_csv(csv)
    assert {u.email: u.alternate for u in added} == {"alice@example.com": "alice@home.example.net",
                                                     "bob@example.com": ""}
    assert len(problems) == 1 and problems[0].startswith(f"{csv}:4:")


def test_alerts_configuration(tmp_path):
    config = make_config(tmp_path)
    assert config.alerts.to == ("ops@admins.example.net", "boss@admins.example.net")
    assert config.alerts.disk_days == 7.0 and config.domains["example.org"].notify_users is False
    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent("""\
        listen: {inbound: "127.0.0.1:2525"}
        storage: {maildirs: m, spool: s}
        alerts: {to: [not-an-address], webhook: "ftp://x", colour: red, disk_days: null}
        domains:
          example.com: {primary: "127.0.0.1:2526", notify_users: maybe}
        """))
    with pytest.raises(ConfigErrors) as caught:
        load(path)
    text = str(caught.value)
    for key in ("alerts.to:", "alerts.webhook:", "alerts.colour: unknown setting",
                "domains.example.com.notify_users:"):
        assert key in text
    path.write_text(path.read_text().replace("alerts: {to: [not-an-address], webhook: \"ftp://x\", "
                                             "colour: red, disk_days: null}",
                                             "alerts: {to: ops@example.net, disk_days: null}")
                    .replace(", notify_users: maybe", ""))
    with pytest.raises(ConfigErrors, match="alerts.to: alert mail goes through outbound.smarthost"):
        load(path)
