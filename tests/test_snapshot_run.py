"""Snapshots in real runs: SIGKILLs while they are taken, old checkpoints, export, status."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from engine.checkpoint.journal import JOURNAL_NAME, segments
from engine.checkpoint.snapshot import SNAPSHOT_NAME, read_snapshot
from engine.history import HISTORY_NAME
from engine.report import REPORT_NAME
from engine.testing.mock_server import MockServer
from tests.conftest import (
    by_id,
    conversations,
    kill_after,
    read_jsonl,
    start_turnstile,
    turnstile,
    write_config,
    write_jsonl,
)
from tests.test_distill_run import expected_turns

EVERY = "--snapshot-every-rows"  # a hidden option of `turnstile run`


async def stdout(*args: str) -> str:
    proc = await start_turnstile(*args)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return bytes(out).decode()


async def uninterrupted(folder: Path, mock: MockServer, source: list[Any]) -> tuple[Any, Any]:
    """The rows of a run nobody stopped, by id, and its export in input order."""
    folder.mkdir()
    write_jsonl(folder / "in.jsonl", source)
    config = str(write_config(folder, mock.base_url))
    done = await turnstile("run", config, "--quiet")
    assert done.returncode == 0, done.stderr
    await stdout("export", config, "--format", "jsonl", "--to", str(folder / "sorted.jsonl"))
    return by_id(read_jsonl(folder / "out" / "distilled.jsonl")), read_jsonl(
        folder / "sorted.jsonl"
    )


def journal_files(checkpoint: Path) -> list[str]:
    """The checkpoint's files, its history (metrics.jsonl) and report left out."""
    return sorted(p.name for p in checkpoint.iterdir() if p.name not in (HISTORY_NAME, REPORT_NAME))


def journal_bytes(checkpoint: Path) -> int:
    return sum(path.stat().st_size for _, path in segments(checkpoint))


async def test_sigkills_while_snapshots_are_taken_lose_and_repeat_nothing(
    tmp_path: Path, mock: MockServer
) -> None:
    source = conversations(160, max_turns=6)
    expected, expected_sorted = await uninterrupted(tmp_path / "reference", mock, source)
    whole_journal = journal_bytes(tmp_path / "reference" / "ck")

    mock.reset()
    mock.latency_ms = 5
    write_jsonl(tmp_path / "in.jsonl", source)
    cap = 8
    config = str(write_config(tmp_path, mock.base_url, cap=cap))
    checkpoint = tmp_path / "ck"
    kills = (100, 220, 340)
    for at in kills:
        killed = await kill_after(mock, at, "run", config, "--quiet", EVERY, "3")
        assert killed.returncode == -signal.SIGKILL
        snapshot = read_snapshot(checkpoint)
        assert snapshot is not None and snapshot.first_segment > 0
        # What a resume reads: the segments from the snapshot's on (older ones are
        # gone, or about to be if the kill fell between a snapshot and the drop).
        assert "finished:" in await stdout("status", config)

    rerun = await turnstile("run", config, "--quiet", EVERY, "3")

    assert rerun.returncode == 0, rerun.stderr
    assert "resuming" in rerun.stderr
    assert by_id(read_jsonl(tmp_path / "out" / "distilled.jsonl")) == expected
    requests = mock.stats.requests_by_key
    repeated = sum(count - 1 for count in requests.values() if count > 1)
    assert repeated <= len(kills) * 2 * cap  # only turns in flight at each kill
    assert len(requests) == sum(expected_turns(s) for s in source)  # every turn asked
    snapshot = read_snapshot(checkpoint)
    assert snapshot is not None
    assert [n for n, _ in segments(checkpoint)] == [snapshot.first_segment]
    assert not (checkpoint / JOURNAL_NAME).exists()
    assert journal_bytes(checkpoint) < whole_journal / 4
    sorted_out = tmp_path / "sorted.jsonl"
    await stdout("export", config, "--format", "jsonl", "--to", str(sorted_out))
    assert read_jsonl(sorted_out) == expected_sorted  # export reads the emits index
    assert "160 rows (160 ok, 0 failed)" in await stdout("status", config)


