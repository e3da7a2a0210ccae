"""Faults a long job meets: damaged checkpoints, a second process, a full disk,
misbehaving servers, hostile input, and secrets that must stay secret."""

from __future__ import annotations

import os
import resource
import signal
from pathlib import Path
from typing import Any

import orjson

from engine.checkpoint.manifest import lock_checkpoint
from engine.testing.mock_server import Faults, MockServer
from tests.conftest import by_id, conversations, read_jsonl, turnstile, write_config, write_jsonl
from tests.test_distill_run import assert_each_turn_answers_its_history


async def _reference(tmp_path: Path, mock: MockServer, source: list[Any]) -> dict[Any, Any]:
    folder = tmp_path / "reference"
    folder.mkdir()
    write_jsonl(folder / "in.jsonl", source)
    done = await turnstile("run", str(write_config(folder, mock.base_url)), "--quiet")
    assert done.returncode == 0, done.stderr
    return by_id(read_jsonl(folder / "out" / "distilled.jsonl"))


async def test_a_damaged_record_is_named_and_repair_redoes_only_its_turn(
    tmp_path: Path, mock: MockServer
) -> None:
    source = conversations(12, max_turns=3)
    expected = await _reference(tmp_path, mock, source)
    write_jsonl(tmp_path / "in.jsonl", source)
    config = write_config(tmp_path, mock.base_url)
    mock.reset()
    assert (await turnstile("run", str(config), "--quiet")).returncode == 0
    turns = mock.stats.total_requests
    # Pretend the run stopped early: keep only turn records, damage one of them.
    journal = tmp_path / "ck" / "journal.jsonl"
    records = [r for r in journal.read_bytes().splitlines() if b'"k":"t"' in r]
    offset = sum(len(r) + 1 for r in records[:3])
    damaged = orjson.loads(records[3])
    kept = [r for r in map(orjson.loads, records) if r != damaged]
    reused = sum(1 for r in kept if r["l"] != damaged["l"] or r["i"] < damaged["i"])
    redo = turns - reused
    records[3] = b'{"k":"t","l":' + b"\x00garbage"
    journal.write_bytes(b"\n".join(records) + b"\n")
    for path in (tmp_path / "out").iterdir():
        path.unlink()
    mock.reset()

    refused = await turnstile("run", str(config), "--quiet")
    assert refused.returncode == 2
    assert str(journal) in refused.stderr and f"byte {offset}" in refused.stderr
    assert "turnstile repair" in refused.stderr

    repaired = await turnstile("repair", str(config))
    assert repaired.returncode == 0, repaired.stderr
    rerun = await turnstile("run", str(config), "--quiet")

    assert rerun.returncode == 0, rerun.stderr
    assert by_id(read_jsonl(tmp_path / "out" / "distilled.jsonl")) == expected
    # Only the damaged turn is asked again, the turns after it in the same
    # conversation (their history held the lost reply), and each row's last turn: a
    # finished row holds that reply itself (the journal's v record stands for it),
    # and the outputs are gone.
    assert mock.stats.total_requests == redo


async def test_a_second_process_on_the_same_checkpoint_is_refused(
    tmp_path: Path, mock: MockServer
) -> None:
    write_jsonl(tmp_path / "in.jsonl", conversations(3))
    config = write_config(tmp_path, mock.base_url)
    holder = lock_checkpoint(tmp_path / "ck")
    try:
        second = await turnstile("run", str(config), "--quiet")
    finally:
        holder.close()

    assert second.returncode == 2
    assert "in use" in second.stderr and f"pid {os.getpid()}" in second.stderr
    assert mock.stats.total_requests == 0
    assert (await turnstile("run", str(config), "--quiet")).returncode == 0  # lock gone


async def test_an_unusable_checkpoint_folder_is_refused_at_start(
    tmp_path: Path, mock: MockServer
) -> None:
    write_jsonl(tmp_path / "in.jsonl", conversations(3))
    (tmp_path / "a-file").write_text("not a folder")
    config = write_config(tmp_path, mock.base_url, checkpoint_dir="a-file/ck")

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 2
    assert "not writable" in result.stderr and "checkpoint_dir" in result.stderr
    assert mock.stats.total_requests == 0


def _limit_file_size(limit: int) -> Any:
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of dying
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


async def test_a_write_failure_stops_resumable_and_corrupts_nothing(
    tmp_path: Path, mock: MockServer
) -> None:
    # A file-size limit makes writes fail mid-run the way a full disk does.
    import asyncio
    import sys

    source = conversations(80, max_turns=4)
    expected = await _reference(tmp_path, mock, source)
    write_jsonl(tmp_path / "in.jsonl", source)
    config = write_config(tmp_path, mock.base_url)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "engine",
        "run",
        str(config),
        "--quiet",
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=_limit_file_size(6000),
    )
    _, err = await proc.communicate()

    assert proc.returncode == 3, err.decode()
    assert "cannot be written" in err.decode() and "resume" in err.decode()
    journal = (tmp_path / "ck" / "journal.jsonl").read_bytes()
    assert journal.endswith(b"\n")  # no half record left behind
    for line in journal.splitlines():
        orjson.loads(line)

    rerun = await turnstile("run", str(config), "--quiet")
    assert rerun.returncode == 0, rerun.stderr
    assert by_id(read_jsonl(tmp_path / "out" / "distilled.jsonl")) == expected


