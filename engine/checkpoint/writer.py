"""The single writer: journal, output and failed file, written in batches from one task.

Callers add records and rows and wait for the batch they joined; at the end of
that loop pass, everything pending is written and they are all woken. So a turn
is in the OS (safe from SIGKILL) before its conversation goes on, while thousands
of turns a second share a few writes. A small batch with no fsync due is written
on the event loop itself, in a plain callback: a write(2) of some kilobytes into
the page cache takes a few microseconds, a hop to a worker thread and back costs
ten times that. Big batches, fsyncs and snapshots go to the writer task, which
does them in a worker thread.

Order inside a batch: journal work records, then output rows, then the journal's
emit records that vouch for those rows. A crash between the two leaves rows the
journal does not vouch for; the next run truncates them and writes them again.

Given the replayed state of the run (``state``), the writer keeps it up to date
with every record it writes and takes a snapshot every so often, starting a new
journal segment and deleting the ones the snapshot covers: see
engine.checkpoint.snapshot for the files and why a SIGKILL at any step is safe.
Given the input reader's ``marks``, each snapshot also says where in the input a
resume can start reading.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import orjson

from engine.checkpoint.durability import JournalConfig
from engine.checkpoint.journal import (
    EMIT_FAILED,
    EMIT_FILTERED,
    EMIT_OUTPUT,
    Replay,
    apply,
    encode,
    segment_number,
    segment_path,
)
from engine.checkpoint.snapshot import (
    EMITS_NAME,
    SNAPSHOT_NAME,
    covered_segments,
    encode_snapshot,
    pack_emits,
    write_snapshot,
)
from engine.errors import CheckpointError
from engine.history import whole_length
from engine.input.reader import Marks

# A snapshot every this many rows, or once the segment written reaches this size: a
# resume replays at most about one segment (under 0.1 s), and a snapshot (some
# milliseconds of work and a few fsyncs) comes every few seconds at most.
SNAPSHOT_EVERY_ROWS = 20_000
SNAPSHOT_EVERY_BYTES = 4 << 20
# A batch up to this size with no fsync due is written without a thread hop.
INLINE_BYTES = 64 << 10


@dataclass(slots=True)
class _Batch:
    journal: list[bytes] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)  # journal, decoded
    out: list[tuple[int, bytes]] = field(default_factory=list)
    failed: list[tuple[int, bytes]] = field(default_factory=list)
    filtered: list[tuple[int, bytes]] = field(default_factory=list)
    history: list[bytes] = field(default_factory=list)  # metrics.jsonl lines (engine.history)
    done: anyio.Event = field(default_factory=anyio.Event)
    error: BaseException | None = None

    def __bool__(self) -> bool:
        return bool(self.journal or self.out or self.failed or self.filtered or self.history)

    def size(self) -> int:
        """About how many bytes the batch writes (its emit records left out)."""
        rows = sum(len(data) for rows in (self.out, self.failed, self.filtered) for _, data in rows)
        return sum(map(len, self.journal)) + rows + sum(map(len, self.history))


class _File:
    """An append-only file descriptor that knows its length."""

    def __init__(self, path: Path, keep: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        size = os.fstat(self.fd).st_size
        if size > keep:
            os.ftruncate(self.fd, keep)  # drop what the journal does not vouch for
        self.size = min(size, keep)
        self.dirty = False

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]
        self.size += len(data)
        self.dirty = True

    def rollback(self, size: int) -> None:
        os.ftruncate(self.fd, size)
        self.size = size

    def sync(self) -> None:
        if self.dirty:
            os.fsync(self.fd)
            self.dirty = False

    def close(self) -> None:
        os.close(self.fd)


class Writer:
    """Owns the journal, output and failed files for one run.

    ``journal`` is the segment to append to. With ``state`` (the replay the run
    resumes from: its ends must be the ones given) the writer takes snapshots;
    without, it only appends, as a writer of one journal file. It keeps the
    records of rows in progress (for the snapshots): callers never change a
    record once they have handed it over.
    """

    def __init__(
        self,
        journal: Path,
        output: Path,
        failed: Path,
        *,
        journal_end: int,
        out_end: int,
        failed_end: int,
        policy: JournalConfig,
        filtered: Path | None = None,
        filtered_end: int = 0,
        state: Replay | None = None,
        snapshot_every_rows: int = SNAPSHOT_EVERY_ROWS,
        snapshot_every_bytes: int = SNAPSHOT_EVERY_BYTES,
        marks: Marks | None = None,
        seek_base: int = 0,
        history: Path | None = None,
    ) -> None:
        self._dir = journal.parent
        self._segment = segment_number(journal)
        if filtered is None:
            filtered = failed.with_name(failed.name.replace(".failed.", ".filtered."))
        try:
            self._journal = _File(journal, journal_end)
            self._out = _File(output, out_end)
            self._failed = _File(failed, failed_end)
            self._filtered = _File(filtered, filtered_end)
        except OSError as exc:  # an unwritable folder, found at run time: a stop, not a bug
            raise CheckpointError(_describe(exc, self._dir)) from exc
        # The run's history, cut back to its last whole line (a SIGKILL can tear one).
        self._history = _File(history, whole_length(history)) if history is not None else None
        self._policy = policy
        self._batch = _Batch()
        self._kick = anyio.Event()
        self._soon = False  # a _write_soon is scheduled
        self._busy = False  # the writer task is writing (in a thread, maybe)
        self._closing = False
        self._stopped = anyio.Event()
        self._last_sync = time.monotonic()
        self.error: BaseException | None = None
        self._every = (max(1, snapshot_every_rows), max(1, snapshot_every_bytes))
        self._rows = 0  # rows written since the last snapshot
        self._last_snapshot = 0  # its size
        self._state = state.copy() if state is not None else None
        self._marks = marks
        self._seek_base = seek_base  # the first line this run reads (a shard's)
        self._emits: _File | None = None
        if self._state is not None:
            # Cut off what no snapshot vouches for (one that did not finish); a run
            # that never took one has no index.
            if self._state.emits_end:
                self._emits = _File(self._dir / EMITS_NAME, self._state.emits_end)
            else:
                (self._dir / EMITS_NAME).unlink(missing_ok=True)
            self._drop_covered()
            (self._dir / (SNAPSHOT_NAME + ".tmp")).unlink(missing_ok=True)

    # -- callers -------------------------------------------------------------

    async def record(self, record: dict[str, Any]) -> None:
        """Journal one record; returns once it is written to the OS."""
        batch = self._batch
        batch.journal.append(encode(record))
        batch.records.append(record)
        await self._wait(batch)

    async def output(
        self, line: int, row: dict[str, Any], records: Sequence[dict[str, Any]] = ()
    ) -> None:
        """Write a finished row to the output (and journal that it was).

        ``records`` (the row's last turn, say) are journaled first, in the same
        group write: one wait instead of two.
        """
        batch = self._batch
        batch.journal.extend(encode(record) for record in records)
        batch.records.extend(records)
        batch.out.append((line, orjson.dumps(row) + b"\n"))
        await self._wait(batch)

    async def failed(self, line: int, row: dict[str, Any]) -> None:
        """Write a failure to the failed file (and journal that it was)."""
        batch = self._batch
        batch.failed.append((line, orjson.dumps(row) + b"\n"))
        await self._wait(batch)

    async def filtered(
        self, line: int, row: dict[str, Any], records: Sequence[dict[str, Any]] = ()
    ) -> None:
        """Write a row the quality filters left out to the filtered file (and journal it)."""
        batch = self._batch
        batch.journal.extend(encode(record) for record in records)
        batch.records.extend(records)
        batch.filtered.append((line, orjson.dumps(row) + b"\n"))
        await self._wait(batch)

    def note(self, line: bytes) -> None:
        """Append a history line (engine.history) with the next batch; nobody waits on it."""
        if self._history is None or self.error is not None:
            return
        self._batch.history.append(line)
        if not self._soon:
            self._soon = True
            asyncio.get_running_loop().call_soon(self._write_soon)

    async def _wait(self, batch: _Batch) -> None:
        if self.error is not None:
            raise CheckpointError(self._describe(self.error))
        if not self._soon:
            self._soon = True
            asyncio.get_running_loop().call_soon(self._write_soon)
        await batch.done.wait()
        if batch.error is not None:
            raise CheckpointError(self._describe(batch.error))

    def _write_soon(self) -> None:
        """Write the batch at the end of the loop pass its first caller joined it in.

        Here, in a plain callback, when the batch is small, no fsync is due and the
        writer task is not busy (so batches stay in order); else the task takes it.
        A turn that lands alone (a low cap, a slow server) then costs one write(2)
        and its caller's wake-up, not a wake-up of the writer task as well.
        """
        self._soon = False
        batch = self._batch
        if not batch:
            return
        if (
            self._busy
            or self.error is not None
            or self._policy.fsync == "always"
            or self._due()
            or batch.size() > INLINE_BYTES
            or self._snapshot_due()
        ):
            self._kick.set()
            return
        self._batch = _Batch()
        try:
            self._write(batch, sync=False)
        except OSError as exc:
            batch.error = self.error = exc
            self._kick.set()  # the task raises it: the run ends there
        batch.done.set()
        if self._snapshot_due():
            self._kick.set()

    # -- the writer task -----------------------------------------------------

    async def run(self) -> None:
        """The writer loop; returns after close() once everything is on disk."""
        try:
            async with anyio.create_task_group() as group:
                if self._policy.fsync == "interval":
                    group.start_soon(self._tick)
                await self._loop()
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._close_files)
            self._stopped.set()

    async def _loop(self) -> None:
        while True:
            await self._kick.wait()
            self._kick = anyio.Event()
            if self.error is not None:
                raise CheckpointError(self._describe(self.error))
            batch, self._batch = self._batch, _Batch()
            self._busy = True
            with anyio.CancelScope(shield=True):
                if batch:
                    await self._flush(batch)
                if self._snapshot_due():
                    self._advance_seek()
                    # Its own hop: the batch's callers are already on their way.
                    await self._in_thread(self._snapshot)
                elif not batch and self._due() and self._dirty():
                    await anyio.to_thread.run_sync(self._sync_all)
            self._busy = False
            if self._closing and not self._batch:
                return

    async def _tick(self) -> None:
        """Wake the loop every fsync interval, so a quiet run still fsyncs on time.

        A task of its own rather than a timeout on the loop's wait: that would
        cost a cancel scope and a timer per batch.
        """
        while True:
            await anyio.sleep(self._policy.fsync_interval_s)
            self._kick.set()

    async def close(self) -> None:
        """Flush what is pending, fsync, close the files and wait for the loop to end."""
        self._closing = True
        self._kick.set()
        await self._stopped.wait()
        if self.error is not None:
            raise CheckpointError(self._describe(self.error))

    async def _flush(self, batch: _Batch) -> None:
        sync = self._policy.fsync == "always" or self._due()
        try:
            if not sync and batch.size() <= INLINE_BYTES:
                self._write(batch, sync=False)
            else:
                await anyio.to_thread.run_sync(self._write, batch, sync)
        except OSError as exc:
            batch.error = self.error = exc
        batch.done.set()
        if self.error is not None:
            raise CheckpointError(self._describe(self.error))

    async def _in_thread(self, step: Callable[[], None]) -> None:
        try:
            await anyio.to_thread.run_sync(step)
        except OSError as exc:
            self.error = exc
            raise CheckpointError(self._describe(exc)) from exc

    def _write(self, batch: _Batch, sync: bool) -> None:
        files = [self._journal, self._out, self._failed, self._filtered]
        if self._history is not None:
            files.append(self._history)
        sizes = [f.size for f in files]
        try:
            journal: list[bytes] = []
            emits: list[dict[str, Any]] = []
            if batch.out or batch.failed or batch.filtered:
                # Work records reach the journal before the rows built from them.
                self._journal.write(b"".join(batch.journal))
            else:
                journal = batch.journal
            if batch.out:
                emits += self._append_rows(self._out, batch.out, EMIT_OUTPUT)
            if batch.failed:
                emits += self._append_rows(self._failed, batch.failed, EMIT_FAILED)
            if batch.filtered:
                emits += self._append_rows(self._filtered, batch.filtered, EMIT_FILTERED)
            journal = journal + [encode(emit) for emit in emits]
            if sync:
                self._out.sync()
                self._failed.sync()
                self._filtered.sync()
            self._journal.write(b"".join(journal))
            if batch.history and self._history is not None:
                self._history.write(b"".join(batch.history))
            if sync:
                self._sync_all()
            if self._state is not None:
                # Written: the state a replay would now give (records in journal order).
                for record in batch.records:
                    apply(self._state, record)
                for emit in emits:
                    apply(self._state, emit)
                self._rows += len(emits)
        except OSError:
            # Leave no half-written record behind (ENOSPC mid-write): cut every file
            # back to where this batch started, so the next run finds them whole.
            for f, size in zip(files, sizes, strict=True):
                try:
                    f.rollback(size)
                except OSError:
                    pass
            raise

    def _describe(self, error: BaseException) -> str:
        return _describe(error, self._journal.path.parent)

    @staticmethod
    def _append_rows(
        target: _File, rows: list[tuple[int, bytes]], kind: str
    ) -> list[dict[str, Any]]:
        target.write(b"".join(data for _, data in rows))
        end = target.size - sum(len(data) for _, data in rows)
        emits = []
        for line, data in rows:
            end += len(data)
            emits.append({"k": kind, "l": line, "e": end})
        return emits

    # -- snapshots (engine.checkpoint.snapshot says why each step is where it is) ----

    def _snapshot_due(self) -> bool:
        if self._state is None or self.error is not None:
            return False
        size = self._journal.size
        # Never sooner than the journal grows by the last snapshot's size: rows in
        # flight with big records (long generations) make big snapshots, and this
        # keeps what snapshots write below what the journal does.
        if size < self._last_snapshot:
            return False
        return self._rows >= self._every[0] or size >= self._every[1]

    def _advance_seek(self) -> None:
        """Move the state's seek to the reader's last mark before the first row not done."""
        state = self._state
        if state is None or self._marks is None:
            return
        mark = self._marks.before(state.done.prefix(self._seek_base))
        if mark is not None and mark[0] > state.seek[0]:
            state.seek = mark

    def _snapshot(self) -> None:
        state = self._state
        assert state is not None
        for f in (self._out, self._failed, self._filtered, self._journal):
            f.sync()
        if self._emits is None:
            self._emits = _File(self._dir / EMITS_NAME, 0)
        emits = self._emits
        packed = pack_emits(state.emits)
        emits.write(packed)
        emits.sync()
        # The index's CRC32, carried on: unknown for one begun before checksums.
        known = state.emits_crc is not None or not state.emits_end
        crc = zlib.crc32(packed, state.emits_crc or 0) if known else None
        following = self._segment + 1
        segment = _File(segment_path(self._dir, following), 0)
        data = encode_snapshot(state, segment=following, emits_end=emits.size, emits_crc=crc)
        try:
            write_snapshot(self._dir, data)
        except BaseException:
            segment.close()
            raise
        self._last_snapshot = len(data)
        self._journal.close()
        self._journal, self._segment = segment, following
        state.first_segment = state.segment = following
        state.emits_end = emits.size
        state.emits_crc = crc
        del state.emits[:]
        self._rows = 0
        self._last_sync = time.monotonic()
        self._drop_covered()

    def _drop_covered(self) -> None:
        assert self._state is not None
        for path in covered_segments(self._dir, self._state.first_segment):
            path.unlink(missing_ok=True)

    def _due(self) -> bool:
        if self._policy.fsync != "interval":
            return False
        return time.monotonic() - self._last_sync >= self._policy.fsync_interval_s

    def _dirty(self) -> bool:
        return any(f.dirty for f in (self._journal, self._out, self._failed, self._filtered))

    def _sync_all(self) -> None:
        if self._policy.fsync == "never":
            return
        self._out.sync()
        self._failed.sync()
        self._filtered.sync()
        self._journal.sync()
        self._last_sync = time.monotonic()

    def _close_files(self) -> None:
        try:
            if self.error is None and self._policy.fsync != "never":
                self._sync_all()
        finally:
            for f in (
                self._journal,
                self._out,
                self._failed,
                self._filtered,
                self._emits,
                self._history,
            ):
                if f is not None:
                    f.close()


def _describe(error: BaseException, checkpoint_dir: Path) -> str:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return (
            f"no space left on the device holding {checkpoint_dir} or the output; "
            "nothing finished is lost: free some space and run the same command to resume"
        )
    return (
        f"the checkpoint cannot be written ({error}); nothing finished is lost: "
        "fix the cause and run the same command to resume"
    )
