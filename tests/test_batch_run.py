"""End to end: a batch model (``models.X.batch``) against the mock server's Batch API."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import yaml

from engine.testing.mock_server import MockServer
from tests.conftest import (
    Proc,
    by_id,
    conversations,
    read_jsonl,
    start_turnstile,
    turnstile,
    write_config,
    write_jsonl,
)
from tests.test_distill_run import assert_each_turn_answers_its_history

BATCH = {"max_requests": 1000, "max_batches": 2, "poll_s": 0.05, "flush_s": 30}


def batch_config(tmp_path: Path, url: str, **batch: Any) -> Path:
    config = write_config(tmp_path, url)
    raw = yaml.safe_load(config.read_text())
    raw["models"]["teacher"]["batch"] = {**BATCH, **batch}
    config.write_text(yaml.safe_dump(raw))
    return config


async def test_a_k_turn_distillation_takes_k_batch_rounds(tmp_path: Path, mock: MockServer) -> None:
    source = conversations(30, max_turns=3)
    write_jsonl(tmp_path / "in.jsonl", source)
    config = batch_config(tmp_path, mock.base_url)

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 0, result.stderr
    rows = by_id(read_jsonl(tmp_path / "out" / "distilled.jsonl"))
    assert set(rows) == {s["id"] for s in source}
    for row in rows.values():
        assert_each_turn_answers_its_history(row)
    assert mock.batch.events["create"] == 3  # max turns: one batch a round
    assert mock.stats.total_requests == 0  # nothing went online
    assert max(mock.batch.lines_by_id.values()) == 1


async def test_error_lines_and_an_expired_batch_are_asked_again(
    tmp_path: Path, mock: MockServer
) -> None:
    source = conversations(20, max_turns=1)
    write_jsonl(tmp_path / "in.jsonl", source)
    config = batch_config(tmp_path, mock.base_url)
    mock.batch.error_rate = 0.3
    mock.batch.expire_next = 1

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 0, result.stderr
    rows = by_id(read_jsonl(tmp_path / "out" / "distilled.jsonl"))
    assert set(rows) == {s["id"] for s in source}
    for row in rows.values():
        assert_each_turn_answers_its_history(row)
    assert mock.batch.events["create"] >= 2
    # A requeued line is a new attempt: a new custom id, each submitted once.
    assert max(mock.batch.lines_by_id.values()) == 1
    assert any(cid.endswith(".1") for cid in mock.batch.lines_by_id)


async def test_a_permanent_error_fails_its_row(tmp_path: Path, mock: MockServer) -> None:
    source = [
        {"id": "ok", "prompt": "a fine question"},
        {"id": "bad", "prompt": "BATCH-400 please"},
    ]
    write_jsonl(tmp_path / "in.jsonl", source)
    config = batch_config(tmp_path, mock.base_url)

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 1, result.stderr  # rows failed
    assert [r["id"] for r in read_jsonl(tmp_path / "out" / "distilled.jsonl")] == ["ok"]
    failed = read_jsonl(tmp_path / "out" / "distilled.failed.jsonl")
    assert [r["id"] for r in failed] == ["bad"]
    assert "HTTP 400" in failed[0]["error"]


async def _kill_at(mock: MockServer, event: str, config: Path) -> Proc:
    proc = await start_turnstile("run", str(config), "--quiet")
    waiter = asyncio.ensure_future(mock.batch.wait_for(event))
    exited = asyncio.ensure_future(proc.wait())
    done, _ = await asyncio.wait({waiter, exited}, return_when=asyncio.FIRST_COMPLETED)
    assert waiter in done, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    _, err = await proc.communicate()
    return Proc(proc.returncode, err.decode())


async def _exact_after_kill(tmp_path: Path, mock: MockServer, event: str) -> None:
    source = conversations(24, max_turns=2)
    write_jsonl(tmp_path / "in.jsonl", source)
    reference = tmp_path / "ref"
    reference.mkdir()
    write_jsonl(reference / "in.jsonl", source)
    ref = await turnstile("run", str(batch_config(reference, mock.base_url)), "--quiet")
    assert ref.returncode == 0, ref.stderr
    expected = by_id(read_jsonl(reference / "out" / "distilled.jsonl"))
    mock.batch.lines_by_id.clear()
    mock.batch.events.clear()

    config = batch_config(tmp_path, mock.base_url)
    if event == "content_half":
        mock.batch.hold_content = True
    killed = await _kill_at(mock, event, config)
    assert killed.returncode == -signal.SIGKILL
    mock.batch.hold_content = False
    mock.batch.release_content()

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 0, result.stderr
    assert by_id(read_jsonl(tmp_path / "out" / "distilled.jsonl")) == expected
    # No line went out twice while its batch could still deliver it.
    assert max(mock.batch.lines_by_id.values()) == 1


async def test_killed_after_upload_resumes_exactly(tmp_path: Path, mock: MockServer) -> None:
    await _exact_after_kill(tmp_path, mock, "upload")


async def test_killed_after_create_resumes_exactly(tmp_path: Path, mock: MockServer) -> None:
    await _exact_after_kill(tmp_path, mock, "create")


async def test_killed_while_polling_resumes_exactly(tmp_path: Path, mock: MockServer) -> None:
    mock.batch.delay_s = 0.3
    await _exact_after_kill(tmp_path, mock, "get")


async def test_killed_while_reading_output_resumes_exactly(
    tmp_path: Path, mock: MockServer
) -> None:
    await _exact_after_kill(tmp_path, mock, "content_half")
