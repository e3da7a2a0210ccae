"""The single writer: records on disk before the caller goes on, emits that vouch for rows."""

from __future__ import annotations

import errno
import os
import random
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from engine.checkpoint import snapshotter as snapshotter_module
from engine.checkpoint.journal import Replay, encode, segment_path, segments
from engine.checkpoint.snapshot import SNAPSHOT_NAME, emit_sources, load, read_snapshot
from engine.checkpoint.snapshotter import SNAPSHOT_EVERY_BYTES, Snapshotter
from engine.checkpoint.writer import HANDOVER_ROWS, Writer
from engine.config import JournalConfig
from engine.errors import CheckpointError
from tests.journal_support import output, replay

PROC_FD = Path("/proc/self/fd")


class Files:
    def __init__(self, folder: Path) -> None:
        self.journal = folder / "ck" / "journal.jsonl"
        self.out = folder / "out" / "rows.jsonl"
        self.failed = folder / "out" / "rows.failed.jsonl"

    def writer(
        self,
        policy: JournalConfig | None = None,
        *,
        journal_end: int = 0,
        out_end: int = 0,
        failed_end: int = 0,
    ) -> Writer:
        return Writer(
            self.journal,
            self.out,
            self.failed,
            journal_end=journal_end,
            out_end=out_end,
            failed_end=failed_end,
            policy=policy or JournalConfig(),
        )

    def size(self, path: Path) -> int:
        return path.stat().st_size if path.exists() else 0

    def replay(self) -> Any:
        return replay(self.journal, self.size(self.out), self.size(self.failed))

    def contents(self) -> tuple[bytes, bytes, bytes]:
        return self.journal.read_bytes(), self.out.read_bytes(), self.failed.read_bytes()


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return Files(tmp_path)


