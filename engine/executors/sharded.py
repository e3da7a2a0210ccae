"""A sharded run, whatever launches its shards: plan, drive, wait, merge, count.

``ShardedExecutor`` is the executor seam's sharded half. It plans the shards once
(engine.executors.shards), runs every shard not done yet through its backend, at
most ``max_concurrent_shards`` at a time, and, once every shard is done, merges
their files into the run's own (engine.executors.merge). Each shard is the
single-process engine on its slice (engine.executors.shard), with its caps leased
from the run's quota (engine.executors.quota). A shard that fails is written to
its ``error.txt``; the others go on, the run ends non-zero, and the next run
retries it from its journal; done shards are skipped by their markers.

A new way of launching shards (Slurm, any job array) is one subclass with a
``backend()`` returning a ``ShardBackend``, which provides:

- ``place()``: a context manager around the whole run, outside the event loop
  (start or join a cluster; nothing for local processes);
- ``start(group)``: inside the driver's event loop, before the first shard (a task
  group for anything it serves while shards run);
- ``submit(job)``: launch one shard: call ``engine.executors.shard.run_shard`` with
  the job's values wherever it runs, and a lease call that reaches ``lease`` here
  (or a quota of the backend's own); returns a handle;
- ``wait(handles, timeout_s)``: the handles whose shard ended, waiting at most that;
- ``result(handle)``: how it ended (``ShardEnd``: its counters, or why it failed);
- ``cancel(handle)``: stop it now (its journal keeps every finished turn);
- ``counters()``: the running shards' counters as they last reported them;
- ``release(index)``: an ended shard's share goes back to the others.

``QuotaServer`` (engine.executors.quota) does the leasing and keeps the counters;
a backend only carries the calls to it.
"""

from __future__ import annotations

import logging
import signal
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar

import anyio
from anyio.abc import TaskGroup

from engine import progress
from engine.checkpoint.checkpoint import Checkpoint
from engine.checkpoint.manifest import open_manifest
from engine.config import ModelConfig, RunConfig
from engine.errors import CheckpointError
from engine.executors.base import Executor, RunResult, Session
from engine.executors.merge import merge, merged
from engine.executors.shards import (
    Plan,
    ShardState,
    check_plan,
    clear_shards,
    journaled_counts,
    mark_failed,
    read_plan,
    shard_config,
    shard_state,
    wait_unlocked,
    write_plan,
    write_storage_token,
)
from engine.history import HISTORY_NAME, Appender, History, run_id
from engine.input.sources import Slice, open_source
from engine.metrics import serving
from engine.problems import Problems
from engine.redact import redact_url
from engine.stats import Outcome, RunStats, combine

log = logging.getLogger("turnstile")

SHARDED_KEYS = ("shards", "max_concurrent_shards")
# How long a stopped run waits for a shard's worker to let go of its checkpoint.
STOP_WAIT_S = 30.0


@dataclass(frozen=True, slots=True)
class ShardedOptions:
    """The keys every sharded executor reads: ``shards`` (fixed by the first run of a
    checkpoint) and ``max_concurrent_shards`` (None: the executor's default)."""

    shards: int = 8
    max_concurrent_shards: int | None = None


def parse_sharded(p: Problems, body: Mapping[str, Any]) -> ShardedOptions:
    shards = p.positive_int("executor.shards", body.get("shards"), 8) or 8
    concurrent = p.positive_int(
        "executor.max_concurrent_shards", body.get("max_concurrent_shards"), None
    )
    return ShardedOptions(shards=shards, max_concurrent_shards=concurrent)


@dataclass(frozen=True, slots=True)
class ShardJob:
    """What one shard needs to run: ``run_shard(config, piece, token=..., known_input=...,
    snapshot_every_rows=..., lease=...)``, in whatever process the backend starts."""

    config: RunConfig
    piece: Slice
    token: str  # the storage check's token (engine.executors.shards)
    known_input: dict[str, Any]  # the input's fingerprint, hashed once by the driver
    snapshot_every_rows: int


