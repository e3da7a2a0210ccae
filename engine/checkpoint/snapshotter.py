"""The snapshotter: keeps a run's replayed state current and takes its snapshots.

The group writer (engine.checkpoint.writer) tells it what every batch wrote
(``written``), asks it whether a snapshot is due (``due``), and lets it take one
between two batches (``take``), in a worker thread: it fsyncs the files the
snapshot vouches for, appends the emits to ``emits.bin``, starts the next journal
segment, replaces ``snapshot.bin`` and deletes the segments it covers. The writer
then appends to the segment it hands back. engine.checkpoint.snapshot describes the
files and why a SIGKILL at any step is safe.

Given the input reader's ``marks``, each snapshot also says where in the input a
resume can start reading.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from engine.checkpoint.crc import crc32
from engine.checkpoint.files import AppendFile
from engine.checkpoint.journal import Replay, apply_written, segment_path
from engine.checkpoint.snapshot import (
    EMITS_NAME,
    SNAPSHOT_NAME,
    covered_segments,
    encode_snapshot,
    pack_emits,
    write_snapshot,
)
from engine.input.reader import Marks

# A snapshot every this many rows, or once the segment written reaches this size: a
# resume replays at most about one segment (under 0.1 s), and a snapshot (some
# milliseconds of work and a few fsyncs) comes every few seconds at most.
SNAPSHOT_EVERY_ROWS = 20_000
SNAPSHOT_EVERY_BYTES = 4 << 20


class Snapshotter:
    """The state of one run's checkpoint, kept as a replay would give it, and its snapshots.

    ``state`` is the replay the run resumes from (copied: the caller keeps its own).
    Opening cuts ``emits.bin`` back to what the snapshot vouches for, and deletes the
    segments it covers and a snapshot's temp file a crash left. Blocking.
    """

    def __init__(
        self,
        checkpoint_dir: Path,
        state: Replay,
        *,
        every_rows: int = SNAPSHOT_EVERY_ROWS,
        every_bytes: int = SNAPSHOT_EVERY_BYTES,
        marks: Marks | None = None,
        seek_base: int = 0,
    ) -> None:
        self._dir = checkpoint_dir
        self.state = state.copy()
        self._every = (max(1, every_rows), max(1, every_bytes))
        self._marks = marks
        self._seek_base = seek_base  # the first line this run reads (a shard's)
        self._rows = 0  # rows written since the last snapshot
        self._last = 0  # the last snapshot's size
        self._emits: AppendFile | None = None
        # Cut off what no snapshot vouches for (one that did not finish); a run that
        # never took one has no index.
        if self.state.emits_end:
            self._emits = AppendFile(self._dir / EMITS_NAME, self.state.emits_end)
        else:
            (self._dir / EMITS_NAME).unlink(missing_ok=True)
        self._drop_covered()
        (self._dir / (SNAPSHOT_NAME + ".tmp")).unlink(missing_ok=True)

    @property
    def segment(self) -> int:
        """The journal segment the run appends to."""
        return self.state.segment

    def written(self, records: Iterable[dict[str, Any]], emits: Sequence[dict[str, Any]]) -> None:
        """A batch is written: the state a replay would now give (records in journal order)."""
        apply_written(self.state, records, emits)
        self._rows += len(emits)

    def due(self, journal_size: int) -> bool:
        """Whether a snapshot is due, the segment written being ``journal_size`` bytes."""
        # Never sooner than the journal grows by the last snapshot's size: rows in
        # flight with big records (long generations) make big snapshots, and this
        # keeps what snapshots write below what the journal does.
        if journal_size < self._last:
            return False
        return self._rows >= self._every[0] or journal_size >= self._every[1]

    def advance_seek(self) -> None:
        """Move the state's seek to the reader's last mark before the first row not done.

        On the loop, before ``take``: the marks are the reader's."""
        state = self.state
        if self._marks is None:
            return
        mark = self._marks.before(state.done.prefix(self._seek_base))
        if mark is not None and mark[0] > state.seek[0]:
            state.seek = mark

    def take(self, vouched: Sequence[AppendFile]) -> AppendFile:
        """Take a snapshot; returns the next segment, which the writer appends to from now.

        ``vouched`` are the files the snapshot vouches for (the outputs, then the
        segment written so far, which the caller closes). Blocking.
        """
        state = self.state
        for f in vouched:
            f.sync()
        if self._emits is None:
            self._emits = AppendFile(self._dir / EMITS_NAME, 0)
        emits = self._emits
        packed = pack_emits(state.emits)
        emits.write(packed)
        emits.sync()
        # The index's CRC32, carried on: unknown for one begun before checksums.
        known = state.emits_crc is not None or not state.emits_end
        crc = crc32(packed, state.emits_crc or 0) if known else None
        following = state.segment + 1
        segment = AppendFile(segment_path(self._dir, following), 0)
        data = encode_snapshot(state, segment=following, emits_end=emits.size, emits_crc=crc)
        try:
            write_snapshot(self._dir, data)
        except BaseException:
            segment.close()
            raise
        self._last = len(data)
        state.first_segment = state.segment = following
        state.emits_end = emits.size
        state.emits_crc = crc
        del state.emits[:]
        self._rows = 0
        self._drop_covered()
        return segment

    def close(self) -> None:
        if self._emits is not None:
            self._emits.close()

    def _drop_covered(self) -> None:
        for path in covered_segments(self._dir, self.state.first_segment):
            path.unlink(missing_ok=True)