@asynccontextmanager
async def running(writer: Writer) -> AsyncIterator[Writer]:
    """The writer loop in a task group, closed (flushed, fsynced) on the way out."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(writer.run)
        try:
            yield writer
        finally:
            await writer.close()


def turn(line: int, i: int) -> dict[str, Any]:
    return {"k": "t", "l": line, "i": i, "c": f"reply {line}.{i}", "p": 1, "o": 1, "f": "stop"}


def row(line: int) -> dict[str, Any]:
    return {"id": f"r{line}", "messages": [{"role": "user", "content": "é" * line}]}


def line_bytes(obj: dict[str, Any]) -> bytes:
    return orjson.dumps(obj) + b"\n"


def open_paths() -> set[str]:
    paths = set()
    for fd in PROC_FD.iterdir():
        try:
            paths.add(os.readlink(fd))
        except OSError:
            pass
    return paths


# --- records reach the file before the caller goes on -----------------------------------


async def test_a_record_is_in_the_file_when_record_returns(files: Files) -> None:
    async with running(files.writer()) as writer:
        await writer.record(turn(0, 0))
        assert files.journal.read_bytes() == encode(turn(0, 0))
        await writer.record(turn(0, 1))
        assert files.journal.read_bytes() == encode(turn(0, 0)) + encode(turn(0, 1))


async def test_a_row_and_its_emit_are_in_the_files_when_output_returns(files: Files) -> None:
    async with running(files.writer()) as writer:
        await writer.record(turn(3, 0))
        await output(writer, 3, row(3))
        assert files.out.read_bytes() == line_bytes(row(3))
        state = files.replay()
        assert 3 in state.done
        assert state.out_end == files.size(files.out)
        assert state.partial == {}


async def test_a_handed_over_row_is_written_with_the_batch_its_caller_did_not_wait_for(
    files: Files,
) -> None:
    async with running(files.writer()) as writer:
        assert writer.hand_over(3, row(3), [turn(3, 0)]) is None  # nothing to wait for
        assert files.size(files.out) == 0  # not yet: at the end of this loop pass
        await writer.record(turn(4, 0))  # joins the same batch, and waits for it
        assert files.out.read_bytes() == line_bytes(row(3))
        state = files.replay()
        assert 3 in state.done and state.partial == {4: [turn(4, 0)]}


async def test_hand_over_returns_the_wait_when_a_row_must_be_on_disk_first(
    files: Files, fsyncs: list[str]
) -> None:
    async with running(files.writer(JournalConfig(fsync="always"))) as writer:
        wait = writer.hand_over(0, row(0))
        assert wait is not None  # fsync: always: the caller goes on once it is synced
        await wait
        assert files.out.read_bytes() == line_bytes(row(0))
        assert str(files.out.resolve()) in fsyncs


async def test_hand_over_makes_its_caller_wait_once_a_batch_holds_handover_rows(
    files: Files,
) -> None:
    async with running(files.writer()) as writer:
        waits = [writer.hand_over(line, row(0)) for line in range(HANDOVER_ROWS)]
        assert waits[:-1] == [None] * (HANDOVER_ROWS - 1)
        last = waits[-1]
        assert last is not None  # the bound: the batch's rows are written before it goes on
        await last
        assert len(files.out.read_bytes().splitlines()) == HANDOVER_ROWS
        assert len(files.replay().done) == HANDOVER_ROWS


async def test_concurrent_callers_all_land_and_every_emit_vouches(files: Files) -> None:
    async def conversation(line: int) -> None:
        for i in range(3):
            await writer.record(turn(line, i))
        if line % 4 == 3:
            await writer.failed(line, {"id": f"r{line}", "error": "boom"})
        else:
            await output(writer, line, row(line))

    async with running(files.writer()) as writer, anyio.create_task_group() as tg:
        for line in range(40):
            tg.start_soon(conversation, line)

    state = files.replay()
    assert sorted(n for n in range(40) if n in state.done) == list(range(40))
    assert len(state.done) == 40
    assert state.rows_ok == 30 and state.rows_failed == 10
    assert state.out_end == files.size(files.out)
    assert state.failed_end == files.size(files.failed)
    assert state.journal_end == files.size(files.journal)
    assert state.work_records == 120
    assert state.partial == {}
    written = sorted(orjson.loads(x)["id"] for x in files.out.read_bytes().splitlines())
    assert written == sorted(f"r{n}" for n in range(40) if n % 4 != 3)


async def test_emit_end_offsets_are_each_rows_end(files: Files) -> None:
    async with running(files.writer()) as writer:
        await output(writer, 0, row(0))
        await output(writer, 5, row(5))
        await writer.failed(2, {"id": "r2"})
    ends = {
        (rec["k"], rec["l"]): rec["e"]
        for rec in map(orjson.loads, files.journal.read_bytes().splitlines())
        if rec["k"] in ("o", "x", "q")  # (an output row's v record has an end too)
    }
    first = len(line_bytes(row(0)))
    assert ends == {
        ("o", 0): first,
        ("o", 5): first + len(line_bytes(row(5))),
        ("x", 2): len(line_bytes({"id": "r2"})),
    }


# --- reopening ---------------------------------------------------------------------------


async def test_opening_truncates_what_the_journal_does_not_vouch_for(files: Files) -> None:
    async with running(files.writer()) as writer:
        await writer.record(turn(0, 0))
        await output(writer, 0, row(0))
    state = files.replay()
    vouched = files.contents()
    # A crash after the output write but before its emit: bytes nobody vouches for.
    with files.out.open("ab") as f:
        f.write(line_bytes(row(1)))
    with files.journal.open("ab") as f:
        f.write(b'{"k":"t","l":1,"i":0,"c":"to')  # a torn record
    with files.failed.open("ab") as f:
        f.write(b"junk\n")

    writer = files.writer(
        journal_end=state.journal_end, out_end=state.out_end, failed_end=state.failed_end
    )
    assert files.contents() == vouched  # cut back as soon as it is opened
    async with running(writer) as writer:
        await output(writer, 1, row(1))

    state = files.replay()
    assert len(state.done) == 2
    assert files.out.read_bytes() == line_bytes(row(0)) + line_bytes(row(1))
    assert state.out_end == files.size(files.out)
    assert state.journal_end == files.size(files.journal)
    assert state.damaged == []


async def test_opening_creates_missing_folders_and_files(files: Files) -> None:
    async with running(files.writer()):
        pass
    assert files.contents() == (b"", b"", b"")


# --- close and fsync ---------------------------------------------------------------------


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Paths passed to os.fsync (the real one still runs)."""
    if not PROC_FD.is_dir():
        pytest.skip("needs /proc/self/fd to name file descriptors")
    synced: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(PROC_FD / str(fd)))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return synced


