"""``executor: ray``: the driver of a sharded run.

The driver plans the shards once (engine.executors.shards), starts a local Ray
cluster on loopback or joins one (engine.executors.cluster), and runs every shard
not done yet as one Ray task (engine.executors.shard), at most
``max_concurrent_shards`` at a time. Ray retries a shard whose worker or node died
(``SHARD_RETRIES``); the retry resumes from the shard's journal. An error of the
shard itself (a disk full, a model down) is not retried: it is written to the
shard's ``error.txt``, the other shards go on, and the run ends non-zero; the next
run retries it. Once every shard is done, the driver merges their files into the
run's own (engine.executors.merge).

Caps: one small actor holds the run's ``Quota`` (engine.executors.quota); every
running shard leases its share of each model's cap from it, and reports its
counters with each lease, which the driver reads for the progress display.

A SIGKILL of the driver takes its shard tasks with it (and a local cluster: the
cluster module ties it to the driver); the next run finds the done shards by their
markers and resumes the others from their journals.
"""

from __future__ import annotations

import logging
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import anyio

from engine import progress
from engine.checkpoint.manifest import (
    check_manifest,
    input_print,
    lock_checkpoint,
    new_manifest,
    read_manifest,
    write_manifest,
)
from engine.config import ModelConfig, RunConfig
from engine.errors import CheckpointError
from engine.executors.merge import merge, merged
from engine.executors.quota import LEASE_S, WAITING_LEASE_S, Quota
from engine.executors.shards import (
    Plan,
    ShardState,
    check_plan,
    clear_shards,
    journaled_counts,
    mark_failed,
    read_plan,
    shard_state,
    wait_unlocked,
    write_plan,
    write_storage_token,
)
from engine.history import HISTORY_NAME, Appender, History, run_id
from engine.input.sources import open_source
from engine.metrics import serving
from engine.redact import redact_url
from engine.stats import RunStats, combine

log = logging.getLogger("turnstile")

SHARD_RETRIES = 3  # attempts after a worker or node died, per shard and run


@dataclass(slots=True)
class ShardedOutcome:
    """How a sharded run ended."""

    stats: RunStats
    elapsed_s: float
    shards: list[ShardState]
    failed_shards: dict[int, str] = field(default_factory=dict)
    interrupted_by: int | None = None
    merged: dict[str, int] | None = None
    resumed: bool = False


class QuotaServer:
    """The quota, as a Ray actor (num_cpus 0, restarted for ever): leases and counters."""

    def __init__(self, caps: dict[str, int], created: float) -> None:
        # Constructed again after a crash: then it is late, and it must not grant
        # what it cannot know is free until every shard has told it what it holds.
        restarted = time.time() - created > 5.0
        self.quota = Quota(caps=caps, started=time.monotonic(), recovering=restarted)
        self.progress: dict[int, dict[str, Any]] = {}

    def lease(
        self, shard: int, claims: dict[str, int], counters: dict[str, Any]
    ) -> tuple[dict[str, int], float]:
        self.progress[shard] = counters
        grants = self.quota.lease(shard, claims, time.monotonic())
        short = any(
            grant < self.quota.target(shard, self.quota.caps[model])
            for model, grant in grants.items()
        )
        return grants, WAITING_LEASE_S if short else LEASE_S

    def release(self, shard: int, counters: dict[str, Any] | None = None) -> None:
        self.quota.release(shard)
        if counters is not None:
            self.progress[shard] = counters

    def snapshot(self) -> dict[int, dict[str, Any]]:
        return dict(self.progress)


def prepare_sharded(config: RunConfig, *, fresh: bool, shards: int) -> tuple[Any, Plan, bool]:
    """Lock the run, check or write its manifest and plan. Blocking. Returns the lock
    (keep it open), the plan, and whether this resumes a run."""
    folder = config.checkpoint_dir
    lock = lock_checkpoint(folder)
    try:
        source = open_source(config.input, config.input_columns)  # the driver's one
        if fresh:
            clear_shards(config)
        manifest = read_manifest(folder)
        plan = read_plan(folder)
        if manifest is not None and plan is None:
            raise CheckpointError(
                f"{folder} holds a run made with executor: local; resume it with executor: "
                "local, use another checkpoint_dir, or run with --fresh to start over"
            )
        if manifest is None:
            fingerprint = input_print(source)
            write_manifest(folder, new_manifest(config, fingerprint))
            resumed = False
        else:
            fingerprint = check_manifest(manifest, config, source)
            resumed = True
        if plan is None:
            pieces = source.plan(shards)
            plan = Plan(shards=tuple(pieces), input_digest=fingerprint.digest)
            write_plan(folder, plan)
        check_plan(plan, shards, fingerprint.digest, folder)
    except BaseException:
        lock.close()
        raise
    return lock, plan, resumed


def run_sharded(
    config: RunConfig, plan: Plan, *, display: progress.Display, signals: bool, resumed: bool
) -> ShardedOutcome:
    """Run every shard of ``plan`` not done yet, then merge; blocking."""
    from engine.executors.cluster import ray_cluster

    started = time.monotonic()
    stats = RunStats(turn_rule=config.kind.progress_note(config.section))
    stats.rows_total = sum(piece.rows for piece in plan.shards)
    outcome = ShardedOutcome(stats=stats, elapsed_s=0.0, shards=[], resumed=resumed)
    states = [shard_state(config.checkpoint_dir, piece) for piece in plan.shards]
    todo = [
        piece for piece, state in zip(plan.shards, states, strict=True) if state.state != "done"
    ]
    done_parts = {s.index: _done_progress(s) for s in states if s.state == "done"}
    executor = config.executor
    if todo:
        known = (read_manifest(config.checkpoint_dir) or {}).get("input", {})
        token = write_storage_token(config.checkpoint_dir)
        with ray_cluster(
            executor.address, num_cpus=None, work_dir=config.checkpoint_dir
        ) as _cluster:
            driver = _Driver(config, plan, token, known, stats, done_parts, outcome)
            anyio.run(driver.main, todo, display, signals, started)
    if todo:
        _wait_for_shards(config, todo)  # a stopped shard's last writes land before counting
    outcome.shards = [shard_state(config.checkpoint_dir, piece) for piece in plan.shards]
    if all(s.state == "done" for s in outcome.shards):
        if not merged(config):
            outcome.merged = merge(config, plan)
        _final_counts(stats, outcome.shards)
    else:
        _journaled_counts(config, plan, stats, outcome.shards)
    outcome.elapsed_s = time.monotonic() - started
    return outcome