@dataclass(frozen=True, slots=True)
class ShardEnd:
    """How a shard ended: its final counters, or why it failed (None: it was cancelled)."""

    progress: dict[str, Any] | None = None
    error: str | None = None
    cancelled: bool = False


class ShardBackend(ABC):
    """How a sharded run's shards are launched and tracked (see the module's docstring)."""

    def place(self) -> AbstractContextManager[Any]:
        return nullcontext()

    async def start(self, group: TaskGroup) -> None:
        return None

    @abstractmethod
    async def submit(self, job: ShardJob) -> Any: ...

    @abstractmethod
    async def wait(self, handles: list[Any], timeout_s: float) -> list[Any]: ...

    @abstractmethod
    async def result(self, handle: Any) -> ShardEnd: ...

    @abstractmethod
    def cancel(self, handle: Any) -> None: ...

    @abstractmethod
    async def counters(self) -> dict[int, dict[str, Any]] | None: ...

    @abstractmethod
    async def release(self, index: int) -> None: ...


class ShardedExecutor(Executor):
    """Shards through a ``ShardBackend``: subclasses give ``backend()`` and ``where()``."""

    keys: ClassVar[tuple[str, ...]] = SHARDED_KEYS
    default_concurrency: int | None = None  # shards at once when the config says none

    @classmethod
    def parse(cls, p: Problems, body: Mapping[str, Any]) -> Any:
        return parse_sharded(p, body)

    @abstractmethod
    def backend(self, plan: Plan) -> ShardBackend:
        """The backend that launches this run's shards."""

    @abstractmethod
    def where(self) -> str:
        """Where the shards run, for the log (``on a local Ray cluster``)."""

    @property
    def shards(self) -> int:
        return int(self.options.shards)

    def open(self, fresh: bool) -> Session:
        """Lock the run, check or write its manifest and plan. Blocking."""
        config = self.config
        folder = config.checkpoint_dir
        checkpoint = self.checkpoint
        lock = checkpoint.lock(output=False)  # the merge writes the output, atomically
        try:
            source = open_source(config.input, config.input_columns)  # the driver's one
            if fresh:
                clear_shards(config)
            manifest = checkpoint.manifest
            plan = read_plan(folder)
            if manifest is not None and plan is None:
                raise CheckpointError(
                    f"{folder} holds a run made with executor: local; resume it with "
                    "executor: local, use another checkpoint_dir, or run with --fresh to "
                    "start over"
                )
            resumed, fingerprint = open_manifest(config, source, manifest)
            if plan is None:
                plan = Plan(shards=tuple(source.plan(self.shards)), input_digest=fingerprint.digest)
                write_plan(folder, plan)
            check_plan(plan, self.shards, fingerprint.digest, folder)
        except BaseException:
            lock.close()
            raise
        return Session(self, config, checkpoint, lock, resumed, plan)

    def announce(self, session: Session) -> None:
        log.info(
            f"{'resuming' if session.resumed else 'starting'} {self.config.checkpoint_dir}: "
            f"{len(session.state.shards)} shards {self.where()}"
        )

    def run(self, session: Session, *, display: progress.Display, signals: bool) -> RunResult:
        """Run every shard of the plan not done yet, then merge; blocking."""
        config, plan = self.config, session.state
        started = time.monotonic()
        stats = RunStats(turn_rule=config.kind.progress_note(config.section))
        stats.rows_total = sum(piece.rows for piece in plan.shards)
        outcome = Outcome(stats=stats, elapsed_s=0.0, resumed=session.resumed)
        result = RunResult(outcome=outcome)
        states = [shard_state(config.checkpoint_dir, piece) for piece in plan.shards]
        todo = [p for p, s in zip(plan.shards, states, strict=True) if s.state != "done"]
        done_parts = {s.index: _done_progress(s) for s in states if s.state == "done"}
        if todo:
            known = (session.manifest or {}).get("input", {})
            token = write_storage_token(config.checkpoint_dir)
            backend = self.backend(plan)
            driver = _Driver(self, plan, backend, token, known, done_parts, result)
            with backend.place():
                anyio.run(driver.main, todo, display, signals, started)
            _wait_for_shards(config, todo)  # a stopped shard's last writes land before counting
        shards = [shard_state(config.checkpoint_dir, piece) for piece in plan.shards]
        if all(s.state == "done" for s in shards):
            if not merged(config):
                merge(config, plan)
            _final_counts(stats, shards)
        else:
            _journaled_counts(config, plan, stats, shards)
        done = sum(s.state == "done" for s in shards)
        result.notes.append(f"shards: {done}/{len(shards)} done")
        outcome.elapsed_s = time.monotonic() - started
        return result


