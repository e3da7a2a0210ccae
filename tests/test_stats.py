"""Run counters: the latency histogram's percentiles, and the token totals."""

from __future__ import annotations

import math
import random

import pytest

from engine.stats import LatencyHistogram, ModelStats, RunStats


def true_percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile, the definition the histogram approximates."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(len(ordered) * q / 100)) - 1]


def test_empty_histogram_has_no_percentiles() -> None:
    hist = LatencyHistogram()
    assert hist.count == 0
    for q in (0, 50, 99, 100):
        assert hist.percentile(q) is None


@pytest.mark.parametrize("q", [1, 10, 50, 90, 95, 99, 99.9, 100])
def test_percentiles_of_a_lognormal_sample_are_within_five_percent(q: float) -> None:
    rng = random.Random(1234)
    values = [rng.lognormvariate(math.log(0.8), 0.9) for _ in range(20_000)]
    hist = LatencyHistogram()
    for v in values:
        hist.add(v)
    assert hist.count == len(values)
    got = hist.percentile(q)
    assert got is not None
    assert got == pytest.approx(true_percentile(values, q), rel=0.05)


@pytest.mark.parametrize("seconds", [0.00015, 0.0123, 0.5, 1.0, 3.7, 42.0, 599.0])
def test_a_single_value_is_recovered_within_the_bucket_width(seconds: float) -> None:
    hist = LatencyHistogram()
    hist.add(seconds)
    for q in (0, 50, 100):
        assert hist.percentile(q) == pytest.approx(seconds, rel=0.05)


def test_uniform_milliseconds_to_seconds() -> None:
    values = [i / 1000 for i in range(1, 10_001)]  # 1 ms .. 10 s
    hist = LatencyHistogram()
    for v in reversed(values):  # insertion order must not matter
        hist.add(v)
    assert hist.percentile(50) == pytest.approx(5.0, rel=0.05)
    assert hist.percentile(90) == pytest.approx(9.0, rel=0.05)
    assert hist.percentile(99) == pytest.approx(9.9, rel=0.05)


def test_percentiles_are_ordered() -> None:
    rng = random.Random(7)
    hist = LatencyHistogram()
    for _ in range(5000):
        hist.add(rng.expovariate(2.0))
    qs = [0, 5, 25, 50, 75, 95, 100]
    got = [hist.percentile(q) for q in qs]
    assert all(g is not None for g in got)
    assert got == sorted(got)  # type: ignore[type-var]
    assert got[0] is not None and got[-1] is not None and got[0] < got[-1]


def test_tiny_and_zero_latencies_read_as_zero() -> None:
    hist = LatencyHistogram()
    for v in (0.0, 0.00001, 0.0001):
        hist.add(v)
    hist.add(2.0)
    assert hist.percentile(50) == 0.0
    assert hist.percentile(100) == pytest.approx(2.0, rel=0.05)


def test_run_token_totals_sum_the_models() -> None:
    a = ModelStats(name="a", cap=4, prompt_tokens=10, completion_tokens=3)
    b = ModelStats(name="b", cap=2, prompt_tokens=5, completion_tokens=7)
    stats = RunStats(models={"a": a, "b": b})
    assert stats.prompt_tokens == 15
    assert stats.completion_tokens == 10
    assert RunStats().prompt_tokens == 0
