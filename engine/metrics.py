"""Prometheus metrics of a run, read from its counters when scraped.

The run keeps its counters anyway (engine.stats, for the display and summary); a
collector turns them into metric families at each scrape, in the server's thread.
So metrics cost the hot path nothing: no counter object to increment per request,
no lock. ``metrics.port`` (or ``--metrics-port``) serves them with the official
``prometheus-client`` at ``http://HOST:PORT/metrics``, from a thread of its own.

A sharded run serves them from the driver, over the counters its shards report
(engine.executors.ray_run): one place to scrape for the whole cluster.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from engine.config import MetricsConfig
from engine.errors import TurnstileError
from engine.stats import RunStats

log = logging.getLogger("turnstile")

# Seconds: the usual spread for LLM requests, from a cache hit to a long generation.
LATENCY_BOUNDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class RunCollector:
    """Metric families from a run's counters (``source()`` gives them at each scrape)."""

    def __init__(self, source: Callable[[], RunStats]) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        stats = self.source()
        rows = CounterMetricFamily("turnstile_rows", "Rows finished, by state", labels=["state"])
        ok = stats.rows_done - stats.rows_failed - stats.rows_filtered
        for state, count in (
            ("ok", ok),
            ("failed", stats.rows_failed),
            ("filtered", stats.rows_filtered),
        ):
            rows.add_metric([state], count)
        yield rows
        yield CounterMetricFamily(
            "turnstile_turns", "Replies journaled in this process", value=stats.turns_done
        )
        total = GaugeMetricFamily("turnstile_rows_in_input", "Rows in the input, once counted")
        if stats.rows_total is not None:
            total.add_metric([], stats.rows_total)
        yield total
        yield from _judge_families(stats)
        yield from _model_families(stats)


def _judge_families(stats: RunStats) -> Iterator[Metric]:
    """A pairwise judge's pairs judged in both orders and its flips (flip rate = flips /
    pairs), and the judge filter's requests."""
    pairs = CounterMetricFamily(
        "turnstile_judge_pairs",
        "Pairs a pairwise judge judged in both orders (this process)",
        labels=["judge"],
    )
    flips = CounterMetricFamily(
        "turnstile_judge_flips",
        "Of those, pairs whose verdict changed with the order (position bias)",
        labels=["judge"],
    )
    for judge, both in sorted(stats.order_pairs.items()):
        pairs.add_metric([judge], both)
        flips.add_metric([judge], stats.order_flips.get(judge, 0))
    yield pairs
    yield flips
    yield CounterMetricFamily(
        "turnstile_judge_filter_requests",
        "Requests the judge filter (filters.judge) sent",
        value=stats.judge_filter_requests,
    )


def _model_families(stats: RunStats) -> Iterator[Metric]:
    replica_labels = ["model", "replica"]
    requests = CounterMetricFamily(
        "turnstile_requests",
        "Requests sent, by how they were answered: ok, retried (429, 5xx, timeouts: worth "
        "another try) or failed (400-like: not)",
        labels=[*replica_labels, "outcome"],
    )
    tokens = CounterMetricFamily("turnstile_tokens", "Tokens", labels=["model", "kind"])
    in_flight = GaugeMetricFamily(
        "turnstile_in_flight", "Requests in flight", labels=replica_labels
    )
    limit = GaugeMetricFamily(
        "turnstile_limit", "The limit requests in flight are held to", labels=replica_labels
    )
    up = GaugeMetricFamily(
        "turnstile_model_up", "1 while the replica takes requests", labels=replica_labels
    )
    latency = HistogramMetricFamily(
        "turnstile_request_seconds", "Latency of answered requests", labels=["model"]
    )
    batches = GaugeMetricFamily(
        "turnstile_batches",
        "A batch model's batches (models.X.batch): running now, done (read back) this run",
        labels=["model", "state"],
    )
    cost = CounterMetricFamily(
        "turnstile_cost_usd",
        "USD the model's requests cost, from the usage the server reported, at its price "
        "(models.X.price); 0 for a model without one",
        labels=["model"],
    )
    cached = CounterMetricFamily(
        "turnstile_cached",
        "Requests answered from the reply cache (cache.dir), not sent",
        labels=["model"],
    )
    saved = CounterMetricFamily(
        "turnstile_saved_usd", "USD the reply cache's answers would have cost", labels=["model"]
    )
    for name, m in stats.models.items():
        cost.add_metric([name], m.cost_usd)
        cached.add_metric([name], m.cached)
        saved.add_metric([name], m.saved_usd)
        if m.batch:
            batches.add_metric([name, "running"], m.batches_running)
            batches.add_metric([name, "done"], m.batches_done)
        for replica in m.replicas:
            labels = [name, replica.url]
            requests.add_metric([*labels, "ok"], replica.ok)
            requests.add_metric([*labels, "retried"], replica.retried)
            requests.add_metric([*labels, "failed"], replica.failed)
            in_flight.add_metric(labels, replica.in_flight)
            limit.add_metric(labels, replica.limit if replica.limit is not None else replica.cap)
            up.add_metric(labels, 1 if replica.live else 0)
        tokens.add_metric([name, "prompt"], m.prompt_tokens)
        tokens.add_metric([name, "completion"], m.completion_tokens)
        tokens.add_metric([name, "reasoning"], m.reasoning_tokens)  # part of completion
        buckets: list[tuple[str, float]] = [
            (repr(bound), count) for bound, count in m.latency.cumulative(LATENCY_BOUNDS)
        ]
        buckets.append(("+Inf", m.latency.count))
        latency.add_metric([name], buckets, sum_value=m.latency.total_s)
    yield from (requests, tokens, in_flight, limit, up, latency, batches, cost, cached, saved)


@contextmanager
def serving(config: MetricsConfig, source: Callable[[], RunStats]) -> Iterator[Any]:
    """Serve the run's metrics while the block runs (nothing when no port is set)."""
    if config.port is None:
        yield None
        return
    registry = CollectorRegistry(auto_describe=True)
    registry.register(RunCollector(source))
    try:
        server, thread = start_http_server(config.port, addr=config.host, registry=registry)
    except OSError as exc:
        raise TurnstileError(
            f"metrics cannot be served on {config.host}:{config.port} ({exc}); pick another "
            "metrics.port (or --metrics-port), or free that one"
        ) from exc
    log.info(f"metrics at http://{config.host}:{server.server_port}/metrics")
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