async def test_close_fsyncs_and_closes_every_file(files: Files, fsyncs: list[str]) -> None:
    # A long interval: nothing is due before close, so the fsyncs seen are close()'s.
    writer = files.writer(JournalConfig(fsync="interval", fsync_interval_s=3600))
    ours = {str(p.resolve()) for p in (files.journal, files.out, files.failed)}
    assert ours <= open_paths()
    async with running(writer):
        await writer.record(turn(0, 0))
        await output(writer, 0, row(0))
        await writer.failed(1, {"id": "r1"})
        assert fsyncs == []
    assert set(fsyncs) == ours
    assert not ours & open_paths()


async def test_close_does_not_fsync_clean_files(files: Files, fsyncs: list[str]) -> None:
    writer = files.writer(JournalConfig(fsync="interval", fsync_interval_s=3600))
    async with running(writer):
        await writer.record(turn(0, 0))
    assert fsyncs == [str(files.journal.resolve())]


async def test_fsync_always_syncs_every_write(files: Files, fsyncs: list[str]) -> None:
    async with running(files.writer(JournalConfig(fsync="always"))) as writer:
        journal, out = str(files.journal.resolve()), str(files.out.resolve())
        await writer.record(turn(0, 0))
        assert fsyncs == [journal]
        await output(writer, 0, row(0))
        assert fsyncs == [journal, out, journal]  # the row before the emit that vouches


async def test_fsync_never_leaves_it_to_the_os(files: Files, fsyncs: list[str]) -> None:
    writer = files.writer(JournalConfig(fsync="never"))
    async with running(writer):
        await writer.record(turn(0, 0))
        await output(writer, 0, row(0))
    assert fsyncs == []
    assert not {str(files.journal.resolve()), str(files.out.resolve())} & open_paths()


async def _script(writer: Writer) -> None:
    for line in range(12):
        await writer.record(turn(line, 0))
        await writer.record(turn(line, 1))
        if line % 3 == 0:
            await writer.failed(line, {"id": line, "error": "permanent"})
        else:
            await output(writer, line, row(line))


async def test_every_fsync_mode_writes_the_same_bytes(tmp_path: Path) -> None:
    results = []
    for mode in ("always", "never", "interval"):
        files = Files(tmp_path / mode)
        async with running(files.writer(JournalConfig(fsync=mode, fsync_interval_s=0.001))) as w:
            await _script(w)
        results.append(files.contents())
    assert results[0] == results[1] == results[2]
    journal, out, failed = results[0]
    assert len(journal.splitlines()) == 12 * 3 + 8  # two turns, an emit; a v per output row
    assert len(out.splitlines()) == 8 and len(failed.splitlines()) == 4


# --- after close -------------------------------------------------------------------------


async def test_close_flushes_what_is_pending(files: Files) -> None:
    writer = files.writer()
    done: list[int] = []

    async def add(line: int) -> None:
        await output(writer, line, row(line))
        done.append(line)

    async with anyio.create_task_group() as tg:
        tg.start_soon(writer.run)
        for line in range(5):
            tg.start_soon(add, line)
        await anyio.wait_all_tasks_blocked()
        await writer.close()
    assert sorted(done) == [0, 1, 2, 3, 4]
    assert len(files.replay().done) == 5


