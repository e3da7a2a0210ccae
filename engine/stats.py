"""Counters the run keeps for the progress display and the final summary."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

_BUCKET_RATIO = 1.05
_BUCKET_FLOOR_S = 1e-4
_LOG_RATIO = math.log(_BUCKET_RATIO)  # math.log(x, base) is log(x) / log(base): the same buckets


class LatencyHistogram:
    """Percentiles in constant memory: log-spaced buckets 5% wide from 0.1 ms up."""

    __slots__ = ("_counts", "count", "total_s")

    def __init__(self) -> None:
        self._counts: dict[int, int] = {}
        self.count = 0
        self.total_s = 0.0

    def add(self, seconds: float) -> None:
        self.total_s += seconds
        index = 0
        if seconds > _BUCKET_FLOOR_S:
            index = int(math.log(seconds / _BUCKET_FLOOR_S) / _LOG_RATIO) + 1
        counts = self._counts
        counts[index] = counts.get(index, 0) + 1
        self.count += 1

    def buckets(self) -> dict[int, int]:
        """Its counts by bucket (to send elsewhere and :meth:`merge` there)."""
        return dict(self._counts)

    def merge(self, buckets: dict[int, int], total_s: float = 0.0) -> None:
        for index, count in buckets.items():
            self._counts[int(index)] = self._counts.get(int(index), 0) + count
            self.count += count
        self.total_s += total_s

    def cumulative(self, bounds: Iterable[float]) -> list[tuple[float, int]]:
        """(upper bound, requests at or under it) for each bound, as Prometheus histograms
        count them; a bucket counts under the first bound its upper edge fits (to 5%)."""
        out = []
        for bound in bounds:
            under = sum(n for index, n in self._counts.items() if _upper(index) <= bound * 1.0001)
            out.append((bound, under))
        return out

    def since(self, earlier: dict[int, int]) -> LatencyHistogram:
        """The requests added since its buckets were ``earlier`` (a :meth:`buckets` copy)."""
        window = LatencyHistogram()
        for index, count in self._counts.items():
            if count > earlier.get(index, 0):
                window._counts[index] = count - earlier.get(index, 0)
                window.count += window._counts[index]
        return window

    def percentile(self, q: float) -> float | None:
        """The q-th percentile (0-100) in seconds, to within the bucket width; None if empty."""
        if not self.count:
            return None
        rank = max(1, math.ceil(self.count * q / 100))
        seen = 0
        for index in sorted(self._counts):
            seen += self._counts[index]
            if seen >= rank:
                return 0.0 if index == 0 else _BUCKET_FLOOR_S * _BUCKET_RATIO ** (index - 0.5)
        return None


def _upper(index: int) -> float:
    return 0.0 if index == 0 else _BUCKET_FLOOR_S * _BUCKET_RATIO**index


@dataclass(slots=True)
class ReplicaStats:
    """One server of a model: what the display shows per replica."""

    url: str
    cap: int
    in_flight: int = 0
    limit: int | None = None
    requests: int = 0
    ok: int = 0
    failures: int = 0  # health failures: connection errors, timeouts, 5xx
    retried: int = 0  # answers (or no answer) that are worth another try: 429, 5xx, timeouts
    failed: int = 0  # answers that are not: 400, 401, 404...
    live: bool = True
    out_since: float | None = None  # monotonic time it was taken out, while out


@dataclass(slots=True)
class Outage:
    """A replica taken out (monotonic times); ``ended`` is None while it is still out."""

    replica: int
    url: str
    started: float
    ended: float | None = None


@dataclass(slots=True)
class ModelStats:
    """Per-model counters, updated by the client and its replica pool."""

    name: str
    cap: int
    in_flight: int = 0
    requests: int = 0
    ok: int = 0
    retries: int = 0  # charged to the row (its max_retries)
    resent: int = 0  # sent again after a server failure, charged to no row
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0  # part of completion_tokens, where the server reports them
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    limit: int | None = None  # the current adaptive limit, where one applies
    replicas: list[ReplicaStats] = field(default_factory=list)
    outages: list[Outage] = field(default_factory=list)
    # Written by Context.ask (engine.cost), not the client:
    cached: int = 0  # requests answered from the reply cache (not sent)
    cached_tokens: int = 0  # prompt tokens the server served from its prompt cache
    cost_usd: float = 0.0  # from the usage the server reported, at the model's price
    saved_usd: float = 0.0  # what the cache hits would have cost
    priced: bool = False  # the model has a price (cost_usd means something)
    # A batch model (models.X.batch; written by engine.batch.endpoint): its batches
    # stand in for requests in flight in the display, summary, metrics and history.
    batch: bool = False
    batches_submitted: int = 0  # created by this run
    batches_attached: int = 0  # left running by an earlier run, collected by this one
    batches_running: int = 0  # created or attached, not yet read back
    batches_done: int = 0  # finished and read back by this run


class _TokenTotals:
    """A run's token totals, summed over its models (the live counters or a snapshot)."""

    __slots__ = ()
    models: Mapping[str, Any]

    @property
    def prompt_tokens(self) -> int:
        return sum(m.prompt_tokens for m in self.models.values())

    @property
    def completion_tokens(self) -> int:
        return sum(m.completion_tokens for m in self.models.values())

    @property
    def reasoning_tokens(self) -> int:
        return sum(m.reasoning_tokens for m in self.models.values())


