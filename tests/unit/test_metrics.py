"""The metrics' own bookkeeping: outage seconds counted once whichever way a change is seen, and
the counts the spam screen keeps (issue 12, point 1). No sockets: `metrics.render` directly."""

from __future__ import annotations

import asyncio
import re
import textwrap
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from relay import metrics
from relay.config import load
from relay.delivery import rspamd
from relay.delivery.rspamd import Scan, Verdict
from relay.smtp.spam import Screen
from relay.storage.state import NORMAL, OUTAGE, REPLAYING, State, state_dir, write_state
from relay.web.metrics import StatusGauges

DOMAIN = "example.com"


def scraped(*collectors) -> dict[tuple[str, frozenset], float]:
    body, _ = metrics.render(collectors)
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def gauges(tmp_path: Path) -> tuple[StatusGauges, Clock, Path]:
    path = tmp_path / "relay.yaml"
    path.write_text(textwrap.dedent(f"""\
        listen: {{inbound: "127.0.0.1:2525"}}
        storage: {{maildirs: maildirs, spool: spool}}
        domains:
          {DOMAIN}:
            primary: 127.0.0.1:2526
        """))
    config = load(path)
    clock = Clock()
    return StatusGauges(config, clock), clock, state_dir(config.storage.spool)


def outage_seconds(status: StatusGauges) -> float:
    return scraped(status)[("relay_domain_outage_seconds_total", frozenset({("domain", DOMAIN)}))]


def test_an_outage_seen_by_the_listener_and_a_late_file_counts_once(tmp_path):
    status, clock, states = gauges(tmp_path)
    status.changed(DOMAIN, State(OUTAGE, 100.0))
    write_state(states, DOMAIN, State(OUTAGE, 100.0))
    clock.now = 130.0
    assert outage_seconds(status) == 30.0
    status.changed(DOMAIN, State(REPLAYING, 160.0))     # the file is rewritten a moment later
    clock.now = 200.0
    assert outage_seconds(status) == 60.0               # not 100: the file's outage is the same one
    write_state(states, DOMAIN, State(REPLAYING, 160.0))
    write_state(states, DOMAIN, State(NORMAL, 170.0))
    assert outage_seconds(status) == 60.0


def test_a_new_outage_not_yet_in_the_file_is_not_closed_by_the_old_state(tmp_path):
    status, clock, states = gauges(tmp_path)
    write_state(states, DOMAIN, State(NORMAL, 50.0))
    status.changed(DOMAIN, State(OUTAGE, 100.0))
    clock.now = 110.0
    assert outage_seconds(status) == 10.0               # the file still says normal since 50


def test_outages_another_process_ends_or_that_began_before_start_are_counted(tmp_path):
    status, clock, states = gauges(tmp_path)
    write_state(states, DOMAIN, State(OUTAGE, 300.0))   # going on when serve started
    clock.now = 310.0
    assert outage_seconds(status) == 10.0
    write_state(states, DOMAIN, State(REPLAYING, 350.0))  # the `replay` command ended it
    clock.now = 400.0
    assert outage_seconds(status) == 50.0
    write_state(states, DOMAIN, State(OUTAGE, 500.0))
    clock.now = 520.0
    assert outage_seconds(status) == 70.0


def test_the_total_never_goes_down(tmp_path):
    """A change seen late, with an end before the last scrape: the counter holds, never falls
    (Prometheus would read a fall as a restart)."""
    status, clock, states = gauges(tmp_path)
    write_state(states, DOMAIN, State(OUTAGE, 100.0))
    clock.now = 200.0
    assert outage_seconds(status) == 100.0
    write_state(states, DOMAIN, State(REPLAYING, 150.0))
    assert outage_seconds(status) == 100.0
    write_state(states, DOMAIN, State(OUTAGE, 300.0))   # the next outage adds its own seconds
    clock.now = 330.0
    assert outage_seconds(status) == 130.0


def test_the_state_gauge_has_one_current_state(tmp_path):
    status, clock, states = gauges(tmp_path)
    write_state(states, DOMAIN, State(REPLAYING, 1.0))
    samples = scraped(status)
    assert {state: samples[("relay_domain_state", frozenset({("domain", DOMAIN), ("state", state)}))]
            for state in (NORMAL, OUTAGE, REPLAYING)} == {NORMAL: 0, OUTAGE: 0, REPLAYING: 1}


def inbound(result: str) -> float:
    return scraped()[("relay_inbound_messages_total", frozenset({("result", result)}))]


def test_spam_refusals_count_as_rejected_spam_and_an_unchecked_deferral_as_deferred():
    scan = Scan("q1", "s@sender.test", ("alice@example.com",))

    def screen(action: str, on_failure: str = "keep") -> Screen:
        async def check(message: bytes, scan: Scan) -> Verdict:
            return Verdict(action)
        return Screen(check, on_failure)

    spam, deferred = inbound("rejected_spam"), inbound("deferred")
    for action in (rspamd.REJECT, rspamd.SOFT_REJECT):
        assert asyncio.run(screen(action)(b"x", scan, delivered=False)).reply is not None
    assert asyncio.run(screen(rspamd.UNAVAILABLE, "defer")(b"x", scan, delivered=False)).reply is not None
    assert asyncio.run(screen(rspamd.REJECT)(b"x", scan, delivered=True)).reply is None  # kept, marked
    assert (inbound("rejected_spam"), inbound("deferred")) == (spam + 2, deferred + 1)


def test_every_known_label_is_there_from_the_start():
    samples = scraped()
    for result in metrics.INBOUND_RESULTS:
        assert ("relay_inbound_messages_total", frozenset({("result", result)})) in samples
    for service in metrics.AUTH_SERVICES:
        assert ("relay_auth_failures_total", frozenset({("service", service)})) in samples


def test_contrib_and_the_readme_name_only_metrics_the_relay_exposes(tmp_path):
    """contrib/prometheus/ (rules, dashboard) and the README's list stay in step with the code."""
    status, _, _ = gauges(tmp_path)
    body = metrics.render([status])[0].decode()
    suffixes = re.compile(r"_(total|bucket|count|sum|info)$")
    exposed = {suffixes.sub("", family.name) for family in text_string_to_metric_families(body)
               if family.name.startswith("relay_")}
    root = Path(__file__).resolve().parents[2]
    for path in (root / "contrib/prometheus/rules.yml", root / "contrib/prometheus/dashboard.json"):
        used = {suffixes.sub("", name) for name in re.findall(r"\brelay_[a-z_]+", path.read_text())}
        assert used and used <= exposed, (path.name, used - exposed)
    readme = set(re.findall(r"`(relay_[a-z_]+)", (root / "README.md").read_text()))
    listed = {suffixes.sub("", name) for name in readme}
    assert listed == exposed, (exposed - listed, listed - exposed)
