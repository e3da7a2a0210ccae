"""End to end: `filters.judge` scores each finished distillation on the mock server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from engine.output.quality import QualityJudge, quality_messages
from engine.testing.mock_judges import judge_json
from engine.testing.mock_server import MockServer, request_key
from tests.conftest import (
    by_id,
    conversations,
    kill_after,
    read_jsonl,
    turnstile,
    write_config,
    write_jsonl,
)

MIN_SCORE = 6


def judged_config(folder: Path, base_url: str, name: str = "run", **judge: Any) -> Path:
    model = {"base_url": base_url, "max_concurrency": 8, "timeout_s": 10, "max_retries": 6}
    return write_config(
        folder,
        base_url,
        name=name,
        output=f"out/{name}.jsonl",
        checkpoint_dir=f"ck-{name}",
        models={
            "teacher": {**model, "model": "mock", "params": {"temperature": 0.0}},
            "judge": {**model, "model": "judge-m"},
        },
        filters={"judge": {"model": "judge", "min_score": MIN_SCORE, **judge}},
    )


def expected_score(row: dict[str, Any]) -> int:
    messages, _ = quality_messages(QualityJudge(model="judge"), row["messages"])
    assert messages is not None
    reply = judge_json(messages)
    assert reply is not None
    score: int = orjson.loads(reply)["score"]
    return score


async def test_each_finished_conversation_is_scored_once_and_low_scores_are_filtered(
    tmp_path: Path, mock: MockServer
) -> None:
    source = conversations(40)
    write_jsonl(tmp_path / "in.jsonl", source)
    path = judged_config(tmp_path, mock.base_url)

    result = await turnstile("run", str(path), "--quiet")

    assert result.returncode == 0, result.stderr
    kept = read_jsonl(tmp_path / "out" / "run.jsonl")
    filtered = read_jsonl(tmp_path / "out" / "run.filtered.jsonl")
    assert len(kept) + len(filtered) == len(source)
    assert kept and filtered  # the mock's scores spread over 1-10
    for row in kept:
        assert row["quality"]["score"] == expected_score(row) >= MIN_SCORE
        assert row["quality"]["reason"].startswith("The mock judge scores")
    for row in filtered:
        score = expected_score(row)
        assert row["quality"]["score"] == score < MIN_SCORE
        assert row["filter"].startswith(f"judge: scored {score} of 10 (min_score {MIN_SCORE})")
    # Its cost: one request a row, each asked once, counted in the summary.
    for row in kept + filtered:
        messages, _ = quality_messages(QualityJudge(model="judge"), row["messages"])
        assert messages is not None
        assert mock.stats.requests_by_key[request_key("judge-m", messages)] == 1
    assert f"filters.judge: {len(source)} requests" in result.stderr
    assert "by rule: judge " in result.stderr


async def test_a_killed_run_resumes_exactly_and_scores_no_finished_row_again(
    tmp_path: Path, mock: MockServer
) -> None:
    source = conversations(60)
    write_jsonl(tmp_path / "in.jsonl", source)
    whole = judged_config(tmp_path, mock.base_url, "whole")
    assert (await turnstile("run", str(whole), "--quiet")).returncode == 0
    expected = by_id(read_jsonl(tmp_path / "out" / "whole.jsonl"))
    expected_filtered = by_id(read_jsonl(tmp_path / "out" / "whole.filtered.jsonl"))

    mock.reset()
    path = judged_config(tmp_path, mock.base_url, "killed")
    killed = await kill_after(mock, 90, "run", str(path), "--quiet")
    assert killed.returncode != 0
    rerun = await turnstile("run", str(path), "--quiet")

    assert rerun.returncode == 0, rerun.stderr
    assert by_id(read_jsonl(tmp_path / "out" / "killed.jsonl")) == expected
    assert by_id(read_jsonl(tmp_path / "out" / "killed.filtered.jsonl")) == expected_filtered
    repeated = [key for key, count in mock.stats.requests_by_key.items() if count > 1]
    assert len(repeated) <= 16  # only what was in flight (two caps of 8) at the kill
