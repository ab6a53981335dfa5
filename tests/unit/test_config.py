"""Configuration: validated settings, and one line per problem naming the file and dotted key."""

from __future__ import annotations

import dataclasses
import datetime as dt
import textwrap
from pathlib import Path

import pytest
import yaml

from relay.cli import main
from relay.config import add_months, load, parse_duration, parse_size
from relay.errors import ConfigErrors

GOOD = """\
hostname: relay.example.net
listen: {inbound: "127.0.0.1:2525"}
storage: {maildirs: data/maildirs, spool: /var/spool/relay}
users_file: users.passwd
message_size_limit: 20MiB
replay: {probe_interval: 15m}
domains:
  Example.COM:
    primary: {address: "[::1]:25", starttls: required, timeout: 90s}
    continuity: {since: 2026-01-01, until: 2027-01-01}
  example.org:
    primary: mail.example.org:2525
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relay.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_good_config(tmp_path):
    config = load(write(tmp_path, GOOD))
    assert config.storage.maildirs == tmp_path / "data" / "maildirs"
    assert config.storage.spool == Path("/var/spool/relay")
    assert config.users_file == tmp_path / "users.passwd"
    assert config.message_size_limit == 20 * 1024 * 1024
    assert config.replay.probe_interval == 900
    com = config.domains["example.com"]
    assert (com.primary.address.host, com.primary.address.port) == ("::1", 25)
    assert com.primary.starttls == "required" and com.primary.timeout == 90
    assert com.continuity_active(dt.date(2026, 6, 1)) and not com.continuity_active(dt.date(2027, 1, 2))
    org = config.domains["example.org"]
    assert org.continuity is None and not org.continuity_active()


def test_every_problem_named_by_file_and_dotted_key(tmp_path):
    path = write(tmp_path, """\
        listen: {inbound: "nowhere"}
        storage: {maildirs: m, spool: s, colour: blue}
        message_size_limit: lots
        replay: {probe_interval: soon}
        domains:
          example.com:
            primary: {address: "h:25", starttls: maybe}
            continuity: {since: 2026-03-01, until: 2026-12-31}
          "bad domain":
            primary: "h:25"
        surprise: 1
        """)
    with pytest.raises(ConfigErrors) as info:
        load(path)
    lines = str(info.value).splitlines()
    keys = [line.split(": ")[1] for line in lines]
    assert all(line.startswith(f"{path}: ") for line in lines)
    assert sorted(keys) == sorted([
        "listen.inbound", "storage.colour", "message_size_limit", "replay.probe_interval",
        "domains.example.com.primary.starttls", "domains.example.com.continuity.until",
        "domains.bad domain", "surprise"])


def test_subscription_shorter_than_12_months_is_an_error(tmp_path):
    path = write(tmp_path, GOOD.replace("until: 2027-01-01", "until: 2026-12-31"))
    with pytest.raises(ConfigErrors, match=r"domains\.Example\.COM\.continuity\.until: .*12 months"):
        load(path)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigErrors, match="No such file"):
        load(tmp_path / "absent.yaml")
    with pytest.raises(ConfigErrors, match="line 2: not valid YAML"):
        load(write(tmp_path, "listen: [\n"))


def test_check_command_exit_codes(tmp_path, capsys):
    assert main(["check", "-c", str(write(tmp_path, GOOD))]) == 0
    bad = write(tmp_path, GOOD.replace("20MiB", "twenty"))
    assert main(["check", "-c", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"{bad}: message_size_limit: expected a size like 50MiB, got 'twenty'"]


def test_shipped_config_is_valid():
    config = load(Path(__file__).parents[2] / "config.yaml")
    assert config.listen.inbound.host == "127.0.0.1"
    assert config.domains["example.com"].continuity is not None


@pytest.mark.parametrize("text,seconds", [("30s", 30), ("15m", 900), ("2h", 7200), ("90d", 7776000),
                                          (45, 45)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text,size", [("50MiB", 50 << 20), ("512KiB", 512 << 10), (1000, 1000),
                                       ("1GB", 10**9)])
def test_sizes(text, size):
    assert parse_size(text) == size


def test_add_months_clamps_to_month_end():
    assert add_months(dt.date(2028, 2, 29), 12) == dt.date(2029, 2, 28)
    assert add_months(dt.date(2026, 1, 31), 13) == dt.date(2027, 2, 28)


def test_serve_refuses_a_bad_config(tmp_path, capsys):
    bad = write(tmp_path, GOOD.replace("storage: {", "storage: {quota: 1, "))
    assert main(["serve", "-c", str(bad)]) == 2
    assert capsys.readouterr().err.strip() == f"{bad}: storage.quota: unknown setting"


def test_serve_on_a_busy_port_says_so_in_one_line(tmp_path, capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = write(tmp_path, GOOD.replace("127.0.0.1:2525", f"127.0.0.1:{port}")
                     .replace("/var/spool/relay", "spool"))
        assert main(["serve", "-c", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"continuity-relay: listen.inbound 127.0.0.1:{port}: Address already in use"


def test_ldap_and_web_settings(tmp_path):
    text = GOOD.replace("    primary: mail.example.org:2525\n", """    primary: mail.example.org:2525
    ldap: {url: "ldaps://dc1.example.org:636", bind_dn: "{local}@EXAMPLE", timeout: 3s}