class _Driver:
    """The driver's loop: submit shards, wait for them, read their counters."""

    def __init__(
        self,
        config: RunConfig,
        plan: Plan,
        token: str,
        known: dict[str, Any],
        stats: RunStats,
        done_parts: dict[int, dict[str, Any]],
        outcome: ShardedOutcome,
    ) -> None:
        import ray

        self.ray = ray
        self.config = config
        self.plan = plan
        self.token = token
        self.known = known
        self.stats = stats
        self.done_parts = done_parts
        self.outcome = outcome
        self.caps = {name: m.max_concurrency for name, m in config.models.items()}
        self.models = {
            name: (config.models[name].max_concurrency, list(_urls(config.models[name])))
            for name in sorted(config.models_used())
        }
        actor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(QuotaServer)
        self.quota: Any = actor.remote(self.caps, time.time())
        self.stopping = False
        self.running: dict[Any, Any] = {}  # shard task ref -> its slice

    async def main(
        self, todo: list[Any], display: progress.Display, signals: bool, started: float
    ) -> None:
        appender = await anyio.to_thread.run_sync(
            Appender, self.config.checkpoint_dir / HISTORY_NAME
        )
        history = History(run_id(), appender.lines)
        try:
            with serving(self.config.metrics, lambda: self.stats):
                async with anyio.create_task_group() as group:
                    group.start_soon(display.run, self.stats, started)
                    group.start_soon(self._sample, history, appender)
                    if signals:
                        group.start_soon(self._watch_signals, group)
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

    async def _run(self, todo: list[Any]) -> None:
        ray = self.ray
        from engine.executors.shard import run_shard

        task = ray.remote(run_shard).options(
            num_cpus=self.config.executor.num_cpus_per_shard,
            max_retries=SHARD_RETRIES,
            retry_exceptions=False,
        )
        quota = self.quota

        def lease(shard: int, claims: dict[str, int], counters: dict[str, Any]) -> Any:
            return ray.get(quota.lease.remote(shard, claims, counters), timeout=30)

        pending = deque(todo)
        running = self.running
        limit = self.config.executor.max_concurrent_shards or len(todo)
        last_poll = 0.0
        while pending or running:
            while pending and len(running) < limit and not self.stopping:
                piece = pending.popleft()
                ref = task.remote(
                    self.config, piece, token=self.token, known_input=self.known, lease=lease
                )
                running[ref] = piece
            if not running:
                break
            ready, _ = await anyio.to_thread.run_sync(
                lambda: ray.wait(list(running), num_returns=1, timeout=0.5)
            )
            for ref in ready:
                piece = running.pop(ref)
                await self._finished(ref, piece)
            if time.monotonic() - last_poll >= 0.5:
                last_poll = time.monotonic()
                await self._poll(len(running), len(pending))
        await self._poll(0, len(pending))

    async def _finished(self, ref: Any, piece: Any) -> None:
        ray = self.ray
        try:
            result = await anyio.to_thread.run_sync(ray.get, ref)
        except ray.exceptions.TaskCancelledError:
            return
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            self._failed(piece.index, f"{type(cause).__name__}: {cause}")
        except ray.exceptions.RayError as exc:  # its worker or node died, retries spent
            self._failed(piece.index, f"{type(exc).__name__}: {exc}")
        else:
            self.done_parts[piece.index] = result["progress"]
        await anyio.to_thread.run_sync(lambda: ray.get(self.quota.release.remote(piece.index)))

    def _failed(self, index: int, error: str) -> None:
        self.outcome.failed_shards[index] = error
        mark_failed(self.config.checkpoint_dir, index, error)
        log.error(f"shard {index} failed: {error} (the other shards go on; rerun to retry it)")

    async def _poll(self, running: int, pending: int) -> None:
        ray = self.ray
        try:
            live = await anyio.to_thread.run_sync(
                lambda: ray.get(self.quota.snapshot.remote(), timeout=10)
            )
        except ray.exceptions.RayError:
            return  # the quota actor restarting: the display waits a moment
        parts = {**live, **self.done_parts}
        combine(parts.values(), self.models, into=self.stats)
        done = len(self.plan.shards) - running - pending - len(self.outcome.failed_shards)
        self.stats.shards = (
            f"{done}/{len(self.plan.shards)} shards done, {running} running, {pending} pending"
            + (f", {len(self.outcome.failed_shards)} failed" if self.outcome.failed_shards else "")
        )

    async def _watch_signals(self, group: Any) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                self.outcome.interrupted_by = signum
                self.stopping = True
                log.info(
                    f"{signal.Signals(signum).name}: stopping the shards; every finished "
                    "turn is in their journals"
                )
                for ref in list(self.running):
                    self.ray.cancel(ref, force=True)


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


# How long a stopped run waits for a shard's worker to let go of its checkpoint.
STOP_WAIT_S = 30.0


def _wait_for_shards(config: RunConfig, pieces: list[Any]) -> None:
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