async def test_garbage_bodies_empty_replies_and_hangs_are_retried(
    tmp_path: Path, mock: MockServer
) -> None:
    mock.faults = Faults(rate_malformed=0.2, rate_hang=0.05, seed=11)
    source = conversations(25)
    write_jsonl(tmp_path / "in.jsonl", source)
    config = write_config(
        tmp_path,
        mock.base_url,
        models={
            "teacher": {
                "base_url": mock.base_url,
                "model": "mock",
                "timeout_s": 0.5,
                "params": {"temperature": 0.0},
            }
        },
    )

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 0, result.stderr
    rows = read_jsonl(tmp_path / "out" / "distilled.jsonl")
    assert len(rows) == len(source)
    for row in rows:
        assert_each_turn_answers_its_history(row)
    assert mock.stats.faults["malformed"] > 0 and mock.stats.faults["hang"] > 0


async def test_cut_off_replies_are_recorded_or_failed_as_configured(
    tmp_path: Path, mock: MockServer
) -> None:
    write_jsonl(tmp_path / "in.jsonl", conversations(4))
    teacher = {"base_url": mock.base_url, "model": "mock", "params": {"max_tokens": 3}}
    kept = write_config(tmp_path, mock.base_url, name="kept", models={"teacher": teacher})
    result = await turnstile("run", str(kept), "--quiet")
    assert result.returncode == 0, result.stderr
    for row in read_jsonl(tmp_path / "out" / "distilled.jsonl"):
        turns = sum(1 for m in row["messages"] if m["role"] == "assistant")
        assert row["truncated_turns"] == list(range(turns))

    strict = write_config(
        tmp_path,
        mock.base_url,
        name="strict",
        checkpoint_dir="ck-strict",
        output="out/strict.jsonl",
        models={"teacher": {**teacher, "fail_on_length": True}},
    )
    failed = await turnstile("run", str(strict), "--quiet")
    assert failed.returncode == 1
    errors = read_jsonl(tmp_path / "out" / "strict.failed.jsonl")
    assert len(errors) == 4 and all("max_tokens" in e["error"] for e in errors)


async def test_a_context_length_400_fails_the_row_with_the_servers_message(
    tmp_path: Path, mock: MockServer
) -> None:
    write_jsonl(tmp_path / "in.jsonl", conversations(2))
    mock.faults = Faults(fail_models={"mock": 400})
    config = write_config(tmp_path, mock.base_url)

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 1
    errors = read_jsonl(tmp_path / "out" / "distilled.failed.jsonl")
    assert all(e["error"].startswith("HTTP 400: ") and len(e["error"]) > 10 for e in errors)


async def test_hostile_input_lines_are_reported_and_the_rest_processed(
    tmp_path: Path, mock: MockServer
) -> None:
    good = {"id": "good", "messages": [{"role": "user", "content": "hello there"}]}
    big = {"id": "big", "prompt": "a short question", "padding": "x" * (50 * 1024 * 1024)}
    lines = [
        b"\xef\xbb\xbf" + orjson.dumps(good) + b"\r",  # BOM and CRLF
        b"",  # blank
        b'{"id": "latin1", "prompt": "caf\xe9"}',  # invalid UTF-8
        orjson.dumps({"id": "empty", "messages": [{"role": "user", "content": "  "}]}),
        orjson.dumps({"id": "types", "messages": [{"role": "user", "content": 7}]}),
        orjson.dumps(
            {
                "id": "order",
                "messages": [
                    {"role": "assistant", "content": "an assistant speaks first"},
                    {"role": "user", "content": "then a user"},
                ],
            }
        ),
        orjson.dumps(big),
        b"{" + b"y" * (50 * 1024 * 1024),  # a 50 MB line that is not JSON
        orjson.dumps({**good, "note": "the same id again"}) + b"\r",
    ]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\r\n")
    config = write_config(tmp_path, mock.base_url)

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 1, result.stderr
    rows = read_jsonl(tmp_path / "out" / "distilled.jsonl")
    assert sorted(r["id"] for r in rows) == ["big", "good", "good", "order"]
    assert next(r for r in rows if r["id"] == "big")["padding"] == big["padding"]
    failed = {f["line"]: f for f in read_jsonl(tmp_path / "out" / "distilled.failed.jsonl")}
    assert sorted(failed) == [2, 3, 4, 7]
    assert "UTF-8" in failed[2]["error"]
    assert "empty" in failed[3]["error"]
    assert "content" in failed[4]["error"]
    assert "not valid JSON" in failed[7]["error"]


async def test_the_api_key_is_sent_but_never_written_anywhere(
    tmp_path: Path, mock: MockServer
) -> None:
    secret = "sk-turnstile-test-0123456789abcdef"
    write_jsonl(tmp_path / "in.jsonl", conversations(5))
    mock.faults = Faults(fail_models={"mock": 401})
    teacher = {"base_url": mock.base_url, "model": "mock", "api_key_env": "TURNSTILE_TEST_KEY"}
    config = write_config(tmp_path, mock.base_url, models={"teacher": teacher})

    result = await turnstile("run", str(config), env={"TURNSTILE_TEST_KEY": secret})

    assert result.returncode == 3  # a refused key stops the run: it is the model's, not a row's
    assert secret not in result.stderr
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    assert mock.stats.authorizations == {f"Bearer {secret}"}
