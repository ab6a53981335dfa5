"""Connection accounting (relay/smtp/limits.py) and the `limits:` config section."""

from __future__ import annotations

import logging
import textwrap

import pytest

from relay.config import Limits, load
from relay.errors import ConfigErrors
from relay.smtp.limits import (
    ACCEPT_BURST,
    DESCRIPTOR_RESERVE,
    DESCRIPTORS_PER_SESSION,
    ConnectionLimits,
    Refusal,
    client_key,
    listener_limits,
    log_limits,
    session_budget,
)


def test_ipv4_counts_per_address_not_per_port():
    limits = ConnectionLimits("inbound", total=10, per_client=2)
    assert limits.try_acquire(("192.0.2.1", 1000)) is None
    assert limits.try_acquire(("192.0.2.1", 1001)) is None
    assert limits.try_acquire(("192.0.2.1", 1002)) is Refusal.CLIENT
    assert limits.try_acquire(("192.0.2.2", 1000)) is None   # a neighbour is another client
    assert limits.open == 3 and limits.count(("192.0.2.1", 9)) == 2


def test_ipv6_counts_per_64_prefix():
    limits = ConnectionLimits("inbound", total=10, per_client=2)
    assert limits.try_acquire(("2001:db8:1:2::1", 25, 0, 0)) is None
    assert limits.try_acquire(("2001:db8:1:2:ffff:ffff:ffff:ffff", 25, 0, 0)) is None
    assert limits.try_acquire(("2001:db8:1:2:abcd::9", 25, 0, 0)) is Refusal.CLIENT
    assert limits.try_acquire(("2001:db8:1:3::1", 25, 0, 0)) is None   # the next /64
    assert client_key(("2001:db8:1:2:abcd::9", 25, 0, 0)) == "2001:db8:1:2::/64"


def test_ipv4_mapped_ipv6_is_the_ipv4_address():
    assert client_key(("::ffff:192.0.2.7", 25, 0, 0)) == "192.0.2.7"
    limits = ConnectionLimits("inbound", total=10, per_client=1)
    assert limits.try_acquire(("192.0.2.7", 1)) is None
    assert limits.try_acquire(("::ffff:192.0.2.7", 2, 0, 0)) is Refusal.CLIENT


def test_odd_peers_count_as_one_unknown_client():
    assert client_key(None) == client_key("/run/sock") == client_key(("not an ip", 1)) == "unknown"
    assert client_key(("fe80::1%eth0", 25, 0, 2)) == "fe80::/64"


def test_total_refuses_every_client_until_a_release():
    limits = ConnectionLimits("inbound", total=2, per_client=2)
    assert limits.try_acquire(("192.0.2.1", 1)) is None
    assert limits.try_acquire(("192.0.2.2", 1)) is None
    assert limits.try_acquire(("192.0.2.3", 1)) is Refusal.TOTAL
    limits.release(("192.0.2.1", 1))
    assert limits.open == 1
    assert limits.try_acquire(("192.0.2.3", 1)) is None


def test_release_frees_the_clients_slot():
    limits = ConnectionLimits("inbound", total=10, per_client=1)
    assert limits.try_acquire(("2001:db8::1", 1, 0, 0)) is None
    assert limits.try_acquire(("2001:db8::2", 1, 0, 0)) is Refusal.CLIENT
    limits.release(("2001:db8::1", 1, 0, 0))
    assert limits.count(("2001:db8::1", 1, 0, 0)) == 0 and limits.open == 0
    assert limits.try_acquire(("2001:db8::2", 1, 0, 0)) is None


def test_release_without_a_session_is_a_bug_not_a_negative_count():
    limits = ConnectionLimits("inbound", total=10, per_client=1)
    with pytest.raises(ValueError):
        limits.release(("192.0.2.1", 1))
    assert limits.open == 0


def test_full_and_available_are_logged_once_per_episode(caplog):
    caplog.set_level(logging.INFO, logger="relay.limits")
    limits = ConnectionLimits("inbound", total=1, per_client=1)
    limits.try_acquire(("192.0.2.1", 1))
    for port in range(5):
        assert limits.try_acquire(("192.0.2.2", port)) is Refusal.TOTAL
    limits.release(("192.0.2.1", 1))
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["limits.full listener=inbound open=1",
                     "limits.available listener=inbound refused=5"]


