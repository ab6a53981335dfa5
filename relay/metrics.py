"""Prometheus metrics: the counts the relay keeps where things happen, and their exposition.

The `prometheus-client` library keeps the values (thread-safe: worker threads count too),
the histogram buckets and the text format. This module holds the process-wide instruments and
one small function per thing counted, so a call site is one line (`metrics.inbound("kept")`):

    relay_inbound_messages_total{result}          a DATA answered: passed (the primary took it),
                                                  kept, refused (5xx), deferred (4xx),
                                                  rejected_spam (rspamd said reject or soft reject)
    relay_replay_messages_total{domain,result}    a replay attempt settled: sent, deferred,
    relay_outbound_messages_total{result}         stopped, failed, held, error (the runner's
                                                  log events, runners/queue_runner.py)
    relay_auth_failures_total{service}            a wrong login or password: smtp, web
    relay_primary_probe_seconds                   histogram: one replay probe of a primary
    relay_smtp_connections{listener}              SMTP sessions open now: inbound, submission
    relay_build_info{version}                     always 1

The gauges read from the status model (`relay_domain_state`, `relay_queue_messages`, ...) are
relay/web/metrics.py's; it serves everything on `listen.metrics` through `render`, which it
calls in a worker thread (collectors there read files, and so does the process collector).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from relay import __version__

# A `_created` series beside every counter doubles the output and no rule of ours reads it.
disable_created_metrics()

INBOUND_RESULTS = ("passed", "kept", "refused", "deferred", "rejected_spam")
QUEUE_RESULTS = ("sent", "deferred", "stopped", "failed", "held", "error")
AUTH_SERVICES = ("smtp", "web")
LISTENERS = ("inbound", "submission")

# From a primary next door (milliseconds) to one timing out (`primary.connect_timeout`, 30 s).
PROBE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# Made without a registry: `render` gathers them with the caller's own collectors, so several
# relays in one process (the tests) never register a name twice.
_INBOUND = Counter("relay_inbound_messages", "Inbound messages by the answer to their DATA",
                   ["result"], registry=None)
_REPLAY = Counter("relay_replay_messages", "Replay attempts by outcome", ["domain", "result"],
                  registry=None)
_OUTBOUND = Counter("relay_outbound_messages", "Outbound (smarthost) attempts by outcome",
                    ["result"], registry=None)
_AUTH = Counter("relay_auth_failures", "Failed logins (wrong login or password)", ["service"],
                registry=None)
_PROBE = Histogram("relay_primary_probe_seconds", "Replay probes of a primary in outage",
                   buckets=PROBE_BUCKETS, registry=None)
_CONNECTIONS = Gauge("relay_smtp_connections", "SMTP sessions open", ["listener"], registry=None)
_BUILD = Info("relay_build", "The running continuity-relay", registry=None)
_BUILD.info({"version": __version__})
_SETTLED = {"replay": _REPLAY, "outbound": _OUTBOUND}

# Every label value known in advance is there from the start, at 0: a rate() over a counter
# that appears only with its first increment misses that increment.
for _result in INBOUND_RESULTS:
    _INBOUND.labels(result=_result)
for _result in QUEUE_RESULTS:
    _OUTBOUND.labels(result=_result)
for _service in AUTH_SERVICES:
    _AUTH.labels(service=_service)
for _listener in LISTENERS:
    _CONNECTIONS.labels(listener=_listener)

# The library's own process_*, python_info and python_gc_* collectors come along (memory, open
# descriptors: what `limits.*` and LimitNOFILE are about).
_PROCESS: list[Collector] = [_INBOUND, _REPLAY, _OUTBOUND, _AUTH, _PROBE, _CONNECTIONS, _BUILD,
                             PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR]


def inbound(result: str) -> None:
    """One inbound DATA answered; `result` is one of INBOUND_RESULTS."""
    _INBOUND.labels(result=result).inc()


def settled(runner: str, result: str, fields: dict[str, object]) -> None:
    """A queue runner (`replay`, `outbound`) settled one entry; `fields` are the runner's log
    fields naming the queue (the replay runner's `domain`). Other runners (the alerts' webhook
    queue) have no family of their own: the mail queues are what the issue's alerts watch."""
    family = _SETTLED.get(runner)
    if family is not None:
        family.labels(result=result, **{k: str(v) for k, v in fields.items()}).inc()


def auth_failed(service: str) -> None:
    """A login was refused for a wrong login or password (`smtp` or `web`)."""
    _AUTH.labels(service=service).inc()


def probed(seconds: float) -> None:
    """A replay probe of a primary took `seconds` (answered or not)."""
    _PROBE.observe(seconds)


def connection_opened(listener: str) -> None:
    _CONNECTIONS.labels(listener=listener).inc()


def connection_closed(listener: str) -> None:
    _CONNECTIONS.labels(listener=listener).dec()


def gauge(name: str, documentation: str, labels: list[str],
          samples: Iterable[tuple[list[str], float]]) -> Metric:
    """A gauge family from `(label values, value)` pairs, for a collector's `collect()`."""
    return _filled(GaugeMetricFamily(name, documentation, labels=labels), samples)


def counter(name: str, documentation: str, labels: list[str],
            samples: Iterable[tuple[list[str], float]]) -> Metric:
    """A counter family (`name` without `_total`) from `(label values, value)` pairs."""
    return _filled(CounterMetricFamily(name, documentation, labels=labels), samples)


def _filled(family, samples: Iterable[tuple[list[str], float]]) -> Metric:
    for values, value in samples:
        family.add_metric(values, value)
    return family


class _Gathered:
    """The process-wide instruments and `more`, as one collector."""

    def __init__(self, more: Iterable[Collector]) -> None:
        self.collectors = [*_PROCESS, *more]

    def collect(self) -> Iterator[Metric]:
        for collector in self.collectors:
            yield from collector.collect()


def render(more: Iterable[Collector] = (), accept: str = "") -> tuple[bytes, str]:
    """Everything in the format the `Accept` header asks for (Prometheus text by default,
    OpenMetrics when asked): the body and its content type. Blocking: run it off the loop."""
    encode, content_type = choose_encoder(accept)
    return encode(_Gathered(more)), content_type
