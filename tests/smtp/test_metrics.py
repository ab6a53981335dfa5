"""Prometheus metrics on listen.metrics (issue 12, point 1): the whole relay in-process, scraped
over HTTP while mail comes in during an outage and after it, as Prometheus would."""

from __future__ import annotations

import asyncio
import http.client
import re
import socket

import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families

from relay import __version__
from relay.addresses import parse_mailbox
from relay.config import HostPort, load
from relay.directory import Directory, User
from relay.errors import RelayError
from relay.web.metrics import StatusGauges, start_metrics
from tests.helpers import free_port, wait_for
from tests.loopwatch import no_blocking_calls_on_loops, watch_thread
from tests.smtp.fakes import FakePrimary, InProcessRelay, Script, send, write_config
from tests.smtp.helpers import PASSWORDS, auth_plain, cheap_hash, outbound_config, sender_of, tls_client
from tests.web.helpers import Client

pytestmark = pytest.mark.timeout(90)

SENT = b"From: Alice <alice@example.com>\r\nTo: bob@example.org\r\nSubject: out\r\n\r\nbody\r\n"
MESSAGE = b"From: s@sender.test\r\nTo: alice@example.com\r\nSubject: hi\r\n\r\nbody\r\n"
DOMAIN = "example.com"
Samples = dict[tuple[str, frozenset], float]


def fetch(port: int, accept: str | None = None) -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/metrics", headers={"Accept": accept} if accept else {})
        response = conn.getresponse()
        return response.status, response.headers["Content-Type"], response.read().decode()
    finally:
        conn.close()


def scrape(port: int) -> Samples:
    """Every sample, keyed by name and labels, parsed by prometheus-client's own parser."""
    status, content_type, body = fetch(port)
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_counts_and_gauges_follow_an_outage_and_the_replay(tmp_path):
    fake = FakePrimary(Script(mail="451 4.3.0 down")).start()
    path = write_config(tmp_path, fake.port, extra="replay: {probe_interval: 1s}\n")
    Directory(load(path)).add("alice@example.com")
    relay = InProcessRelay.from_file(path).start()
    port = relay.metrics_port
    try:
        with no_blocking_calls_on_loops() as blocking:
            watch_thread(relay.thread)          # a scrape reads directories: never on the loop
            before = scrape(port)
            assert value(before, "relay_build_info", version=__version__) == 1
            assert value(before, "relay_domain_state", domain=DOMAIN, state="normal") == 1
            assert value(before, "relay_domain_state", domain=DOMAIN, state="outage") == 0
            for _ in range(2):
                assert send(relay.port, "s@sender.test", ["alice@example.com"], MESSAGE)[1][0] == 250
            outage = wait_for(lambda: (s := scrape(port)) and value(
                s, "relay_domain_state", domain=DOMAIN, state="outage") == 1 and s,
                what="the state gauge to show the outage")
            assert value(outage, "relay_domain_state", domain=DOMAIN, state="normal") == 0
            assert value(outage, "relay_inbound_messages_total", result="kept") == \
                value(before, "relay_inbound_messages_total", result="kept") + 2
            queued = sum(value(outage, "relay_queue_messages", queue="replay", domain=DOMAIN, state=s)
                         for s in ("waiting", "active"))
            assert queued == 2
            assert value(outage, "relay_queue_messages", queue="outbound", domain="", state="waiting") == 0
            # The probe runs every second in an outage; its time lands in the histogram.
            probed = wait_for(lambda: (s := scrape(port)) and value(
                s, "relay_primary_probe_seconds_count") > value(before, "relay_primary_probe_seconds_count")
                and s, what="a probe of the primary")
            assert value(probed, "relay_primary_probe_seconds_bucket", le="+Inf") == \
                value(probed, "relay_primary_probe_seconds_count")
            assert value(probed, "relay_queue_oldest_age_seconds", queue="replay", domain=DOMAIN) > 0
            assert value(probed, "relay_domain_outage_seconds_total", domain=DOMAIN) > 0

            fake.script.mail = "250 2.1.0 Ok"           # the primary is back: replay drains
            after = wait_for(lambda: (s := scrape(port)) and value(
                s, "relay_domain_state", domain=DOMAIN, state="normal") == 1 and s,
                what="the state gauge back to normal")
            assert len(fake.received) == 2
            assert value(after, "relay_replay_messages_total", domain=DOMAIN, result="sent") == \
                value(before, "relay_replay_messages_total", domain=DOMAIN, result="sent") + 2
            assert value(after, "relay_queue_messages", queue="replay", domain=DOMAIN, state="waiting") == 0
            assert value(after, "relay_queue_oldest_age_seconds", queue="replay", domain=DOMAIN) == 0
            ended = value(after, "relay_domain_outage_seconds_total", domain=DOMAIN)
            assert ended >= value(probed, "relay_domain_outage_seconds_total", domain=DOMAIN)

            assert send(relay.port, "s@sender.test", ["alice@example.com"], MESSAGE)[1][0] == 250
            last = scrape(port)
            assert value(last, "relay_inbound_messages_total", result="passed") == \
                value(before, "relay_inbound_messages_total", result="passed") + 1
            assert value(last, "relay_domain_outage_seconds_total", domain=DOMAIN) == ended  # over
            relay.stop()
            assert blocking == [], f"blocking calls on the relay's loop: {blocking}"
    finally:
        relay.stop()
        fake.stop()


