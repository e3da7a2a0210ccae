"""``engine.batch.log``: what replaying a batch model's records says."""

from __future__ import annotations

from pathlib import Path

import orjson

from engine.batch.log import FileLog, LoggedBatch, log_path, logged_batches, read_log, replay


def test_replay_keeps_files_without_a_batch_and_batches_not_done() -> None:
    state = replay(
        [
            {"k": "file", "seq": 0, "file": "f0"},
            {"k": "batch", "seq": 0, "file": "f0", "batch": "b0"},
            {"k": "file", "seq": 1, "file": "f1"},
            {"k": "batch", "seq": 1, "file": "f1", "batch": "b1"},
            {"k": "done", "batch": "b0"},
            {"k": "file", "seq": 2, "file": "f2"},  # killed before its batch was journaled
        ]
    )
    assert state.files == {2: "f2"}
    assert state.batches == {1: ("f1", "b1")}
    assert state.next_seq == 3


def test_replay_of_nothing_starts_at_sequence_zero() -> None:
    state = replay([])
    assert (state.files, state.batches, state.next_seq) == ({}, {}, 0)


def test_logged_batches_carry_the_last_known_state() -> None:
    records = [
        {"k": "file", "seq": 0, "file": "f0"},
        {
            "k": "batch",
            "seq": 0,
            "file": "f0",
            "batch": "b0",
            "status": "in_progress",
            "total": 30,
            "created_at": 1000,
        },
        {"k": "file", "seq": 1, "file": "f1"},
        {"k": "batch", "seq": 1, "file": "f1", "batch": "b1"},  # an older record: no fields
        {
            "k": "done",
            "batch": "b0",
            "status": "expired",
            "completed": 15,
            "failed": 15,
            "total": 30,
        },
        {"k": "file", "seq": 2, "file": "f2"},
    ]
    assert logged_batches(records) == [
        LoggedBatch(
            0,
            "f0",
            "b0",
            done=True,
            status="expired",
            completed=15,
            failed=15,
            total=30,
            created_at=1000.0,
        ),
        LoggedBatch(1, "f1", "b1", status="unknown"),
        LoggedBatch(2, "f2", "", status="uploaded"),
    ]


def test_a_torn_last_line_is_dropped(tmp_path: Path) -> None:
    path = log_path(tmp_path, "teacher")
    assert path.name == "batches.teacher.jsonl"
    good = {"k": "file", "seq": 0, "file": "f0"}
    path.write_bytes(orjson.dumps(good) + b'\n{"k": "batch", "se')
    assert read_log(path) == [good]
    assert read_log(tmp_path / "missing.jsonl") == []


async def test_a_file_log_appends_and_replays(tmp_path: Path) -> None:
    log = FileLog(tmp_path / "ck" / "batches.m.jsonl")
    await log.record({"k": "file", "seq": 0, "file": "f0"})
    await log.record({"k": "batch", "seq": 0, "file": "f0", "batch": "b0"})
    assert replay(log.replay()).batches == {0: ("f0", "b0")}
