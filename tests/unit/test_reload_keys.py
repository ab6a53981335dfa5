"""Issue 12.2: what a SIGHUP reload says changed, and which of it applies live."""

from __future__ import annotations

import textwrap

from relay.app import is_live
from relay.config import changed_keys, load

BASE = """\
    listen: {inbound: "127.0.0.1:2525"}
    storage: {maildirs: maildirs, spool: spool}
    domains:
      example.com: {primary: "127.0.0.1:2526"}
"""


def loaded(tmp_path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    return load(path)


def test_changed_keys_name_each_difference_and_only_those(tmp_path):
    old = loaded(tmp_path, BASE)
    assert changed_keys(old, loaded(tmp_path, BASE)) == []
    new = loaded(tmp_path, BASE.replace("2526", "2527").replace("2525", "2524") + """\
      example.org: {primary: "127.0.0.1:2526"}
    limits: {connections: 10}
    log_level: DEBUG
""")
    assert sorted(changed_keys(old, new)) == ["domains.example.com.primary.address", "domains.example.org",
                                              "limits.connections", "listen.inbound", "log_level"]


def test_live_keys_are_a_domains_settings_the_limits_and_the_log_level():
    assert all(map(is_live, ["domains.example.com.primary.address", "domains.a.b.continuity",
                             "domains.example.com.ldap", "limits.connections", "log_level"]))
    assert not any(map(is_live, ["domains.example.org", "listen.inbound", "storage.spool", "tls",
                                 "log.format", "replay.probe_interval", "hostname"]))
