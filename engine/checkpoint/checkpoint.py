"""``Checkpoint``: one run's checkpoint folder and the output files it vouches for.

The single entry point to a run's state on disk. Everything that locks a run,
reads its manifest, replays what it finished, writes to it or reads its emits goes
through one of these, so the rule each needs is written once:

- ``lock()``: the checkpoint's lock (and the output's), held for the run;
- ``manifest``: the manifest as stored (None before the first run);
- ``state()``: the snapshot and the journal after it, against the output files'
  current lengths (the caller never measures them); ``read_state()`` the same
  without the lock, read again when a running run's snapshot moves the segments
  away meanwhile (``unlocked_read``: the one retry rule, also export's);
- ``writer()``: the run's group writer with its snapshotter and history;
- ``emits()``: where the output's emits are, for export.

A new way of storing runs would provide these five (and ``atomic_write`` for its
small files, engine.checkpoint.files).
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

from engine.checkpoint.adopt import adopt
from engine.checkpoint.durability import JournalConfig
from engine.checkpoint.journal import Replay, segment_path
from engine.checkpoint.manifest import (
    Locks,
    has_checksums,
    lock_checkpoint,
    lock_output,
    read_manifest,
)
from engine.checkpoint.snapshot import emit_sources, load
from engine.checkpoint.snapshotter import SNAPSHOT_EVERY_ROWS, Snapshotter
from engine.checkpoint.writer import Writer
from engine.errors import CheckpointError
from engine.history import HISTORY_NAME, Appender
from engine.input.reader import Marks

T = TypeVar("T")

# Reads without the lock: how many times one is tried while a run moves segments away.
UNLOCKED_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class Outputs:
    """A run's three output files: finished rows, failed rows, filtered rows."""

    output: Path
    failed: Path
    filtered: Path

    def sizes(self) -> tuple[int, int, int]:
        """Their lengths now (0 for one that does not exist)."""
        return _size(self.output), _size(self.failed), _size(self.filtered)


class Checkpoint:
    """A run's checkpoint folder ``folder`` and the ``outputs`` it vouches for.

    ``writer_type`` is the group writer ``writer()`` builds: a subclass may give
    another (the bench's writer that writes nothing) and be handed to the run
    (``execute(checkpoint=...)``, an executor's ``checkpoint``).
    """

    __slots__ = ("folder", "outputs")
    writer_type: type[Writer] = Writer

    def __init__(self, folder: Path, outputs: Outputs) -> None:
        self.folder = folder
        self.outputs = outputs

    @classmethod
    def of(cls, config: Any) -> Checkpoint:
        """The checkpoint of a RunConfig (its checkpoint_dir and output files)."""
        return cls(
            config.checkpoint_dir,
            Outputs(config.output, config.failed_output, config.filtered_output),
        )

    def lock(self, *, output: bool = True) -> Locks:
        """Take the checkpoint's lock and (``output``) the output's, or refuse at once
        when another process holds either. Close the result when the run ends."""
        handles: list[IO[bytes]] = [lock_checkpoint(self.folder)]
        if output:
            try:
                handles.append(lock_output(self.outputs.output, self.folder))
            except BaseException:
                handles[0].close()
                raise
        return Locks(*handles)

    @property
    def manifest(self) -> dict[str, Any] | None:
        """The manifest as stored, or None when no run has written one."""
        return read_manifest(self.folder)

    def state(self, *, strict: bool | None = None, repair: bool = False) -> Replay:
        """What the checkpoint says is finished: its snapshot, then the segments after it,
        and the rows a kill left whole in the output before their emits were journaled
        (engine.checkpoint.adopt; ``writer()`` journals those emits).

        ``strict`` (every journal record must carry a checksum): None takes it from
        the manifest (a checkpoint without one is new: strict). ``repair`` counts
        damaged records instead of stopping at the first. Blocking.
        """
        if strict is None:
            manifest = self.manifest
            strict = manifest is None or has_checksums(manifest)
        state = load(self.folder, *self.outputs.sizes(), repair=repair, strict=strict)
        adopt(state, self.outputs.output)
        return state

    def read_state(self, *, strict: bool | None = None, repair: bool = False) -> Replay:
        """``state()`` without holding the lock (status, a sharded run's counts)."""
        return unlocked_read(lambda: self.state(strict=strict, repair=repair))

    def writer(
        self,
        state: Replay,
        policy: JournalConfig,
        *,
        marks: Marks | None = None,
        seek_base: int = 0,
        snapshot_every_rows: int = SNAPSHOT_EVERY_ROWS,
    ) -> Writer:
        """The run's writer, resuming from ``state``: the group writer appending to its
        segment, its snapshotter, and the history (metrics.jsonl), with the emits of
        the rows ``state()`` adopted journaled first. Blocking to open."""
        adopted, state.adopted = state.adopted, []
        snapshots = Snapshotter(
            self.folder,
            state,
            every_rows=snapshot_every_rows,
            marks=marks,
            seek_base=seek_base,
        )
        history = Appender(self.folder / HISTORY_NAME)
        try:
            return self.writer_type(
                segment_path(self.folder, state.segment),
                self.outputs.output,
                self.outputs.failed,
                journal_end=state.journal_end,
                out_end=state.out_end,
                failed_end=state.failed_end,
                policy=policy,
                filtered=self.outputs.filtered,
                filtered_end=state.filtered_end,
                snapshots=snapshots,
                history=history,
                adopted=adopted,
            )
        except BaseException:
            history.close()
            snapshots.close()
            raise

    def emits(self) -> tuple[array[int], list[Path]]:
        """Where the output's emits are, in journal order (engine.checkpoint.snapshot's
        ``emit_sources``): read them inside ``unlocked_read`` beside a running run."""
        return emit_sources(self.folder)


def unlocked_read(read: Callable[[], T], attempts: int = UNLOCKED_ATTEMPTS) -> T:
    """``read()``, tried again when it fails on a segment that is gone or cut short.

    A checkpoint read without its lock (status, export beside a running run) can
    meet a snapshot the run takes meanwhile: it deletes a segment the read was
    about to open. The new snapshot covers that segment, so a second read sees it.
    """
    for attempt in range(attempts):
        try:
            return read()
        except (FileNotFoundError, CheckpointError):
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
