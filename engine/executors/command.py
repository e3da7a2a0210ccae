"""``turnstile run`` and ``turnstile status`` for a sharded run (``executor: ray``).

The same exit codes as a local run (engine.cli): 0 every row succeeded, 1 some rows
failed, 2 the config, input or checkpoint cannot be used, 3 a shard failed or the
cluster could not be used (rerun to retry), 128+N stopped by signal N.
"""

from __future__ import annotations

import sys

from engine import progress
from engine._reporting import write_run_report
from engine.checkpoint.checkpoint import Checkpoint
from engine.config import RunConfig
from engine.errors import (
    EXIT_FAILED_ROWS,
    EXIT_OK,
    EXIT_STOPPED,
    EXIT_UNUSABLE,
    CheckpointError,
    InputError,
    TurnstileError,
)
from engine.executors.shards import read_plan, shard_config, shard_state
from engine.input.sources import Slice
from engine.stats import Outcome


def run_command(config: RunConfig, *, fresh: bool, quiet: bool) -> int:
    from engine.executors.ray_run import prepare_sharded, run_sharded

    try:
        lock, plan, resumed = prepare_sharded(config, fresh=fresh, shards=config.executor.shards)
    except (CheckpointError, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    try:
        where = config.executor.address or "a local Ray cluster on 127.0.0.1"
        progress.log.info(
            f"{'resuming' if resumed else 'starting'} {config.checkpoint_dir}: "
            f"{len(plan.shards)} shards on {where}"
        )
        display = progress.Display(config.progress_interval_s, quiet=quiet)
        try:
            outcome = run_sharded(config, plan, display=display, signals=True, resumed=resumed)
        except TurnstileError as exc:
            print(f"error: {exc}", file=sys.stderr)
            write_run_report(config)
            return EXIT_STOPPED
    finally:
        lock.close()
    report = write_run_report(config, outcome.stats, outcome.elapsed_s)
    summary = Outcome(stats=outcome.stats, elapsed_s=outcome.elapsed_s, resumed=resumed)
    print(progress.summary(summary), file=sys.stderr)
    if report is not None:
        print(f"report: {report}", file=sys.stderr)
    done = sum(state.state == "done" for state in outcome.shards)
    print(f"shards: {done}/{len(outcome.shards)} done", file=sys.stderr)
    if outcome.interrupted_by is not None:
        progress.log.info(f"stopped; run `turnstile run {config.config_path}` again to resume")
        return 128 + outcome.interrupted_by
    if outcome.failed_shards:
        failed = ", ".join(str(i) for i in sorted(outcome.failed_shards))
        progress.log.info(
            f"shards {failed} failed (see shards/NNNN/error.txt under {config.checkpoint_dir}); "
            f"the others are done: run `turnstile run {config.config_path}` again to retry them"
        )
        return EXIT_STOPPED
    if outcome.stats.rows_failed:
        progress.log.info(f"{outcome.stats.rows_failed} rows failed: see {config.failed_output}")
        return EXIT_FAILED_ROWS
    progress.log.info(f"done: {config.output}")
    return EXIT_OK


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
