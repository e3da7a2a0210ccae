"""The single writer: journal, output and failed file, written in batches from one task.

Callers add records and rows and wait for the batch they joined; at the end of
that loop pass, everything pending is written and they are all woken. So a turn
is in the OS (safe from SIGKILL) before its conversation goes on, while thousands
of turns a second share a few writes. A finished row is handed over (``hand_over``)
and not waited for, unless the writer says so. A small batch with no fsync due is written
on the event loop itself, in a plain callback: a write(2) of some kilobytes into
the page cache takes a few microseconds, a hop to a worker thread and back costs
ten times that. Big batches, fsyncs and snapshots go to the writer task, which
does them in a worker thread.

Order inside a batch: journal work records (and each output row's ``v`` record, which
stands for the row's last replies: their text is journaled once, in the row), then
the rows, then the journal's emit records that vouch for them. A crash between the
last two leaves rows the journal does not vouch for: the next run keeps each one
that is whole where its ``v`` record says (engine.checkpoint.adopt), and cuts off
and writes again the rest.

Given a snapshotter (engine.checkpoint.snapshotter), the writer tells it what
every batch wrote and lets it take a snapshot between two batches, then appends to
the journal segment it starts. Given the history (engine.history's ``Appender``),
metrics.jsonl lines go out with the next batch. The writer itself only batches,
writes, rolls a failed batch back and fsyncs as ``policy`` says.
engine.checkpoint.Checkpoint builds one for a run (``Checkpoint.writer``).
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import orjson

from engine.checkpoint.durability import JournalConfig
from engine.checkpoint.files import AppendFile
from engine.checkpoint.journal import (
    EMIT_FAILED,
    EMIT_FILTERED,
    EMIT_OUTPUT,
    emit_record,
    encode,
    writing_record,
)
from engine.checkpoint.snapshotter import SNAPSHOT_EVERY_BYTES, SNAPSHOT_EVERY_ROWS, Snapshotter
from engine.errors import CheckpointError

if TYPE_CHECKING:
    from engine.history import Appender

__all__ = [
    "HANDOVER_ROWS",
    "INLINE_BYTES",
    "SNAPSHOT_EVERY_BYTES",
    "SNAPSHOT_EVERY_ROWS",
    "Writer",
    "row_line",
]
# A batch up to this size with no fsync due is written without a thread hop: a write
# of 1 MB to the page cache takes a fraction of a millisecond, less than the hop's
# wake-ups (16 KB reasoning turns made most batches pass the earlier 64 KB).
INLINE_BYTES = 1 << 20
# Finished rows handed over (Writer.hand_over) that may wait in one batch before their
# callers wait for it too: a bound on what a batch holds, far above a loop pass's rows.
HANDOVER_ROWS = 4096


@dataclass(slots=True)
class _Batch:
    # Encoded records, each a fresh bytes of its line's size, not orjson's own output
    # buffer (engine.jsonbytes): held until the write.
    journal: list[bytes] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)  # journal, decoded
    out: list[tuple[int, bytes]] = field(default_factory=list)
    writing: list[dict[str, Any]] = field(default_factory=list)  # each out row's v record
    failed: list[tuple[int, bytes]] = field(default_factory=list)
    filtered: list[tuple[int, bytes]] = field(default_factory=list)
    history: list[bytes] = field(default_factory=list)  # metrics.jsonl lines (engine.history)
    # Made by the first caller that waits (a row handed over waits on nothing), and
    # asyncio's own: the writer is on asyncio's loop already (call_soon), and anyio's
    # costs a backend lookup to make.
    done: asyncio.Event | None = None
    written: bool = False  # (or failed: ``error``) its callers may go on
    error: BaseException | None = None

    def __bool__(self) -> bool:
        return bool(self.journal or self.out or self.failed or self.filtered or self.history)

    def finished(self) -> None:
        """Written (or failed, ``error``): its waiters go on."""
        self.written = True
        if self.done is not None:
            self.done.set()

    def size(self) -> int:
        """About how many bytes the batch writes (its emit records left out)."""
        rows = sum(len(data) for rows in (self.out, self.failed, self.filtered) for _, data in rows)
        return sum(map(len, self.journal)) + rows + sum(map(len, self.history))


class Writer:
    """The group writer: owns the journal, output, failed and filtered files of one run.

    ``journal`` is the segment to append to; the ends are what the replay vouches
    for (anything after them is cut off); ``adopted``, the (line, end) emits of rows
    the replay found whole past the journal's emits (engine.checkpoint.adopt), are
    journaled at once. With a ``snapshots`` snapshotter (made
    from the same replay) the writer takes snapshots; without, it only appends, as
    a writer of one journal file. Callers never change a record once they have
    handed it over (the snapshotter keeps those of rows in progress).
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
        snapshots: Snapshotter | None = None,
        history: Appender | None = None,
        adopted: Sequence[tuple[int, int]] = (),
    ) -> None:
        self._dir = journal.parent
        if filtered is None:
            filtered = failed.with_name(failed.name.replace(".failed.", ".filtered."))
        try:
            self._journal = AppendFile(journal, journal_end)
            self._out = AppendFile(output, out_end)
            self._failed = AppendFile(failed, failed_end)
            self._filtered = AppendFile(filtered, filtered_end)
            if adopted:
                self._journal.write_parts(
                    [encode(emit_record(EMIT_OUTPUT, line, end)) for line, end in adopted]
                )
        except OSError as exc:  # an unwritable folder, found at run time: a stop, not a bug
            raise CheckpointError(_describe(exc, self._dir)) from exc
        self._history = history  # metrics.jsonl, cut back to its last whole line
        self._policy = policy
        self._always = policy.fsync == "always"
        self._batch = _Batch()
        self._kick = anyio.Event()
        self._soon = False  # a _write_soon is scheduled
        self._busy = False  # the writer task is writing (in a thread, maybe)
        self._closing = False
        self._stopped = anyio.Event()
        self._last_sync = time.monotonic()
        self.error: BaseException | None = None
        self._snapshots = snapshots

    @property
    def history_lines(self) -> int:
        """Lines in the history file when it was opened (earlier runs' samples)."""
        return self._history.lines if self._history is not None else 0

    # -- callers -------------------------------------------------------------

    async def record(self, record: dict[str, Any]) -> None:
        """Journal one record; returns once it is written to the OS."""
        batch = self._batch
        batch.journal.append(encode(record))
        batch.records.append(record)
        await self._wait(batch)

    def hand_over(
        self, line: int, row: dict[str, Any], records: Sequence[dict[str, Any]] = ()
    ) -> Coroutine[Any, Any, None] | None:
        """Write a finished row to the output (and journal that it was): it joins the
        batch written at the end of this loop pass, and its caller goes on (a finished
        row has nothing left to wait for). Returns the wait the caller must await all
        the same when there is one: the writer busy in a thread (a snapshot, an fsync,
        a big batch), ``fsync: always``, or ``HANDOVER_ROWS`` rows waiting. So memory
        stays bounded, and a row the policy syncs is on disk when its caller goes on.

        ``records`` (the row's last turn, say) are the replies the row was finished
        with, not yet journaled: the row holds their text, so they are journaled as
        the row's ``v`` record (their cost, the row's place), in the same group
        write: a long reply written once.

        A kill before the write loses nothing: the row is asked again on resume, as a
        row in flight is. A failed write stops the run: the writer task raises it, and
        so does the next call here.
        """
        if self.error is not None:
            raise CheckpointError(self._describe(self.error))
        batch = self._batch
        record = writing_record(line, records)
        batch.writing.append(record)
        batch.records.append(record)
        batch.out.append((line, row_line(row)))
        if self._busy or self._always or len(batch.out) >= HANDOVER_ROWS:
            return self._wait(batch)
        if not self._soon:
            self._write_at_pass_end()
        return None

    async def failed(self, line: int, row: dict[str, Any]) -> None:
        """Write a failure to the failed file (and journal that it was)."""
        batch = self._batch
        batch.failed.append((line, row_line(row)))
        await self._wait(batch)

    async def filtered(
        self, line: int, row: dict[str, Any], records: Sequence[dict[str, Any]] = ()
    ) -> None:
        """Write a row the quality filters left out to the filtered file (and journal it)."""
        batch = self._batch
        batch.journal.extend(encode(record) for record in records)
        batch.records.extend(records)
        batch.filtered.append((line, row_line(row)))
        await self._wait(batch)

    def note(self, line: bytes) -> None:
        """Append a history line (engine.history) with the next batch; nobody waits on it.

        Dropped once close() began: the files may be closing in a thread by the time
        the line would be written (a sampler waking late; the run's last line is
        noted before close)."""
        if self._history is None or self.error is not None or self._closing:
            return
        self._batch.history.append(line)
        if not self._soon:
            self._write_at_pass_end()

    async def _wait(self, batch: _Batch) -> None:
        if self.error is not None:
            raise CheckpointError(self._describe(self.error))
        if not self._soon:
            self._write_at_pass_end()
        if not batch.written:
            done = batch.done
            if done is None:
                done = batch.done = asyncio.Event()
            await done.wait()
        if batch.error is not None:
            raise CheckpointError(self._describe(batch.error))

    def _write_at_pass_end(self) -> None:
        """Have ``_write_soon`` run at the end of this loop pass (not yet asked for)."""
        self._soon = True
        asyncio.get_running_loop().call_soon(self._write_soon)

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
        batch.finished()
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
                    assert self._snapshots is not None
                    self._snapshots.advance_seek()
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
        batch.finished()
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
                self._journal.write_parts(batch.journal + self._places(batch))
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
            self._journal.write_parts(journal)
            if batch.history and self._history is not None:
                self._history.write(b"".join(batch.history))
            if sync:
                self._sync_all()
            if self._snapshots is not None:
                self._snapshots.written(batch.records, emits)
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

    def _places(self, batch: _Batch) -> list[bytes]:
        """The output rows' v records, each with where its row is about to be written."""
        at = self._out.size
        lines = []
        for (_, data), record in zip(batch.out, batch.writing, strict=True):
            record["b"] = at
            at += len(data)
            record["e"] = at
            lines.append(encode(record))
        return lines

    @staticmethod
    def _append_rows(
        target: AppendFile, rows: list[tuple[int, bytes]], kind: str
    ) -> list[dict[str, Any]]:
        target.write_parts([data for _, data in rows])
        end = target.size - sum(len(data) for _, data in rows)
        emits = []
        for line, data in rows:
            end += len(data)
            emits.append(emit_record(kind, line, end))
        return emits

    # -- snapshots (engine.checkpoint.snapshotter) ---------------------------------

    def _snapshot_due(self) -> bool:
        if self._snapshots is None or self.error is not None:
            return False
        return self._snapshots.due(self._journal.size)

    def _snapshot(self) -> None:
        assert self._snapshots is not None
        vouched = (self._out, self._failed, self._filtered, self._journal)
        segment = self._snapshots.take(vouched)
        self._journal.close()
        self._journal = segment
        self._last_sync = time.monotonic()

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
            for f in (self._journal, self._out, self._failed, self._filtered, self._history):
                if f is not None:
                    f.close()
            if self._snapshots is not None:
                self._snapshots.close()


def row_line(row: dict[str, Any]) -> bytes:
    """``row`` as a line of an output file. `+ b"\n"`, not OPT_APPEND_NEWLINE: a fresh
    bytes of the row's size, held until the write, not orjson's bigger buffer
    (engine.jsonbytes says why)."""
    return orjson.dumps(row) + b"\n"


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