def test_budget_leaves_the_reserve_and_splits_between_listeners():
    assert session_budget(None, 2) is None
    one = session_budget(1024, 1)
    assert one == (1024 - DESCRIPTOR_RESERVE - ACCEPT_BURST) // DESCRIPTORS_PER_SESSION
    assert one * DESCRIPTORS_PER_SESSION + DESCRIPTOR_RESERVE + ACCEPT_BURST <= 1024
    two = session_budget(1024, 2)
    assert 2 * two * DESCRIPTORS_PER_SESSION + DESCRIPTOR_RESERVE + 2 * ACCEPT_BURST <= 1024
    assert session_budget(10, 1) == 1


def test_listener_limits_lowered_by_the_descriptor_limit_and_logged(caplog):
    caplog.set_level(logging.INFO, logger="relay.limits")
    settings = Limits(connections=1000, connections_per_client=50, idle_timeout=30, max_errors=7)
    made = listener_limits(settings, ["inbound", "submission"], nofile=1024)
    assert made["inbound"].total == made["submission"].total == session_budget(1024, 2) < 1000
    assert (made["inbound"].per_client, made["inbound"].idle_timeout,
            made["inbound"].max_errors) == (50, 30, 7)
    assert made["inbound"] is not made["submission"]
    log_limits(made, settings, nofile=1024)
    warning = caplog.records[0]
    assert warning.levelno == logging.WARNING
    assert warning.getMessage().startswith(
        f"limits.connections listener=inbound limit={session_budget(1024, 2)} configured=1000 "
        f"nofile=1024")
    roomy = listener_limits(settings, ["inbound"], nofile=65536)
    assert roomy["inbound"].total == 1000


def write(tmp_path, limits: str):
    path = tmp_path / "relay.yaml"
    path.write_text(textwrap.dedent("""\
        listen: {inbound: "127.0.0.1:2525"}
        storage: {maildirs: m, spool: s}
        domains:
          example.com: {primary: "127.0.0.1:25"}
        """) + limits)
    return path


def test_config_defaults(tmp_path):
    limits = load(write(tmp_path, "")).limits
    assert limits == Limits(connections=400, connections_per_client=50, idle_timeout=60,
                            max_errors=20)


def test_config_values(tmp_path):
    limits = load(write(tmp_path, "limits: {connections: 900, connections_per_client: 10, "
                                  "idle_timeout: 2m, max_errors: 5}\n")).limits
    assert limits == Limits(connections=900, connections_per_client=10, idle_timeout=120,
                            max_errors=5)


def test_config_problems_name_the_key(tmp_path):
    with pytest.raises(ConfigErrors) as caught:
        load(write(tmp_path, "limits: {connections: 0, idle_timeout: 0s, max_errors: many, "
                             "per_ip: 3}\n"))
    text = str(caught.value)
    for key in ("limits.connections", "limits.idle_timeout", "limits.max_errors",
                "limits.per_ip: unknown setting"):
        assert key in text, text


def test_accept_out_of_descriptors_is_one_log_line_and_the_rest_goes_on(caplog):
    import asyncio
    import errno
    import socket

    from relay.smtp.limits import log_accept_errors

    caplog.set_level(logging.INFO)
    loop = asyncio.new_event_loop()
    seen = []
    loop.set_exception_handler(lambda loop, context: seen.append(context["message"]))
    log_accept_errors(loop)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        loop.call_exception_handler({"message": "socket.accept() out of system resource",
                                     "exception": OSError(errno.EMFILE, "Too many open files"),
                                     "socket": sock})
    loop.call_exception_handler({"message": "something else", "exception": OSError(1, "x")})
    loop.close()
    assert [r.getMessage() for r in caplog.records if r.name == "relay.limits"] == [
        f"limits.accept_failed socket=127.0.0.1:{port} error=EMFILE retry_in=1s"]
    assert seen == ["something else"]
