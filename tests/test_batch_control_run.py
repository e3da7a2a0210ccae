"""End to end, against the mock's Batch API: stopping a run that has batches running,
``turnstile status`` and ``turnstile cancel``, a preference run on batch models, and a
resumed run that collects its batches once."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import orjson
import yaml

from engine.batch.log import log_path, read_log, replay
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
from tests.test_preference_run import prefs_config, prompts

BATCH = {"max_requests": 1000, "max_batches": 2, "poll_s": 0.05, "flush_s": 30}
DEAD_URL = "http://127.0.0.1:9/v1"  # nothing listens: the provider cannot be reached


def batch_config(folder: Path, url: str, *, name: str = "run") -> Path:
    config = write_config(folder, url, name=name, shutdown_grace_s=0.2)
    raw = yaml.safe_load(config.read_text())
    raw["models"]["teacher"]["batch"] = dict(BATCH)
    config.write_text(yaml.safe_dump(raw))
    return config


async def _cli(*args: str) -> tuple[int, str, str]:
    proc = await start_turnstile(*args)
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _stop_after_create(mock: MockServer, config: Path, sig: int) -> Proc:
    proc = await start_turnstile("run", str(config), "--quiet")
    waiter = asyncio.ensure_future(mock.batch.wait_for("create"))
    exited = asyncio.ensure_future(proc.wait())
    done, _ = await asyncio.wait({waiter, exited}, return_when=asyncio.FIRST_COMPLETED)
    assert waiter in done, "the run ended before it could be stopped"
    proc.send_signal(sig)
    _, err = await proc.communicate()
    return Proc(proc.returncode, err.decode())


async def _reference(tmp_path: Path, mock: MockServer, source: list[dict[str, Any]]) -> Any:
    folder = tmp_path / "ref"
    folder.mkdir()
    write_jsonl(folder / "in.jsonl", source)
    ref = await turnstile("run", str(batch_config(folder, mock.base_url)), "--quiet")
    assert ref.returncode == 0, ref.stderr
    mock.batch.lines_by_id.clear()
    mock.batch.events.clear()
    return by_id(read_jsonl(folder / "out" / "distilled.jsonl"))


def _running(mock: MockServer) -> list[str]:
    return [bid for bid, b in mock.batch.batches.items() if b["status"] == "in_progress"]


async def test_sigterm_leaves_batches_running_names_them_and_the_next_run_collects_them(
    tmp_path: Path, mock: MockServer
) -> None:
    source = conversations(20, max_turns=1)
    expected = await _reference(tmp_path, mock, source)
    write_jsonl(tmp_path / "in.jsonl", source)
    config = batch_config(tmp_path, mock.base_url)
    mock.batch.delay_s = 3600  # the batch runs until the test says otherwise

    stopped = await _stop_after_create(mock, config, signal.SIGTERM)

    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    [batch_id] = _running(mock)  # left running: it is paid for
    assert (
        "models.teacher: 1 batch(es) left running (paid for; the next run collects them, "
        f"`turnstile cancel` cancels them): {batch_id}"
    ) in stopped.stderr.splitlines()
    code, out, err = await _cli("status", str(config))
    assert code == 0, err
    assert "batches:    1 (1 running, 0 finished)" in out.splitlines()
    line = f"  teacher {batch_id}: in_progress, 0 done / 0 failed / 20 total, age "
    assert any(x.startswith(line) for x in out.splitlines()), out

    mock.batch.delay_s = 0.0
    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 0, result.stderr
    assert by_id(read_jsonl(tmp_path / "out" / "distilled.jsonl")) == expected
    assert mock.batch.events["create"] == 1  # collected, not sent again
    assert max(mock.batch.lines_by_id.values()) == 1
    assert mock.stats.total_requests == 0
    # Its provider unreachable, status shows what the records last knew.
    dead = batch_config(tmp_path, DEAD_URL, name="dead")
    code, out, err = await _cli("status", str(dead))
    assert code == 0, err
    line = f"  teacher {batch_id}: completed (last known), 20 done / 0 failed / 20 total, age "
    assert any(x.startswith(line) for x in out.splitlines()), out


async def test_cancel_cancels_the_runs_running_batches_and_a_run_sends_the_rest_again(
    tmp_path: Path, mock: MockServer
) -> None:
    source = conversations(12, max_turns=1)
    expected = await _reference(tmp_path, mock, source)
    write_jsonl(tmp_path / "in.jsonl", source)
    config = batch_config(tmp_path, mock.base_url)
    mock.batch.delay_s = 3600
    stopped = await _stop_after_create(mock, config, signal.SIGINT)
    assert stopped.returncode == 128 + signal.SIGINT, stopped.stderr
    [batch_id] = _running(mock)

    code, out, err = await _cli("cancel", str(config))

    assert code == 0, err
    assert out == f"cancelled teacher {batch_id} (cancelling)\n"
    assert mock.batch.events["cancel"] == 1
    code, out, err = await _cli("cancel", str(config))  # nothing left running
    assert (code, out) == (0, f"no running batches in {tmp_path / 'ck'}\n"), err
    code, out, _ = await _cli("status", str(config))
    assert f"  teacher {batch_id}: cancelled, 0 done / 0 failed / 12 total" in out

    mock.batch.delay_s = 0.0
    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 0, result.stderr
    assert by_id(read_jsonl(tmp_path / "out" / "distilled.jsonl")) == expected
    assert mock.batch.events["create"] == 2  # the cancelled lines, in a new batch
    assert mock.stats.total_requests == 0


async def test_cancel_says_so_when_the_provider_cannot_be_reached(
    tmp_path: Path, mock: MockServer
) -> None:
    write_jsonl(tmp_path / "in.jsonl", conversations(4, max_turns=1))
    mock.batch.delay_s = 3600
    stopped = await _stop_after_create(mock, batch_config(tmp_path, mock.base_url), signal.SIGTERM)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr

    code, out, err = await _cli("cancel", str(batch_config(tmp_path, DEAD_URL, name="dead")))

    assert (code, out) == (3, "")
    assert err.startswith("error: GET /batches/") and "run it again" in err
    assert _running(mock)


async def test_a_resumed_run_marks_a_batch_of_finished_rows_done_once(
    tmp_path: Path, mock: MockServer
) -> None:
    source = conversations(24, max_turns=1)
    write_jsonl(tmp_path / "in.jsonl", source)
    config = batch_config(tmp_path, mock.base_url)
    first = await turnstile("run", str(config), "--quiet")
    assert first.returncode == 0, first.stderr
    expected = read_jsonl(tmp_path / "out" / "distilled.jsonl")
    # A kill after the rows were journaled, before the batch's "done" record.
    log = log_path(tmp_path / "ck", "teacher")
    kept = [r for r in read_log(log) if r["k"] != "done"]
    log.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in kept))
    assert replay(read_log(log)).batches  # the batch is attached again on resume
    reads = mock.batch.events["content"]

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 0, result.stderr
    assert mock.batch.events["content"] > reads  # read again once: its rows are done
    state = replay(read_log(log))
    assert (state.files, state.batches) == ({}, {})  # so it is done now
    reads = mock.batch.events["content"]
    again = await turnstile("run", str(config), "--quiet")
    assert again.returncode == 0, again.stderr
    assert mock.batch.events["content"] == reads  # and never read again
    assert read_jsonl(tmp_path / "out" / "distilled.jsonl") == expected
    assert mock.batch.events["create"] == 1


async def test_a_preference_run_on_batch_generators_and_judge(
    tmp_path: Path, mock: MockServer
) -> None:
    source = prompts(12)
    online = tmp_path / "online"
    online.mkdir()
    write_jsonl(online / "in.jsonl", source)
    ref = await turnstile("run", str(prefs_config(online, mock.base_url)), "--quiet")
    assert ref.returncode == 0, ref.stderr
    expected = by_id(read_jsonl(online / "out" / "prefs.jsonl"))
    online_requests = mock.stats.total_requests
    write_jsonl(tmp_path / "in.jsonl", source)
    config = prefs_config(tmp_path, mock.base_url, num_generations=1)
    raw = yaml.safe_load(config.read_text())
    for model in raw["models"].values():
        model["batch"] = dict(BATCH)
    config.write_text(yaml.safe_dump(raw))

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 0, result.stderr
    rows = by_id(read_jsonl(tmp_path / "out" / "prefs.jsonl"))
    assert set(rows) == set(expected)
    for key, row in rows.items():
        want = expected[key]
        for field in ("prompt", "generations", "generation_models", "ratings", "chosen"):
            assert row[field] == want[field], (key, field)
    assert mock.stats.total_requests == online_requests  # nothing went online
    # One round each: both generators' batches, then the judge's.
    assert mock.batch.events["create"] == 3
    assert max(mock.batch.lines_by_id.values()) == 1
    assert len(mock.batch.lines_by_id) == len(source) * 3
    summary = [x for x in result.stderr.splitlines() if x.startswith("model judge:")]
    assert summary and "1 batches submitted, 1 done" in summary[0], result.stderr
