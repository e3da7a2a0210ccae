"""The executor seam: where and how a run's rows are processed.

One ``Executor`` subclass per way of launching the work, as datatrove's
``PipelineExecutor`` has Local, Slurm and Ray: ``local`` (this process),
``processes`` (shards as local processes) and ``ray`` (shards on a Ray cluster).
A new executor provides:

- ``kind``: its name, as ``executor.kind`` and ``--executor`` say it;
- ``keys`` and ``parse(p, body)``: its own keys of the ``executor:`` section,
  checked (each problem named by its key, into ``p``) into a frozen value the run
  reads as ``config.executor.options``;
- ``open(fresh)``: lock the run's checkpoint, check or write its manifest and
  replay or plan what is left; returns a ``Session``. Blocking. Raises
  CheckpointError or InputError when the run cannot start (the CLI's exit 2);
- ``run(session, display=, signals=)``: process every row not done yet and return
  a ``RunResult``; blocking, on the calling thread (the CLI's signal handlers need
  the main thread). ``arun`` is the same inside a running event loop (by default,
  ``run`` in a worker thread; the local executor runs on the caller's loop);
- ``announce(session)``: the line logged before the run starts;

and registers itself (engine.executors.registry). The CLI and the Python API never
know which executor they have: engine.executors.launch runs the one sequence
(open, announce, run, report) for both. An executor that cuts the input into
shards need not write these: engine.executors.sharded is one, and its subclasses
provide only how shards are launched and tracked (a ``ShardBackend``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import anyio

from engine import progress
from engine.checkpoint.checkpoint import Checkpoint
from engine.checkpoint.manifest import Locks
from engine.checkpoint.snapshotter import SNAPSHOT_EVERY_ROWS
from engine.config import RunConfig
from engine.problems import Problems
from engine.stats import Outcome

# A sharded run's plan (engine.executors.shards writes it); here so that a local run can
# tell a sharded checkpoint without importing the shard planner.
PLAN_NAME = "plan.json"


def is_sharded(checkpoint_dir: Path) -> bool:
    """Whether the checkpoint is a sharded run's (it has a plan)."""
    return (checkpoint_dir / PLAN_NAME).exists()


@dataclass(slots=True)
class RunResult:
    """How a run ended: its outcome (counters, time, the signal that stopped it) and,
    for a sharded run, the shards that failed (index -> why) and lines for the summary."""

    outcome: Outcome
    failed_shards: dict[int, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Session:
    """An opened run: its checkpoint, held locked, and what the executor found there.

    ``state`` is what the executor replayed or planned (the local executor: the
    journal's Replay, with the run's ``source`` and ``task``; a sharded one: its
    Plan). Close it when the run ends, whatever happened.
    """

    executor: Executor
    config: RunConfig
    checkpoint: Checkpoint
    lock: Locks
    resumed: bool
    state: Any
    source: Any = None
    task: Any = None

    @property
    def manifest(self) -> dict[str, Any] | None:
        return self.checkpoint.manifest

    def report(self, result: RunResult | None = None) -> Path | None:
        """Write the run's report (engine.report); where, or None if it could not."""
        from engine._reporting import write_run_report

        if result is None:
            return write_run_report(self.config)
        outcome = result.outcome
        return write_run_report(self.config, outcome.stats, outcome.elapsed_s)

    def close(self) -> None:
        self.lock.close()


class Executor(ABC):
    """Where a run's rows are processed. Subclasses differ only in how they launch the
    work and track it; see the module's docstring for what one provides."""

    kind: ClassVar[str]
    keys: ClassVar[tuple[str, ...]] = ()  # its keys of the executor: section

    def __init__(
        self,
        config: RunConfig,
        *,
        snapshot_every_rows: int = SNAPSHOT_EVERY_ROWS,
        checkpoint: Checkpoint | None = None,
    ) -> None:
        """``snapshot_every_rows``: rows between two checkpoint snapshots (tests take
        them often). ``checkpoint``: the run's checkpoint, when not the config's own
        (a bench swaps in one whose writer writes nothing)."""
        self.config = config
        self.snapshot_every_rows = snapshot_every_rows
        self.checkpoint = checkpoint or Checkpoint.of(config)

    @classmethod
    def parse(cls, p: Problems, body: Mapping[str, Any]) -> Any:
        """Its own keys of ``executor:`` (``body``, the whole section) as a frozen value;
        problems go into ``p`` named by key. None when it has none."""
        return None

    @property
    def options(self) -> Any:
        """Its parsed keys (``parse``'s value) for this run."""
        return self.config.executor.options

    @abstractmethod
    def open(self, fresh: bool) -> Session:
        """Lock the checkpoint, check or write the manifest, replay or plan. Blocking."""

    @abstractmethod
    def announce(self, session: Session) -> None:
        """Log what the run is about to do (start, or resume how far along)."""

    @abstractmethod
    def run(self, session: Session, *, display: progress.Display, signals: bool) -> RunResult:
        """Process every row not done yet; blocking. ``signals``: stop gracefully on
        SIGINT/SIGTERM (the CLI's; a library caller keeps its own)."""

    async def arun(self, session: Session, *, display: progress.Display) -> RunResult:
        """``run`` from inside an event loop, without signal handlers."""
        return await anyio.to_thread.run_sync(
            lambda: self.run(session, display=display, signals=False)
        )