""") + "web: {session_lifetime: 1h}\n"
    text = text.replace('listen: {inbound: "127.0.0.1:2525"}',
                        'listen: {inbound: "127.0.0.1:2525", web: "127.0.0.1:8080"}')
    config = load(write(tmp_path, text))
    ldap = config.domains["example.org"].ldap
    assert ldap.url == "ldaps://dc1.example.org:636" and ldap.bind_dn == "{local}@EXAMPLE"
    assert ldap.timeout == 3 and config.domains["example.com"].ldap is None
    assert config.listen.web.port == 8080 and config.web.session_lifetime == 3600
    assert config.web.secret_file == tmp_path / "web.secret"
    assert config.admins_file == tmp_path / "admins.passwd"
    bad = (text.replace('bind_dn: "{local}@EXAMPLE", ', "")
           .replace("web: {session_lifetime: 1h}", "web: {tls: true}"))
    with pytest.raises(ConfigErrors) as info:
        load(write(tmp_path, bad))
    keys = sorted(line.split(": ")[1] for line in str(info.value).splitlines())
    assert keys == ["domains.example.org.ldap.bind_dn", "web.tls"]


def test_rspamd_settings(tmp_path):
    assert load(write(tmp_path, GOOD)).rspamd.url is None  # unset: no checks
    config = load(write(tmp_path, GOOD + "rspamd: {url: 'http://127.0.0.1:11333/', timeout: 5s, "
                                          "on_failure: defer}\n"))
    assert config.rspamd.url == "http://127.0.0.1:11333"
    assert config.rspamd.timeout == 5 and config.rspamd.on_failure == "defer"
    assert load(write(tmp_path, GOOD + "rspamd: {url: 'http://[::1]:11333'}\n")).rspamd.on_failure == "keep"
    bad = GOOD + "rspamd: {url: 'ftp://x', timeout: 0s, on_failure: drop, password: q1}\n"
    with pytest.raises(ConfigErrors) as info:
        load(write(tmp_path, bad))
    keys = sorted(line.split(": ")[1] for line in str(info.value).splitlines())
    assert keys == ["rspamd.on_failure", "rspamd.password", "rspamd.timeout", "rspamd.url"]


def test_smarthost_with_credentials_defaults_to_starttls_required(tmp_path, capsys):
    """Security review: with a username and the old default (opportunistic), AUTH PLAIN went to
    a smarthost that offered no STARTTLS."""
    from relay.cli import main
    from relay.config import load

    (tmp_path / "pw").write_text("secret\n")
    base = ("listen: {inbound: 127.0.0.1:2525}\nstorage: {maildirs: m, spool: s}\n"
            "domains: {example.com: {primary: 127.0.0.1:2526}}\n")
    with_user = base + ("outbound: {smarthost: {address: smtp.example.net:587, username: u, "
                        "password_file: pw}}\n")
    (tmp_path / "a.yaml").write_text(with_user)
    assert load(tmp_path / "a.yaml").outbound.smarthost.starttls == "required"
    (tmp_path / "b.yaml").write_text(base + "outbound: {smarthost: smtp.example.net:25}\n")
    assert load(tmp_path / "b.yaml").outbound.smarthost.starttls == "opportunistic"
    (tmp_path / "c.yaml").write_text(with_user.replace("password_file: pw",
                                                       "password_file: pw, starttls: opportunistic"))
    assert main(["check", "-c", str(tmp_path / "c.yaml")]) == 0
    assert "outbound.smarthost.starttls: opportunistic with a username" in capsys.readouterr().out


MINIMAL = {"listen": {"inbound": "127.0.0.1:2525"}, "storage": {"maildirs": "m", "spool": "s"},
           "domains": {"example.com": {"primary": {"address": "127.0.0.1:2526"}}}}
# The optional sections whose dataclasses have required fields, with only those fields given.
SECTIONS = {**MINIMAL, "outbound": {"smarthost": {"address": "smtp.example.net:25"}},
            "domains": {**MINIMAL["domains"],
                        "example.org": {"primary": {"address": "127.0.0.1:2527"},
                                        "ldap": {"url": "ldap://dc1.example.org",
                                                 "bind_dn": "{local}@EXAMPLE"}}}}


def unset_settings(obj, data: dict, key: str = ""):
    """(dotted key, loaded value, dataclass default) for every setting of `obj` not in `data`."""
    for f in dataclasses.fields(obj):
        value, given, where = getattr(obj, f.name), data.get(f.name), f"{key}{f.name}"
        if f.name == "domains":
            for name, domain in value.items():
                yield from unset_settings(domain, given[name], f"domains.{name}.")
        elif dataclasses.is_dataclass(value) and (given is None or isinstance(given, dict)):
            yield from unset_settings(value, given or {}, f"{where}.")
        elif f.name not in data and f.default is not dataclasses.MISSING:
            yield where, value, f.default


@pytest.mark.parametrize("settings", [MINIMAL, SECTIONS], ids=["minimal", "sections"])
def test_an_unset_setting_takes_the_dataclass_default(tmp_path, settings):
    """Issue 10: the defaults were written twice, in the dataclasses and in the reader, and
    disagreed (web.secret_file, admins_file, audit_log: None in one, a file in the other)."""
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(settings))
    config = load(path)

    def expected(default):  # a relative default path is relative to the configuration's folder
        if isinstance(default, Path) and not default.is_absolute():
            return (config.file.parent / default).resolve()
        return default

    rows = list(unset_settings(config, settings))
    keys = {key for key, _, _ in rows}
    assert {"web.secret_file", "web.session_lifetime", "admins_file", "audit_log", "users_file",
            "outbound.retry_delay", "limits.idle_timeout", "rspamd.on_failure",
            "max_recipients", "replay.concurrency", "domains.example.com.primary.timeout"} <= keys
    if settings is SECTIONS:
        assert {"outbound.smarthost.connect_timeout", "domains.example.org.ldap.search_filter"} <= keys
    assert [(key, value, default) for key, value, default in rows if value != expected(default)] == []


def test_path_settings(tmp_path):
    """Relative to the configuration's folder, absolute as written, null: none."""
    base = yaml.safe_dump(MINIMAL)
    config = load(write(tmp_path, base + "web: {secret_file: null, revoked_file: /var/lib/r}\n"
                                         "admins_file: etc/admins\n"))
    assert config.web.secret_file is None
    assert config.web.revoked_file == Path("/var/lib/r")
    assert config.admins_file == tmp_path / "etc" / "admins"
    assert config.audit_log == tmp_path / "audit.log"
    path = write(tmp_path, base + "web: {secret_file: 5}\naudit_log: ''\n")
    with pytest.raises(ConfigErrors) as info:
        load(path)
    assert sorted(str(info.value).splitlines()) == [f"{path}: audit_log: expected a path",
                                                    f"{path}: web.secret_file: expected a path"]


def test_the_audit_log_cannot_be_turned_off_and_idle_timeout_is_at_least_a_second(tmp_path):
    """`audit_log: null` used to load as None, and the web server then wrote audit.log anyway
    (its own third copy of the default); a 0s idle_timeout passed because a second
    `_positive_duration` replaced the one that said "at least 1s"."""
    path = write(tmp_path, yaml.safe_dump(MINIMAL) + "audit_log: null\nlimits: {idle_timeout: 0s}\n")
    with pytest.raises(ConfigErrors) as info:
        load(path)
    assert sorted(str(info.value).splitlines()) == [
        f"{path}: audit_log: expected a path",
        f"{path}: limits.idle_timeout: expected a duration of at least 1s, got '0s'"]
