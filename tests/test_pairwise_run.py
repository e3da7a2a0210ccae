"""End to end: `judge_format: pairwise` on the mock server, its judge biased towards
whichever answer it reads first (``position_bias``)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import yaml

from engine.tasks.preference.pairwise import ORDER_DEPENDENT, judge_pair_messages
from engine.testing.mock_judges import bias_draw, unbiased_winner
from engine.testing.mock_server import MockServer
from tests.conftest import by_id, kill_after, read_jsonl, turnstile, write_jsonl

BIAS = 0.25


def dataset(n: int) -> list[dict[str, Any]]:
    """Rows that bring two answers each: the judge alone runs, two verdicts a row."""
    return [
        {
            "id": f"q{i}",
            "prompt": f"question number {i}",
            "generations": [f"first answer to {i}", f"second answer to {i}"],
        }
        for i in range(n)
    ]


def config(folder: Path, base_url: str, name: str = "pw", **pairwise: Any) -> Path:
    raw = {
        "task": "preference",
        "input": "in.jsonl",
        "output": f"out/{name}.jsonl",
        "checkpoint_dir": f"ck-{name}",
        "models": {
            "judge": {
                "base_url": base_url,
                "model": "judge-m",
                "max_concurrency": 8,
                "timeout_s": 10,
                "max_retries": 6,
            }
        },
        "preference": {
            "generators": [],
            "judge": "judge",
            "judge_format": "pairwise",
            "pairwise": {"swap": True, **pairwise},
        },
        "progress_interval_s": 60,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def prompt_of(src: dict[str, Any]) -> list[dict[str, str]]:
    return [{"role": "user", "content": src["prompt"]}]


def flips_expected(source: list[dict[str, Any]], bias: float) -> set[str]:
    """The rows whose verdict the mock flips: in the order that shows the better answer
    second, the request's draw fell under the bias, so the judge said "A"."""
    flipped = set()
    for src in source:
        x, y = src["generations"]
        better_second = (x, y) if unbiased_winner(x, y) == "B" else (y, x)
        request = judge_pair_messages(prompt_of(src), *better_second)[-1]["content"]
        if bias_draw(request) < bias:
            flipped.add(src["id"])
    return flipped


async def test_swapping_corrects_a_position_biased_judge_and_reports_its_flip_rate(
    tmp_path: Path, mock: MockServer
) -> None:
    n = 400
    source = dataset(n)
    write_jsonl(tmp_path / "in.jsonl", source)
    mock.position_bias = BIAS
    path = config(tmp_path, mock.base_url)

    result = await turnstile("run", str(path), "--quiet")

    assert result.returncode == 0, result.stderr
    assert mock.stats.total_requests == 2 * n  # two verdicts a pair, none asked twice
    rows = by_id(read_jsonl(tmp_path / "out" / "pw.jsonl"))
    flipped = flips_expected(source, BIAS)
    for src in source:
        row = rows[src["id"]]
        x, y = src["generations"]
        assert [(j["a"], j["b"], j["order"]) for j in row["judgements"]] == [
            (0, 1, "ab"),
            (0, 1, "ba"),
        ]
        if src["id"] in flipped:
            assert row["chosen"] is None and row["rejected"] is None
            assert row["pair_error"] == ORDER_DEPENDENT
            assert row["generations"] == [x, y]
            continue
        # No pair's chosen differs from the unbiased judge's.
        best = x if unbiased_winner(x, y) == "A" else y
        assert row["chosen"] == [{"role": "assistant", "content": best}]
        assert row["pair_error"] is None

    # Each pair flips when the one draw that matters falls under the bias: Binomial(n, P).
    # The rate must sit within 4 standard errors of P (sqrt(P(1 - P) / n) = 0.022 here).
    rate = len(flipped) / n
    assert abs(rate - BIAS) <= 4 * math.sqrt(BIAS * (1 - BIAS) / n)
    reported = re.search(r"judge judge: flip rate ([0-9.]+)% \((\d+) of (\d+) pairs", result.stderr)
    assert reported is not None, result.stderr
    assert (int(reported.group(2)), int(reported.group(3))) == (len(flipped), n)

    status = await turnstile_status(path)
    assert f"flip rate:  judge: {100 * rate:.1f}% ({len(flipped)} of {n} pairs)" in status