# --- snapshots ---------------------------------------------------------------------------

Op = tuple[str, int, int]  # (what, line, turn): "t" a turn, "o"/"x"/"q" the row's end


def script(seed: int, lines: int = 40) -> list[Op]:
    """Rows interleaved as a run's workers write them, some left in progress."""
    rng = random.Random(seed)
    ops: list[Op] = []
    waiting, open_rows = list(range(lines)), []
    turns = {line: 0 for line in waiting}
    while waiting or open_rows:
        if waiting and (len(open_rows) < 5 or not open_rows):
            open_rows.append(waiting.pop(rng.randrange(len(waiting))))
        line = rng.choice(open_rows)
        if rng.random() < 0.6:
            ops.append(("t", line, turns[line]))
            turns[line] += 1
        elif rng.random() < 0.15:
            open_rows.remove(line)  # in progress when the run stopped
        else:
            ops.append((rng.choice("oooooxq"), line, turns[line]))
            open_rows.remove(line)
    return ops


async def play(writer: Writer, ops: list[Op]) -> None:
    for what, line, i in ops:
        if what == "t":
            await writer.record(turn(line, i))
        elif what == "o":
            await output(writer, line, row(line), [turn(line, i)] if i % 2 else [])
        elif what == "x":
            await writer.failed(line, {"id": f"r{line}", "error": "permanent"})
        else:
            await writer.filtered(line, {**row(line), "filtered": "too short"})


class Run:
    """A checkpoint folder written by a writer that takes snapshots (or, with
    ``every=None``, by one that does not: the reference)."""

    def __init__(self, folder: Path) -> None:
        self.ck = folder / "ck"
        self.outputs = [folder / "out" / f"rows.{k}.jsonl" for k in ("ok", "failed", "filtered")]

    def sizes(self) -> tuple[int, int, int]:
        a, b, c = (p.stat().st_size if p.exists() else 0 for p in self.outputs)
        return a, b, c

    def load(self) -> Replay:
        return load(self.ck, *self.sizes())

    def writer(self, state: Replay | None, every: int | None = 3, **kw: Any) -> Writer:
        state = state or Replay()
        snapshots = None
        if every is not None:
            snapshots = Snapshotter(
                self.ck,
                state,
                every_rows=every,
                every_bytes=kw.pop("snapshot_every_bytes", SNAPSHOT_EVERY_BYTES),
            )
        return Writer(
            segment_path(self.ck, state.segment),
            self.outputs[0],
            self.outputs[1],
            filtered=self.outputs[2],
            journal_end=state.journal_end,
            out_end=state.out_end,
            failed_end=state.failed_end,
            filtered_end=state.filtered_end,
            policy=kw.pop("policy", JournalConfig()),
            snapshots=snapshots,
            **kw,
        )

    def contents(self) -> list[bytes]:
        return [p.read_bytes() if p.exists() else b"" for p in self.outputs]

    def emits(self) -> list[int]:
        pairs, journals = emit_sources(self.ck)
        return list(pairs) + [
            n
            for j in journals
            for r in map(orjson.loads, j.read_bytes().splitlines())
            if r["k"] == "o"
            for n in (r["l"], r["e"])
        ]

    def segments(self) -> list[int]:
        return [n for n, _ in segments(self.ck)]


def assert_same_state(got: Replay, want: Replay) -> None:
    assert got.done == want.done
    assert got.partial == want.partial
    fields = ("rows_ok", "rows_failed", "rows_filtered", "records", "work_records")
    fields += ("out_end", "failed_end", "filtered_end")
    assert [getattr(got, f) for f in fields] == [getattr(want, f) for f in fields]


