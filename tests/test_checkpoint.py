"""engine.checkpoint.Checkpoint, the single entry point to a run's state on disk, and
engine.checkpoint.files (atomic_write, AppendFile)."""

from __future__ import annotations

from pathlib import Path

import anyio
import orjson
import pytest

from engine.checkpoint.checkpoint import Checkpoint, Outputs, unlocked_read
from engine.checkpoint.durability import JournalConfig
from engine.checkpoint.files import AppendFile, atomic_write
from engine.checkpoint.journal import Replay
from engine.checkpoint.snapshot import SNAPSHOT_NAME, load
from engine.errors import CheckpointError
from engine.history import HISTORY_NAME, Appender
from tests.journal_support import output


def checkpoint(tmp_path: Path) -> Checkpoint:
    out = tmp_path / "out"
    outputs = Outputs(out / "rows.jsonl", out / "rows.failed.jsonl", out / "rows.filtered.jsonl")
    return Checkpoint(tmp_path / "ck", outputs)


def test_atomic_write_replaces_whole_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "state.json"
    atomic_write(path, b"one")
    atomic_write(path, b"two")
    assert path.read_bytes() == b"two"
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]


def test_atomic_write_that_fails_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    atomic_write(path, b"old")
    with pytest.raises(TypeError):
        atomic_write(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_an_append_file_opens_cut_back_to_what_is_vouched_for(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abcdef")
    f = AppendFile(path, 4)
    f.write(b"XY")
    f.rollback(5)
    f.close()
    assert path.read_bytes() == b"abcdX"


def test_an_append_file_writes_pieces_in_order_past_iov_max(tmp_path: Path) -> None:
    path = tmp_path / "f"
    f = AppendFile(path, 0)
    parts = [memoryview(b"<%d>" % i)[1:] if i % 2 else b"<%d>" % i for i in range(5000)]
    f.write_parts(parts)  # more pieces than one writev takes (IOV_MAX, 1024 on Linux)
    f.write_parts([])
    f.close()
    expected = b"".join(parts)
    assert path.read_bytes() == expected and f.size == len(expected)


def test_the_history_appender_drops_a_torn_line_and_counts_the_rest(tmp_path: Path) -> None:
    path = tmp_path / HISTORY_NAME
    path.write_bytes(b'{"a":1}\n{"a":2}\n{"a"')
    appender = Appender(path)
    appender.write(b'{"a":3}\n')
    appender.close()
    assert appender.lines == 2
    assert path.read_bytes() == b'{"a":1}\n{"a":2}\n{"a":3}\n'


def test_the_lock_is_held_once(tmp_path: Path) -> None:
    ck = checkpoint(tmp_path)
    lock = ck.lock()
    try:
        with pytest.raises(CheckpointError):
            checkpoint(tmp_path).lock()
    finally:
        lock.close()
    checkpoint(tmp_path).lock().close()


async def test_the_writer_it_builds_snapshots_and_samples_and_state_reads_it_back(
    tmp_path: Path,
) -> None:
    ck = checkpoint(tmp_path)
    assert ck.manifest is None
    writer = ck.writer(Replay(), JournalConfig(), snapshot_every_rows=3)
    async with anyio.create_task_group() as group:
        group.start_soon(writer.run)
        for line in range(7):
            await writer.record({"k": "t", "l": line, "n": 0})
            await output(writer, line, {"id": f"r{line}"})
        writer.note(b'{"sample":1}\n')
        await writer.close()
    assert (ck.folder / SNAPSHOT_NAME).exists()  # the snapshotter took some
    assert (ck.folder / HISTORY_NAME).read_bytes() == b'{"sample":1}\n'
    state = ck.state()
    assert len(state.done) == 7 and all(line in state.done for line in range(7))
    assert state.out_end == ck.outputs.sizes()[0]
    # The same as snapshot.load given the sizes by hand, without the lock too.
    by_hand = load(ck.folder, *ck.outputs.sizes())
    assert by_hand.done.to_bytes() == ck.read_state().done.to_bytes()
    pairs, _ = ck.emits()
    assert len(pairs) % 2 == 0


def test_a_read_without_the_lock_is_tried_again_then_gives_up() -> None:
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise FileNotFoundError("journal.000002.jsonl")
        return "read"

    assert unlocked_read(flaky) == "read"
    assert len(calls) == 3

    def broken() -> str:
        raise CheckpointError("gone")

    with pytest.raises(CheckpointError):
        unlocked_read(broken)


def test_state_refuses_an_output_shorter_than_the_snapshot_vouches_for(tmp_path: Path) -> None:
    ck = checkpoint(tmp_path)

    async def write() -> None:
        writer = ck.writer(Replay(), JournalConfig(), snapshot_every_rows=1)
        async with anyio.create_task_group() as group:
            group.start_soon(writer.run)
            await output(writer, 0, {"id": "r0"})
            await output(writer, 1, {"id": "r1"})
            await writer.close()

    anyio.run(write)
    ck.outputs.output.write_bytes(orjson.dumps({"id": "r0"}))
    with pytest.raises(CheckpointError, match="vouches"):
        ck.state()
