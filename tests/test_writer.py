"""The single writer: records on disk before the caller goes on, emits that vouch for rows."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from engine.checkpoint.journal import encode, replay
from engine.checkpoint.writer import Writer
from engine.config import JournalConfig

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
        await writer.output(3, row(3))
        assert files.out.read_bytes() == line_bytes(row(3))
        state = files.replay()
        assert 3 in state.done
        assert state.out_end == files.size(files.out)
        assert state.partial == {}


async def test_concurrent_callers_all_land_and_every_emit_vouches(files: Files) -> None:
    async def conversation(line: int) -> None:
        for i in range(3):
            await writer.record(turn(line, i))
        if line % 4 == 3:
            await writer.failed(line, {"id": f"r{line}", "error": "boom"})
        else:
            await writer.output(line, row(line))

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
        await writer.output(0, row(0))
        await writer.output(5, row(5))
        await writer.failed(2, {"id": "r2"})
    ends = {
        (rec["k"], rec["l"]): rec["e"]
        for rec in map(orjson.loads, files.journal.read_bytes().splitlines())
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
        await writer.output(0, row(0))
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
        await writer.output(1, row(1))

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
        await writer.output(0, row(0))
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
        await writer.output(0, row(0))
        assert fsyncs == [journal, out, journal]  # the row before the emit that vouches


async def test_fsync_never_leaves_it_to_the_os(files: Files, fsyncs: list[str]) -> None:
    writer = files.writer(JournalConfig(fsync="never"))
    async with running(writer):
        await writer.record(turn(0, 0))
        await writer.output(0, row(0))
    assert fsyncs == []
    assert not {str(files.journal.resolve()), str(files.out.resolve())} & open_paths()


async def _script(writer: Writer) -> None:
    for line in range(12):
        await writer.record(turn(line, 0))
        await writer.record(turn(line, 1))
        if line % 3 == 0:
            await writer.failed(line, {"id": line, "error": "permanent"})
        else:
            await writer.output(line, row(line))


async def test_every_fsync_mode_writes_the_same_bytes(tmp_path: Path) -> None:
    results = []
    for mode in ("always", "never", "interval"):
        files = Files(tmp_path / mode)
        async with running(files.writer(JournalConfig(fsync=mode, fsync_interval_s=0.001))) as w:
            await _script(w)
        results.append(files.contents())
    assert results[0] == results[1] == results[2]
    journal, out, failed = results[0]
    assert len(journal.splitlines()) == 12 * 3
    assert len(out.splitlines()) == 8 and len(failed.splitlines()) == 4


# --- after close -------------------------------------------------------------------------


async def test_close_flushes_what_is_pending(files: Files) -> None:
    writer = files.writer()
    done: list[int] = []

    async def add(line: int) -> None:
        await writer.output(line, row(line))
        done.append(line)

    async with anyio.create_task_group() as tg:
        tg.start_soon(writer.run)
        for line in range(5):
            tg.start_soon(add, line)
        await anyio.wait_all_tasks_blocked()
        await writer.close()
    assert sorted(done) == [0, 1, 2, 3, 4]
    assert len(files.replay().done) == 5