async def turnstile_status(path: Path) -> str:
    from tests.conftest import start_turnstile

    proc = await start_turnstile("status", str(path))
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return str(out.decode())


async def test_an_unbiased_judge_flips_nothing_and_drop_sends_flips_to_the_filtered_file(
    tmp_path: Path, mock: MockServer
) -> None:
    source = dataset(60)
    write_jsonl(tmp_path / "in.jsonl", source)
    fair = await turnstile("run", str(config(tmp_path, mock.base_url, "fair")), "--quiet")
    assert fair.returncode == 0, fair.stderr
    assert "flip rate 0.0% (0 of 60 pairs" in fair.stderr
    assert all(r["pair_error"] is None for r in read_jsonl(tmp_path / "out" / "fair.jsonl"))

    mock.position_bias = BIAS
    path = config(tmp_path, mock.base_url, "drop", on_disagree="drop")
    dropped = await turnstile("run", str(path), "--quiet")
    assert dropped.returncode == 0, dropped.stderr
    flipped = flips_expected(source, BIAS)
    kept = by_id(read_jsonl(tmp_path / "out" / "drop.jsonl"))
    filtered = by_id(read_jsonl(tmp_path / "out" / "drop.filtered.jsonl"))
    assert set(filtered) == flipped and set(kept) == {s["id"] for s in source} - flipped
    for row in filtered.values():
        assert row["filter"].startswith(f"pairwise: {ORDER_DEPENDENT}")
        assert len(row["judgements"]) == 2


async def test_without_swap_each_pair_costs_one_request_and_follows_the_bias(
    tmp_path: Path, mock: MockServer
) -> None:
    source = dataset(40)
    write_jsonl(tmp_path / "in.jsonl", source)
    mock.position_bias = 1.0  # always "A": the first candidate always wins
    result = await turnstile("run", str(config(tmp_path, mock.base_url, swap=False)), "--quiet")
    assert result.returncode == 0, result.stderr
    assert mock.stats.total_requests == 40
    for src in source:
        row = by_id(read_jsonl(tmp_path / "out" / "pw.jsonl"))[src["id"]]
        assert row["chosen"] == [{"role": "assistant", "content": src["generations"][0]}]
        assert [j["order"] for j in row["judgements"]] == ["ab"]
    assert "flip rate" not in result.stderr


async def test_sigkill_then_rerun_equals_an_uninterrupted_run_and_asks_no_verdict_twice(
    tmp_path: Path, mock: MockServer
) -> None:
    n = 150
    source = dataset(n)
    write_jsonl(tmp_path / "in.jsonl", source)
    mock.position_bias = BIAS
    whole = config(tmp_path, mock.base_url, "whole")
    assert (await turnstile("run", str(whole), "--quiet")).returncode == 0
    expected = by_id(read_jsonl(tmp_path / "out" / "whole.jsonl"))

    mock.reset()
    killed_config = config(tmp_path, mock.base_url, "killed")
    killed = await kill_after(mock, 120, "run", str(killed_config), "--quiet")
    assert killed.returncode != 0
    before = dict(mock.stats.requests_by_key)
    assert len(read_jsonl(tmp_path / "out" / "killed.jsonl")) < n

    rerun = await turnstile("run", str(killed_config), "--quiet")

    assert rerun.returncode == 0, rerun.stderr
    got = by_id(read_jsonl(tmp_path / "out" / "killed.jsonl"))
    assert got == expected
    # Every verdict the killed run journaled was answered from the journal: no request
    # arrived more often than once over both runs, but those in flight at the kill.
    again = [key for key, count in mock.stats.requests_by_key.items() if count > 1]
    assert len(again) <= 8  # at most the judge's cap was in flight when it died
    assert sum(mock.stats.requests_by_key.values()) <= 2 * n + 8
    assert before  # the first run had asked some