@dataclass(slots=True)
class RunStats(_TokenTotals):
    """Whole-run counters: what the progress display and the summary read."""

    rows_total: int | None = None  # known once the input has been counted
    rows_done: int = 0  # finished this run or earlier (ok and failed)
    rows_failed: int = 0
    rows_filtered: int = 0  # finished, but left out by the quality filters
    filtered_by_rule: dict[str, int] = field(default_factory=dict)  # this run's, per rule
    rows_skipped: int = 0  # finished in an earlier run
    turns_done: int = 0  # replies written this run
    turns_resumed: int = 0  # replies recovered from the journal
    turn_rule: str | None = None  # distillation: which user messages are turns (the estimate's)
    shards: str | None = None  # a sharded run: how many are done, running, pending
    models: dict[str, ModelStats] = field(default_factory=dict)
    # A pairwise judge (rows judged by this run): pairs judged in both orders and, of
    # those, the ones whose verdict changed with the order, by judge.
    order_pairs: dict[str, int] = field(default_factory=dict)
    order_flips: dict[str, int] = field(default_factory=dict)
    judge_filter_requests: int = 0  # requests filters.judge sent (this run)
    cached: int = 0  # replies answered from the reply cache this run (not sent)

    @property
    def cost_usd(self) -> float | None:
        """What this run's requests cost (None: no model has a price)."""
        return _cost(self.models.values())


@dataclass(frozen=True, slots=True)
class ModelStatistics:
    """One model's counters at the moment of a snapshot (:meth:`RunStatistics.of`):
    ModelStats's names, copies that nothing updates afterwards."""

    name: str
    cap: int
    in_flight: int
    requests: int
    ok: int
    retries: int
    resent: int
    failures: int
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    latency: LatencyHistogram  # a copy
    limit: int | None
    replicas: tuple[ReplicaStats, ...]  # copies
    outages: tuple[Outage, ...]  # copies
    cached: int
    cached_tokens: int
    cost_usd: float
    saved_usd: float
    priced: bool
    batch: bool
    batches_submitted: int
    batches_attached: int
    batches_running: int
    batches_done: int

    @classmethod
    def of(cls, stats: ModelStats) -> ModelStatistics:
        latency = LatencyHistogram()
        latency.merge(stats.latency.buckets(), stats.latency.total_s)
        values = {f.name: getattr(stats, f.name) for f in fields(stats)}
        values.update(
            latency=latency,
            replicas=tuple(replace(r) for r in stats.replicas),
            outages=tuple(replace(o) for o in stats.outages),
        )
        return cls(**values)


@dataclass(frozen=True, slots=True)
class RunStatistics(_TokenTotals):
    """The run's counters at the moment of a snapshot: RunStats's names, read-only.

    What a caller is handed (``Summary.stats``), as anyio's ``statistics()`` hands out
    a frozen copy: the run's own RunStats stay the run's to write.
    """

    rows_total: int | None
    rows_done: int
    rows_failed: int
    rows_filtered: int
    filtered_by_rule: Mapping[str, int]
    rows_skipped: int
    turns_done: int
    turns_resumed: int
    turn_rule: str | None
    shards: str | None
    models: Mapping[str, ModelStatistics]
    order_pairs: Mapping[str, int]
    order_flips: Mapping[str, int]
    judge_filter_requests: int
    cached: int

    @property
    def cost_usd(self) -> float | None:
        return _cost(self.models.values())

    @classmethod
    def of(cls, stats: RunStats) -> RunStatistics:
        values = {f.name: getattr(stats, f.name) for f in fields(stats)}
        values.update(
            filtered_by_rule=MappingProxyType(dict(stats.filtered_by_rule)),
            order_pairs=MappingProxyType(dict(stats.order_pairs)),
            order_flips=MappingProxyType(dict(stats.order_flips)),
            models=MappingProxyType(
                {name: ModelStatistics.of(m) for name, m in stats.models.items()}
            ),
        )
        return cls(**values)


def flip_rate(stats: RunStats | RunStatistics, judge: str) -> float | None:
    """The share of ``judge``'s pairs judged in both orders whose verdict changed with
    the order (None before any)."""
    both = stats.order_pairs.get(judge, 0)
    return stats.order_flips.get(judge, 0) / both if both else None


@dataclass(slots=True)
class Outcome:
    """How one run went: its counters, its time, and whether a signal stopped it."""

    stats: RunStats
    elapsed_s: float
    interrupted_by: int | None = None
    resumed: bool = False


