"""End to end, against the mock's Batch API: a multi-turn run killed mid-conversation,
resumed, leaves every batch marked done in its log (not read again by every later run)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import orjson

from engine.batch.log import log_path, logged_batches, read_log, replay
from engine.testing.mock_server import MockServer
from tests.conftest import by_id, conversations, read_jsonl, start_turnstile, turnstile, write_jsonl
from tests.test_batch_control_run import _cli, _reference, batch_config


async def test_a_batch_of_rows_killed_mid_conversation_is_done_after_the_resumed_run(
    tmp_path: Path, mock: MockServer
) -> None:
    source = conversations(24, max_turns=3)  # rows of 1, 2 and 3 turns
    expected = await _reference(tmp_path, mock, source)
    write_jsonl(tmp_path / "in.jsonl", source)
    config = batch_config(tmp_path, mock.base_url)
    mock.batch.delay_s = 3600  # the second round's batch runs until the kill
    proc = await start_turnstile("run", str(config), "--quiet")
    created = asyncio.ensure_future(mock.batch.wait_for("create", 1))
    await created
    mock.batch.delay_s = 0.0  # the first round completes at its next poll...
    second = asyncio.ensure_future(mock.batch.wait_for("create", 2))
    exited = asyncio.ensure_future(proc.wait())
    done, _ = await asyncio.wait({second, exited}, return_when=asyncio.FIRST_COMPLETED)
    assert second in done, "the run ended before its second round"
    proc.send_signal(signal.SIGKILL)  # ...and the second is killed while it runs
    await proc.communicate()
    log = log_path(tmp_path / "ck", "teacher")
    # The kill fell after the first round's rows journaled their replies and before its
    # batch's "done" record (a window the run has: the rows go on while it is written).
    kept = [r for r in read_log(log) if r["k"] != "done"]
    log.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in kept))
    left = replay(read_log(log))
    assert 0 in left.batches  # the first round's batch is attached again on resume

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 0, result.stderr
    assert by_id(read_jsonl(tmp_path / "out" / "distilled.jsonl")) == expected
    assert max(mock.batch.lines_by_id.values()) == 1  # nothing sent twice
    state = replay(read_log(log))
    assert (state.files, state.batches) == ({}, {})  # every batch done
    batches = logged_batches(read_log(log))
    assert len(batches) == mock.batch.events["create"] == 3
    assert all(b.done for b in batches), batches
    code, out, err = await _cli("status", str(config))
    assert code == 0, err
    assert "batches:    3 (0 running, 3 finished)" in out.splitlines(), out
    # Done: a later run reads none of them again.
    reads = mock.batch.events["content"]
    again = await turnstile("run", str(config), "--quiet")
    assert again.returncode == 0, again.stderr
    assert mock.batch.events["content"] == reads