class _Driver:
    """The driver's loop: submit shards, wait for them, read their counters."""

    def __init__(
        self,
        executor: ShardedExecutor,
        plan: Plan,
        backend: ShardBackend,
        token: str,
        known: dict[str, Any],
        done_parts: dict[int, dict[str, Any]],
        result: RunResult,
    ) -> None:
        self.executor = executor
        self.config = executor.config
        self.plan = plan
        self.backend = backend
        self.token = token
        self.known = known
        self.done_parts = done_parts
        self.result = result
        self.stats = result.outcome.stats
        self.models = {
            name: (self.config.models[name].max_concurrency, _urls(self.config.models[name]))
            for name in sorted(self.config.models_used())
        }
        self.stopping = False
        self.running: dict[Any, Slice] = {}  # backend handle -> its slice

    async def main(
        self, todo: list[Slice], display: progress.Display, signals: bool, started: float
    ) -> None:
        appender = await anyio.to_thread.run_sync(
            Appender, self.config.checkpoint_dir / HISTORY_NAME
        )
        history = History(run_id(), appender.lines)
        try:
            with serving(self.config.metrics, lambda: self.stats):
                async with anyio.create_task_group() as group:
                    await self.backend.start(group)
                    group.start_soon(display.run, self.stats, started)
                    group.start_soon(self._sample, history, appender)
                    if signals:
                        group.start_soon(self._watch_signals)
                    await self._run(todo)
                    group.cancel_scope.cancel()
            appender.write(history.line(self.stats, time.time(), event="end"))
        finally:
            appender.close()

    async def _sample(self, history: History, appender: Appender) -> None:
        """The whole run's history, from the shards' counters, in the driver's checkpoint."""
        while True:
            appender.write(history.line(self.stats, time.time()))
            await anyio.sleep(history.step)

    async def _run(self, todo: list[Slice]) -> None:
        backend = self.backend
        pending = deque(todo)
        running = self.running
        most = self.executor.options.max_concurrent_shards or self.executor.default_concurrency
        limit = most or len(todo)
        last_poll = 0.0
        while pending or running:
            while pending and len(running) < limit and not self.stopping:
                piece = pending.popleft()
                job = ShardJob(
                    self.config, piece, self.token, self.known, self.executor.snapshot_every_rows
                )
                running[await backend.submit(job)] = piece
            if not running:
                break
            for handle in await backend.wait(list(running), 0.5):
                piece = running.pop(handle)
                await self._finished(handle, piece)
            if time.monotonic() - last_poll >= 0.5:
                last_poll = time.monotonic()
                await self._poll(len(running), len(pending))
        await self._poll(0, len(pending))

    async def _finished(self, handle: Any, piece: Slice) -> None:
        end = await self.backend.result(handle)
        if end.error is not None:
            self._failed(piece.index, end.error)
        elif end.progress is not None:
            self.done_parts[piece.index] = end.progress
        if not end.cancelled:
            await self.backend.release(piece.index)

    def _failed(self, index: int, error: str) -> None:
        self.result.failed_shards[index] = error
        mark_failed(self.config.checkpoint_dir, index, error)
        log.error(f"shard {index} failed: {error} (the other shards go on; rerun to retry it)")

    async def _poll(self, running: int, pending: int) -> None:
        live = await self.backend.counters()
        if live is None:
            return  # the quota restarting: the display waits a moment
        combine({**live, **self.done_parts}.values(), self.models, into=self.stats)
        failed = len(self.result.failed_shards)
        done = len(self.plan.shards) - running - pending - failed
        self.stats.shards = (
            f"{done}/{len(self.plan.shards)} shards done, {running} running, {pending} pending"
            + (f", {failed} failed" if failed else "")
        )

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                self.result.outcome.interrupted_by = signum
                self.stopping = True
                log.info(
                    f"{signal.Signals(signum).name}: stopping the shards; every finished "
                    "turn is in their journals"
                )
                for handle in list(self.running):
                    self.backend.cancel(handle)