async def test_an_old_single_journal_checkpoint_resumes_into_segments(
    tmp_path: Path, mock: MockServer
) -> None:
    source = conversations(60, max_turns=4)
    expected, expected_sorted = await uninterrupted(tmp_path / "reference", mock, source)
    mock.reset()
    mock.latency_ms = 5
    write_jsonl(tmp_path / "in.jsonl", source)
    config = str(write_config(tmp_path, mock.base_url))
    checkpoint = tmp_path / "ck"
    # No snapshot is due in a run this small: the checkpoint is what a version
    # before snapshots left, its one journal.
    killed = await kill_after(mock, 60, "run", config, "--quiet")
    assert killed.returncode == -signal.SIGKILL
    assert journal_files(checkpoint) == [JOURNAL_NAME, "lock", "manifest.json"]

    rerun = await turnstile("run", config, "--quiet", EVERY, "2")

    assert rerun.returncode == 0, rerun.stderr
    assert by_id(read_jsonl(tmp_path / "out" / "distilled.jsonl")) == expected
    assert (checkpoint / SNAPSHOT_NAME).exists()
    assert not (checkpoint / JOURNAL_NAME).exists()
    sorted_out = tmp_path / "sorted.jsonl"
    await stdout("export", config, "--format", "jsonl", "--to", str(sorted_out))
    assert read_jsonl(sorted_out) == expected_sorted
    repaired = await turnstile("repair", config)
    assert repaired.returncode == 0, repaired.stderr

    fresh = await turnstile("run", config, "--quiet", "--fresh")
    assert fresh.returncode == 0, fresh.stderr
    assert journal_files(checkpoint) == [JOURNAL_NAME, "lock", "manifest.json"]
    assert by_id(read_jsonl(tmp_path / "out" / "distilled.jsonl")) == expected


async def test_a_resume_seeks_past_the_finished_part_of_the_input(
    tmp_path: Path, mock: MockServer
) -> None:
    # Rows of about 4 KB: 1,500 of them are six of the reader's 1 MB chunks, so the
    # marks it notes fall inside the file and a snapshot can vouch for a prefix.
    pad = "p" * 4000
    source = [{"id": f"r{i}", "prompt": f"question {i}", "pad": pad} for i in range(1500)]
    expected, _ = await uninterrupted(tmp_path / "reference", mock, source)
    mock.reset()
    path = write_jsonl(tmp_path / "in.jsonl", source)
    config = str(write_config(tmp_path, mock.base_url, cap=4))
    killed = await kill_after(mock, 1200, "run", config, "--quiet", EVERY, "50")
    assert killed.returncode == -signal.SIGKILL
    snapshot = read_snapshot(tmp_path / "ck")
    assert snapshot is not None
    line, offset = snapshot.seek
    assert line >= 250 and offset > 1 << 20  # past at least one chunk
    assert all(n in snapshot.done for n in range(line))

    # Overwrite everything before the seek with one run of bytes without a newline,
    # keeping the size and mtime, so the input's fingerprint still matches: a resume
    # that read it would number every line after it wrongly and lose rows.
    data = path.read_bytes()
    stat = path.stat()
    path.write_bytes(b"#" * offset + data[offset:])
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    rerun = await turnstile("run", config, "--quiet", EVERY, "50")

    assert rerun.returncode == 0, rerun.stderr
    assert by_id(read_jsonl(tmp_path / "out" / "distilled.jsonl")) == expected
    assert not read_jsonl(tmp_path / "out" / "distilled.failed.jsonl")
    requests = mock.stats.requests_by_key
    assert sum(count - 1 for count in requests.values() if count > 1) <= 2 * 4