async def reference(folder: Path, ops: list[Op]) -> tuple[Run, Replay]:
    ref = Run(folder)
    async with running(ref.writer(None, every=None)) as w:
        await play(w, ops)
    return ref, ref.load()


async def test_snapshots_keep_the_state_and_drop_the_segments_they_cover(tmp_path: Path) -> None:
    ops = script(1)
    ref, want = await reference(tmp_path / "ref", ops)
    assert want.partial and ref.segments() == [0]
    run = Run(tmp_path / "snap")
    async with running(run.writer(Replay(), every=3)) as w:
        await play(w, ops)

    assert run.contents() == ref.contents()  # the same rows, byte for byte
    assert_same_state(run.load(), want)
    assert run.emits() == ref.emits()  # what export reads, though segment 0 is gone
    snapshot = read_snapshot(run.ck)
    assert snapshot is not None and snapshot.first_segment > 3
    assert run.segments() == [snapshot.first_segment]  # every covered segment dropped


async def test_a_big_segment_is_snapshotted_whatever_the_rows(tmp_path: Path) -> None:
    ops = script(2)
    _, want = await reference(tmp_path / "ref", ops)
    run = Run(tmp_path / "snap")
    async with running(run.writer(Replay(), every=10**9, snapshot_every_bytes=400)) as w:
        await play(w, ops)
    assert_same_state(run.load(), want)
    assert len(run.segments()) == 1 and run.segments()[0] > 3
    # A snapshot is due at 400 bytes, or once the segment is as big as the last
    # snapshot (rows in progress make it big): the segment ends within one batch of that.
    due = max(400, (run.ck / SNAPSHOT_NAME).stat().st_size)
    assert segment_path(run.ck, run.segments()[0]).stat().st_size < due + 300