def _urls(model: ModelConfig) -> list[str]:
    """The replica URLs a model's shards report, in their order (the local ones by number),
    as they are shown: without credentials."""
    if model.is_local:
        return [f"local:{i}" for i in range(model.local.replicas)]
    return [redact_url(url) for url in model.base_urls]


def _done_progress(state: ShardState) -> dict[str, Any]:
    counts = state.counts
    return {
        "rows_done": counts.get("rows", 0),
        "rows_failed": counts.get("failed", 0),
        "rows_filtered": counts.get("filtered", 0),
        "rows_skipped": counts.get("rows", 0),
    }


def _wait_for_shards(config: RunConfig, pieces: list[Slice]) -> None:
    """Wait until none of ``pieces`` holds its shard's checkpoint any more (its worker
    cancelled or exited), so that its files are final before they are counted."""
    deadline = time.monotonic() + STOP_WAIT_S + config.shutdown_grace_s
    for piece in pieces:
        if not wait_unlocked(config.checkpoint_dir, piece.index, deadline - time.monotonic()):
            log.warning(f"shard {piece.index} still holds its checkpoint; its count may be short")


def _journaled_counts(
    config: RunConfig, plan: Plan, stats: RunStats, shards: list[ShardState]
) -> None:
    """The rows of a run that did not finish, from every shard's files: a done shard's
    marker, a started one's checkpoint (what the summary reports is what is journaled)."""
    rows = failed = filtered = 0
    for piece, state in zip(plan.shards, shards, strict=True):
        counts = state.counts if state.state == "done" else journaled_counts(config, piece)
        if counts is None:
            continue
        rows += counts.get("rows", 0)
        failed += counts.get("failed", 0)
        filtered += counts.get("filtered", 0)
    stats.rows_done, stats.rows_failed, stats.rows_filtered = rows, failed, filtered


def _final_counts(stats: RunStats, shards: list[ShardState]) -> None:
    stats.rows_done = sum(s.counts.get("rows", 0) for s in shards)
    stats.rows_failed = sum(s.counts.get("failed", 0) for s in shards)
    stats.rows_filtered = sum(s.counts.get("filtered", 0) for s in shards)


# -- turnstile status ----------------------------------------------------------------


def status_lines(config: RunConfig) -> list[str]:
    """The shards of a sharded run: done, failed, started or pending, rows each."""
    plan = read_plan(config.checkpoint_dir)
    if plan is None:
        return []
    states = [shard_state(config.checkpoint_dir, piece) for piece in plan.shards]
    lines = []
    by_state: dict[str, int] = {}
    for piece, state in zip(plan.shards, states, strict=True):
        by_state[state.state] = by_state.get(state.state, 0) + 1
        line = f"  shard {state.index:04d}: {state.state:<8} {state.rows} rows"
        if state.state == "done":
            line += f" ({state.counts.get('ok', 0)} ok, {state.counts.get('failed', 0)} failed)"
        elif state.started:
            line += f", {_finished(config, piece)} finished"
        if state.error:
            line += f": {state.error.splitlines()[0][:160]}"
        lines.append(line)
    head = ", ".join(f"{n} {name}" for name, n in sorted(by_state.items()))
    return [f"shards:     {len(states)} ({head})", *lines]


def _finished(config: RunConfig, piece: Slice) -> str:
    """Rows a started shard has finished, from its checkpoint ("?" if it cannot be read)."""
    try:
        return str(len(Checkpoint.of(shard_config(config, piece)).read_state(strict=False).done))
    except (OSError, CheckpointError):
        return "?"
