"""engine.estimate: which rows it samples, the projection (pure), and end to end on the
mock: an estimate then a run asks no sampled row again, and the estimate's totals
against the actual cost of the whole run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import engine
from engine._api import load
from engine.checkpoint.checkpoint import Checkpoint
from engine.estimate import _interval, project, sample_lines
from engine.testing.mock_server import MockServer
from tests.conftest import conversations, start_turnstile, write_config, write_jsonl

PRICE = {"input": 1.0, "output": 2.0}


def test_the_sample_is_spread_over_the_rows_not_started() -> None:
    lines = sample_lines(100, 4, ())
    assert [line // 25 for line in lines] == [0, 1, 2, 3]  # one in each quarter
    assert lines == sample_lines(100, 4, ())  # the same draw for the same input
    assert sample_lines(3, 20, ()) == [0, 1, 2]
    assert len(sample_lines(10, 3, {0, 1, 2, 3, 4})) == 3
    assert set(sample_lines(10, 3, {0, 1, 2, 3, 4})) <= {5, 6, 7, 8, 9}
    assert sample_lines(4, 2, {0, 1, 2, 3}) == []


def test_the_range_is_a_95_percent_interval_of_the_total() -> None:
    assert _interval([1.0, 1.0, 1.0], 30) == (30.0, 30.0, 30.0)  # no spread: no range
    total, low, high = _interval([1.0, 3.0], 1000)
    assert total == 2000.0 and low < total < high and low >= 0
    assert _interval([1.0, 3.0], 2) == (4.0, 4.0, 4.0)  # the whole input sampled: exact


def test_the_projection_scales_each_model_and_bounds_time_by_the_caps(tmp_path: Path) -> None:
    cfg = load(
        write_config(
            tmp_path,
            "http://127.0.0.1:9",
            cap=4,
            models={
                "teacher": {
                    "base_url": "http://127.0.0.1:9",
                    "model": "mock",
                    "max_concurrency": 4,
                    "requests_per_minute": 60,
                    "price": PRICE,
                }
            },
        )
    )
    # Two rows: 2 and 4 requests, $1 and $3, 2 s and 4 s of asking.
    ledger = {0: {"teacher": [2, 100, 50, 1.0, 2.0]}, 5: {"teacher": [4, 200, 100, 3.0, 4.0]}}
    guess = project(cfg, ledger, [0, 5], 100, workers=8)
    (teacher,) = guess.models
    assert (teacher.requests, teacher.prompt_tokens, teacher.completion_tokens) == (
        300,
        15000,
        7500,
    )
    assert teacher.usd == guess.usd == 200.0
    assert teacher.usd_low is not None and teacher.usd_high is not None
    assert teacher.usd_low < 200.0 < teacher.usd_high
    assert teacher.time_s == 300.0  # 300 requests at 60 a minute: slower than 4 at once
    assert guess.time_s == 300.0 and guess.spent_usd == 4.0 and "no price" not in guess.text()


async def test_an_estimate_is_resumed_by_the_run_and_projects_its_cost(
    mock: MockServer, tmp_path: Path
) -> None:
    rows = conversations(200)
    write_jsonl(tmp_path / "in.jsonl", rows)
    models: dict[str, Any] = {
        "teacher": {
            "base_url": mock.base_url,
            "model": "mock",
            "max_concurrency": 8,
            "params": {"temperature": 0.0, "max_tokens": 64},
            "price": PRICE,
        }
    }
    path = write_config(tmp_path, mock.base_url, models=models)
    proc = await start_turnstile("estimate", str(path), "--sample", "20")
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert "estimate for 200 rows from 20 sampled" in out.decode()
    sampled = mock.stats.total_requests
    assert 20 <= sampled < 80

    # In process too: 20 more rows (those not started), for the figures.
    guess = await engine.aestimate(path, sample=20)
    assert guess.sampled == 20 and guess.rows == 200
    assert guess.usd is not None and guess.usd_low is not None and guess.usd_high is not None
    (teacher,) = guess.models

    before = mock.stats.total_requests
    run = await start_turnstile("run", str(path))
    _, err = await run.communicate()
    assert run.returncode == 0, err.decode()
    total = mock.stats.total_requests
    # Every turn of every row asked exactly once over the estimates and the run.
    assert total == sum(mock.stats.requests_by_key.values())
    assert all(n == 1 for n in mock.stats.requests_by_key.values())
    assert total - before < total  # the run did not ask the sampled rows again

    # The estimate against what the whole input actually cost (journaled spend).
    actual = Checkpoint.of(load(path)).state().spent_usd
    error = abs(guess.usd - actual) / actual
    print(
        f"estimate ${guess.usd:.6f} [{guess.usd_low:.6f}, {guess.usd_high:.6f}], "
        f"actual ${actual:.6f}, error {error:.1%}"
    )
    assert guess.usd_low <= actual <= guess.usd_high
    assert abs(teacher.requests - total) <= 0.25 * total
