"""The single writer: journal, output and failed file, written in batches from one task.

Callers add records and rows and wait for the batch they joined; the writer task
takes everything pending, writes it with one thread hop, and wakes them all. So
a turn is in the OS (safe from SIGKILL) before its conversation goes on, while
thousands of turns a second share a few writes.

Order inside a batch: journal work records, then output rows, then the journal's
emit records that vouch for those rows. A crash between the two leaves rows the
journal does not vouch for; the next run truncates them and writes them again.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import orjson

from engine.checkpoint.journal import EMIT_FAILED, EMIT_FILTERED, EMIT_OUTPUT, encode
from engine.config import JournalConfig
from engine.errors import CheckpointError


@dataclass(slots=True)
class _Batch:
    journal: list[bytes] = field(default_factory=list)
    out: list[tuple[int, bytes]] = field(default_factory=list)
    failed: list[tuple[int, bytes]] = field(default_factory=list)
    filtered: list[tuple[int, bytes]] = field(default_factory=list)
    done: anyio.Event = field(default_factory=anyio.Event)
    error: BaseException | None = None

    def __bool__(self) -> bool:
        return bool(self.journal or self.out or self.failed or self.filtered)


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
    """Owns the journal, output and failed files for one run."""

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
    ) -> None:
        self._journal = _File(journal, journal_end)
        self._out = _File(output, out_end)
        self._failed = _File(failed, failed_end)
        if filtered is None:
            filtered = failed.with_name(failed.name.replace(".failed.", ".filtered."))
        self._filtered = _File(filtered, filtered_end)
        self._policy = policy
        self._batch = _Batch()
        self._kick = anyio.Event()
        self._closing = False
        self._stopped = anyio.Event()
        self._last_sync = time.monotonic()
        self.error: BaseException | None = None

    # -- callers -------------------------------------------------------------

    async def record(self, record: dict[str, Any]) -> None:
        """Journal one record; returns once it is written to the OS."""
        batch = self._batch
        batch.journal.append(encode(record))
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
        batch.filtered.append((line, orjson.dumps(row) + b"\n"))
        await self._wait(batch)

    async def _wait(self, batch: _Batch) -> None:
        if self.error is not None:
            raise CheckpointError(self._describe(self.error))
        self._kick.set()
        await batch.done.wait()
        if batch.error is not None:
            raise CheckpointError(self._describe(batch.error))

    # -- the writer task -----------------------------------------------------

    async def run(self) -> None:
        """The writer loop; returns after close() once everything is on disk."""
        try:
            while True:
                timeout = self._sync_timeout()
                with anyio.move_on_after(timeout):
                    await self._kick.wait()
                self._kick = anyio.Event()
                batch, self._batch = self._batch, _Batch()
                if batch:
                    with anyio.CancelScope(shield=True):
                        await self._flush(batch)
                elif self._due():
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(self._sync_all)
                if self._closing and not self._batch:
                    break
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._close_files)
            self._stopped.set()

    async def close(self) -> None:
        """Flush what is pending, fsync, close the files and wait for the loop to end."""
        self._closing = True
        self._kick.set()
        await self._stopped.wait()
        if self.error is not None:
            raise CheckpointError(self._describe(self.error))

    async def _flush(self, batch: _Batch) -> None:
        try:
            await anyio.to_thread.run_sync(self._write, batch)
        except OSError as exc:
            batch.error = self.error = exc
        batch.done.set()
        if self.error is not None:
            raise CheckpointError(self._describe(self.error))

    def _write(self, batch: _Batch) -> None:
        files = (self._journal, self._out, self._failed, self._filtered)
        sizes = [f.size for f in files]
        try:
            journal: list[bytes] = []
            if batch.out or batch.failed or batch.filtered:
                # Work records reach the journal before the rows built from them.
                self._journal.write(b"".join(batch.journal))
            else:
                journal = batch.journal
            if batch.out:
                journal = journal + self._append_rows(self._out, batch.out, EMIT_OUTPUT)
            if batch.failed:
                journal = journal + self._append_rows(self._failed, batch.failed, EMIT_FAILED)
            if batch.filtered:
                journal = journal + self._append_rows(self._filtered, batch.filtered, EMIT_FILTERED)
            if self._policy.fsync == "always" or self._due():
                self._out.sync()
                self._failed.sync()
                self._filtered.sync()
            self._journal.write(b"".join(journal))
            if self._policy.fsync == "always" or self._due():
                self._sync_all()
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
    def _append_rows(target: _File, rows: list[tuple[int, bytes]], kind: str) -> list[bytes]:
        target.write(b"".join(data for _, data in rows))
        end = target.size - sum(len(data) for _, data in rows)
        emits = []
        for line, data in rows:
            end += len(data)
            emits.append(encode({"k": kind, "l": line, "e": end}))
        return emits

    def _due(self) -> bool:
        if self._policy.fsync != "interval":
            return False
        return time.monotonic() - self._last_sync >= self._policy.fsync_interval_s

    def _sync_timeout(self) -> float:
        if self._policy.fsync != "interval" or not (
            self._journal.dirty or self._out.dirty or self._failed.dirty or self._filtered.dirty
        ):
            return float("inf")
        return max(0.0, self._policy.fsync_interval_s - (time.monotonic() - self._last_sync))

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
            for f in (self._journal, self._out, self._failed, self._filtered):
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