def test_outbound_outcomes_are_counted(make_relay, primary, smarthost):
    relay = make_relay(primary.port, extra=outbound_config(smarthost.port))
    port = relay.metrics_port
    alice = parse_mailbox("alice@example.com")
    before = scrape(port)
    sender_of(relay).submit(alice, "alice@example.com", ["bob@example.org"], SENT)
    wait_for(lambda: value(scrape(port), "relay_outbound_messages_total", result="sent")
             == value(before, "relay_outbound_messages_total", result="sent") + 1, what="one sent")
    assert len(smarthost.received) == 1
    smarthost.script.rcpt = "550 5.1.1 no such user"
    sender_of(relay).submit(alice, "alice@example.com", ["nobody@example.org"], SENT)
    wait_for(lambda: value(scrape(port), "relay_outbound_messages_total", result="failed")
             == value(before, "relay_outbound_messages_total", result="failed") + 1, what="one failed")


def test_open_sessions_are_a_gauge_per_listener(make_relay, primary):
    relay = make_relay(primary.port)
    port = relay.metrics_port
    idle = value(scrape(port), "relay_smtp_connections", listener="inbound")
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as conn:
        assert conn.recv(1024).startswith(b"220")
        assert value(scrape(port), "relay_smtp_connections", listener="inbound") == idle + 1
    wait_for(lambda: value(scrape(port), "relay_smtp_connections", listener="inbound") == idle,
             what="the session to be counted out")


def test_failed_logins_count_per_service(tmp_path, client_tls, ca: trustme.CA):
    pem = tmp_path / "server.pem"
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(str(pem))
    path = write_config(tmp_path, free_port(), extra=f"tls: {{cert: {pem}, key: {pem}}}\n")
    path.write_text(re.sub(r"listen: \{inbound: ([0-9.:]+)\}",
                           rf"listen: {{inbound: \1, web: 127.0.0.1:{free_port()}}}", path.read_text()))
    users = [User(parse_mailbox(e), "", cheap_hash(e)) for e in PASSWORDS]
    (tmp_path / "users.passwd").write_text("".join(u.line() + "\n" for u in users))
    relay = InProcessRelay.from_file(path).start()
    try:
        before = scrape(relay.metrics_port)
        with tls_client(relay.port, client_tls) as smtp:          # AUTH on port 25, after STARTTLS
            assert auth_plain(smtp, "alice@example.com", "not her password")[0] == 535
        assert relay.running is not None and relay.running.web is not None
        browser = Client(relay.running.web.addresses[0][1])
        browser.get("/login")
        assert browser.post("/login", {"email": "alice@example.com", "password": "wrong"}).status == 401
        after = scrape(relay.metrics_port)
        for service in ("smtp", "web"):
            assert value(after, "relay_auth_failures_total", service=service) == \
                value(before, "relay_auth_failures_total", service=service) + 1, service
    finally:
        relay.stop()


def test_openmetrics_when_the_scraper_asks(make_relay):
    relay = make_relay()
    status, content_type, body = fetch(relay.metrics_port, "application/openmetrics-text; version=1.0.0")
    assert status == 200 and content_type.startswith("application/openmetrics-text")
    assert body.endswith("# EOF\n") and "relay_inbound_messages_total" in body


def test_metrics_off(tmp_path):
    path = write_config(tmp_path, free_port())
    path.write_text(path.read_text().replace("listen: {inbound: ", "listen: {metrics: off, inbound: "))
    assert load(path).listen.metrics is None
    relay = InProcessRelay.from_file(path).start()
    try:
        assert relay.running is not None and relay.running.metrics is None
    finally:
        relay.stop()


def test_listen_metrics_default_and_bad_values(tmp_path):
    path = write_config(tmp_path, free_port())
    assert load(path).listen.metrics == HostPort("127.0.0.1", 9125)
    text = path.read_text()
    path.write_text(text.replace("listen: {inbound: ", "listen: {metrics: null, inbound: "))
    assert load(path).listen.metrics is None
    path.write_text(text.replace("listen: {inbound: ", "listen: {metrics: 9125, inbound: "))
    with pytest.raises(RelayError, match=r"listen\.metrics: expected host:port"):
        load(path)


def test_a_port_in_use_is_a_relay_error_naming_listen_metrics(tmp_path):
    config = load(write_config(tmp_path, free_port()))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RelayError, match=rf"^listen.metrics 127.0.0.1:{port}: Address already in use$"):
            asyncio.run(start_metrics(HostPort("127.0.0.1", port), StatusGauges(config)))