@pytest.mark.parametrize("legacy", [False, True], ids=["snapshots", "an old single journal"])
async def test_a_resumed_writer_goes_on_from_snapshot_and_tail(
    tmp_path: Path, legacy: bool
) -> None:
    ops = script(3)
    ref, want = await reference(tmp_path / "ref", ops)
    run = Run(tmp_path / "snap")
    for part in (ops[: len(ops) // 3], ops[len(ops) // 3 : len(ops) // 2], ops[len(ops) // 2 :]):
        state = run.load()
        every = None if legacy and part[0] == ops[0] else 4
        async with running(run.writer(state, every=every)) as w:
            await play(w, part)
        if every is None:
            assert run.segments() == [0] and not (run.ck / SNAPSHOT_NAME).exists()

    assert run.contents() == ref.contents()
    assert_same_state(run.load(), want)
    assert run.emits() == ref.emits()
    assert 0 not in run.segments()  # the old journal is covered, and gone


def rows_in(data: bytes) -> list[tuple[int, int]]:
    """(line, end) of each row of an output file, the emits that vouch for them."""
    pairs, end = [], 0
    for raw in data.splitlines(keepends=True):
        end += len(raw)
        pairs.append((int(orjson.loads(raw)["id"][1:]), end))
    return pairs


@pytest.mark.parametrize("instant", ["before", "torn temp", "before the drop"])
async def test_a_kill_at_any_step_of_a_snapshot_loses_and_repeats_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, instant: str
) -> None:
    # What a SIGKILL leaves is what is on disk at that instant: copy the folder then,
    # from inside the snapshot, and resume from the copy.
    ops = script(4)
    live = Run(tmp_path / "live")
    writer = live.writer(Replay(), every=5)
    crashes: list[tuple[Path, Replay]] = []

    def kill_here() -> None:
        copy = tmp_path / f"kill{len(crashes)}"
        shutil.copytree(tmp_path / "live", copy)
        crashes.append((copy, writer._snapshots.state.copy()))  # type: ignore[union-attr]

    real_pack, real_write = snapshotter_module.pack_emits, snapshotter_module.write_snapshot

    def pack(pairs: Any) -> bytes:
        if instant == "before":
            kill_here()
        return real_pack(pairs)

    def write(folder: Path, data: bytes) -> None:
        if instant == "torn temp":
            (folder / (SNAPSHOT_NAME + ".tmp")).write_bytes(data[: len(data) // 2])
            kill_here()
        real_write(folder, data)
        if instant == "before the drop":
            kill_here()

    monkeypatch.setattr(snapshotter_module, "pack_emits", pack)
    monkeypatch.setattr(snapshotter_module, "write_snapshot", write)
    async with running(writer) as w:
        await play(w, ops)
    monkeypatch.undo()
    assert len(crashes) > 3

    for folder, true_state in crashes:
        run = Run(folder)
        state = run.load()
        assert_same_state(state, true_state)
        assert run.emits() == [n for pair in rows_in(run.contents()[0]) for n in pair]
        # Resume: finish every row not done, as a rerun would.
        async with running(run.writer(state, every=5)) as w:
            assert run.segments() == list(range(state.first_segment, state.segment + 1))
            for line in range(40):
                if line not in state.done:
                    await output(w, line, row(line))
        final = run.load()
        assert len(final.done) == 40 and final.partial == {}
        ok = run.contents()[0]
        assert run.emits() == [n for pair in rows_in(ok) for n in pair]
        ids = [line for line, _ in rows_in(ok)] + [
            int(orjson.loads(r)["id"][1:]) for p in run.contents()[1:] for r in p.splitlines()
        ]
        assert sorted(ids) == list(range(40))  # each row once


async def test_a_snapshot_that_cannot_be_written_stops_the_writer_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ops = script(5)
    ref, want = await reference(tmp_path / "ref", ops)
    run = Run(tmp_path / "snap")

    def full(folder: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(snapshotter_module, "write_snapshot", full)
    done = 0
    with pytest.raises(BaseExceptionGroup) as stopped:
        async with running(run.writer(Replay(), every=3)) as w:
            for op in ops:
                await play(w, [op])
                done += 1
    assert stopped.group_contains(CheckpointError, match="no space left")
    monkeypatch.undo()
    async with running(run.writer(run.load(), every=3)) as w:
        await play(w, ops[done:])
    assert run.contents() == ref.contents()
    assert_same_state(run.load(), want)


async def test_a_snapshot_fsyncs_what_it_vouches_for_whatever_the_policy(
    tmp_path: Path, fsyncs: list[str]
) -> None:
    run = Run(tmp_path)
    async with running(run.writer(Replay(), every=1, policy=JournalConfig(fsync="never"))) as w:
        await w.record(turn(0, 0))
        await output(w, 0, row(0))
    ck = run.ck.resolve()
    assert set(fsyncs) == {
        str(run.outputs[0].resolve()),
        str(ck / "journal.jsonl"),
        str(ck / "emits.bin"),
        str(ck / "snapshot.bin.tmp"),
        str(ck),
    }


async def test_snapshots_never_write_more_than_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A row in flight all along with a big record is in every snapshot; a snapshot
    # per row would write it again and again.
    async def ops(w: Writer) -> None:
        await w.record({**turn(999, 0), "c": "x" * 20_000})
        for line in range(300):
            await output(w, line, row(line), [turn(line, 0)])

    ref = Run(tmp_path / "ref")
    async with running(ref.writer(None, every=None)) as w:
        await ops(w)
    written: list[int] = []
    real = snapshotter_module.write_snapshot

    def counting(folder: Path, data: bytes) -> None:
        written.append(len(data))
        real(folder, data)

    monkeypatch.setattr(snapshotter_module, "write_snapshot", counting)
    run = Run(tmp_path / "snap")
    async with running(run.writer(Replay(), every=1)) as w:
        await ops(w)
    assert len(written) > 1
    assert sum(written) <= segment_path(ref.ck, 0).stat().st_size
    assert_same_state(run.load(), ref.load())