@dataclass(frozen=True, slots=True)
class Summary:
    """What ``engine.run`` returns: the whole run's counts (earlier runs of the same
    checkpoint included) and where its files are."""

    rows_ok: int
    rows_failed: int
    rows_filtered: int
    turns: int  # replies written by this call (journaled in earlier runs: turns_resumed)
    turns_resumed: int
    output: Path
    failed_output: Path
    filtered_output: Path
    elapsed_s: float
    resumed: bool
    interrupted: bool
    stats: RunStatistics  # the run's counters when it ended (a frozen copy)
    cost_usd: float | None = None  # this call's requests at the models' prices (None: no price)
    cached: int = 0  # requests answered from the reply cache (cache.dir), not sent

    @classmethod
    def of(cls, outcome: Outcome, output: Path, failed: Path, filtered: Path) -> Summary:
        s = outcome.stats
        return cls(
            rows_ok=s.rows_done - s.rows_failed - s.rows_filtered,
            rows_failed=s.rows_failed,
            rows_filtered=s.rows_filtered,
            turns=s.turns_done,
            turns_resumed=s.turns_resumed,
            output=output,
            failed_output=failed,
            filtered_output=filtered,
            elapsed_s=outcome.elapsed_s,
            resumed=outcome.resumed,
            interrupted=outcome.interrupted_by is not None,
            stats=RunStatistics.of(s),
            cost_usd=s.cost_usd,
            cached=s.cached,
        )


# -- a sharded run: each shard's counters, sent to the driver and added up there --------

_ROW_COUNTERS = (
    "rows_done",
    "rows_failed",
    "rows_filtered",
    "rows_skipped",
    "turns_done",
    "turns_resumed",
    "cached",
)
_MODEL_COUNTERS = (
    "in_flight",
    "requests",
    "ok",
    "retries",
    "resent",
    "failures",
    "prompt_tokens",
    "completion_tokens",
    "reasoning_tokens",
    "cached",
    "cached_tokens",
    "batches_submitted",
    "batches_attached",
    "batches_running",
    "batches_done",
)
_COST_COUNTERS = ("cost_usd", "saved_usd")
_REPLICA_COUNTERS = ("in_flight", "requests", "ok", "failures", "retried", "failed")


def progress_of(stats: RunStats) -> dict[str, Any]:
    """A shard's counters as plain values (what it sends the driver with each lease)."""
    return {
        **{name: getattr(stats, name) for name in _ROW_COUNTERS},
        "models": {
            name: {
                **{key: getattr(m, key) for key in _MODEL_COUNTERS},
                **{key: getattr(m, key) for key in _COST_COUNTERS},
                "priced": m.priced,
                "batch": m.batch,
                "limit": m.limit,
                "latency": m.latency.buckets(),
                "latency_s": m.latency.total_s,
                "replicas": [
                    {
                        **{key: getattr(r, key) for key in _REPLICA_COUNTERS},
                        "url": r.url,
                        "limit": r.limit,
                        "live": r.live,
                    }
                    for r in m.replicas
                ],
            }
            for name, m in stats.models.items()
        },
    }


def combine(
    parts: Iterable[dict[str, Any]], models: dict[str, tuple[int, list[str]]], into: RunStats
) -> None:
    """Set ``into``'s counters to the sum of the shards' ``parts`` (progress_of's).

    ``models`` gives each model's per-replica cap for the whole run and its replica
    URLs. Limits add up (each shard holds a share of the cap) over the shards that
    know theirs: one waiting for its first lease has none (None), and while no shard
    has one the limit is unknown (None), never 0. A replica is live while any shard
    that reported it sees it live.
    """
    parts = list(parts)
    for name in _ROW_COUNTERS:
        setattr(into, name, sum(int(part.get(name, 0)) for part in parts))
    out: dict[str, ModelStats] = {}
    for name, (cap, urls) in models.items():
        m = ModelStats(name=name, cap=cap * len(urls))
        m.replicas = [ReplicaStats(url=url, cap=cap) for url in urls]
        reported = [got for part in parts if (got := part.get("models", {}).get(name))]
        for got in reported:
            for key in _MODEL_COUNTERS:
                setattr(m, key, getattr(m, key) + int(got.get(key, 0)))
            for key in _COST_COUNTERS:
                setattr(m, key, getattr(m, key) + float(got.get(key, 0.0)))
            m.priced = m.priced or bool(got.get("priced"))
            m.batch = m.batch or bool(got.get("batch"))
            m.limit = _add_limit(m.limit, got.get("limit"))
            m.latency.merge(got.get("latency", {}), float(got.get("latency_s", 0.0)))
            for replica, seen in zip(m.replicas, got.get("replicas", []), strict=False):
                for key in _REPLICA_COUNTERS:
                    setattr(replica, key, getattr(replica, key) + int(seen.get(key, 0)))
                replica.limit = _add_limit(replica.limit, seen.get("limit"))
        for i, replica in enumerate(m.replicas):
            views = [got["replicas"][i] for got in reported if len(got.get("replicas", [])) > i]
            replica.live = not views or any(view.get("live", True) for view in views)
        out[name] = m
    into.models = out


def _add_limit(total: int | None, limit: Any) -> int | None:
    """A shard's limit added to the others' (a shard that has none adds nothing)."""
    if limit is None:
        return total
    return (total or 0) + int(limit)


def _cost(models: Iterable[ModelStats | ModelStatistics]) -> float | None:
    priced = [m.cost_usd for m in models if m.priced]
    return sum(priced) if priced else None
