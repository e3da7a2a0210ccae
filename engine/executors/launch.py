"""A run from open to report, written once: ``turnstile run`` and ``engine.run`` each
make one call here, whatever executor the config names.

``open_run(config, fresh)`` opens the run with its executor (engine.executors.registry)
and returns the ``Session``; ``run_command`` is the CLI's sequence (exit codes,
signals, the summary on stderr), ``arun``/``run`` the Python API's (a Summary, or the
error raised). Both: open, announce, run, write the report (also when the run
stopped on an error), close.

Exit codes (engine.errors): 0 every row succeeded; 1 some rows failed; 2 the
config, input or checkpoint cannot be used (nothing was sent); 3 the run stopped
on an error it cannot go past, or a shard failed (rerun to resume or retry); 4 the
budget was reached (engine.cost); 70
Turnstile crashed (a bug; resumable); 128+N stopped by signal N (resumable).
"""

from __future__ import annotations

import sys
from typing import Any

import anyio

from engine import progress
from engine.checkpoint.snapshotter import SNAPSHOT_EVERY_ROWS
from engine.config import RunConfig
from engine.crash import write_crash_log
from engine.errors import (
    EXIT_CRASHED,
    EXIT_FAILED_ROWS,
    EXIT_OK,
    EXIT_STOPPED,
    EXIT_UNUSABLE,
    CheckpointError,
    ExecutorError,
    InputError,
    TurnstileError,
    exit_code_of,
)
from engine.executors.base import Executor, RunResult, Session
from engine.executors.registry import executor_class
from engine.redact import model_secrets
from engine.stats import Summary


def executor_for(config: RunConfig, **settings: Any) -> Executor:
    """The executor ``config.executor.kind`` names, for this config."""
    return executor_class(config.executor.kind)(config, **settings)


def open_run(config: RunConfig, fresh: bool, executor: Executor | None = None) -> Session:
    """Open the run ``config`` describes (lock, manifest, state); blocking. ``fresh``
    discards its checkpoint and output first. Close the session when done."""
    return (executor or executor_for(config)).open(fresh)


def run_command(
    config: RunConfig,
    *,
    fresh: bool,
    quiet: bool,
    snapshot_every_rows: int = SNAPSHOT_EVERY_ROWS,
    executor: Executor | None = None,
) -> int:
    """``turnstile run``: the run to its end, its summary on stderr; the exit code."""
    executor = executor or executor_for(config, snapshot_every_rows=snapshot_every_rows)
    try:
        session = open_run(config, fresh, executor)
    except (CheckpointError, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    try:
        executor.announce(session)
        display = progress.Display(config.progress_interval_s, quiet=quiet)
        try:
            result = executor.run(session, display=display, signals=True)
        except TurnstileError as exc:
            print(f"error: {exc}", file=sys.stderr)
            session.report()
            return exit_code_of(exc)  # 3, or the error's own (a budget reached: 4)
        except Exception as exc:  # a bug: say so, keep the traceback, leave it resumable
            session.report()
            return _crashed(exc, config)
    finally:
        session.close()
    return _finish(session, result)


def _finish(session: Session, result: RunResult) -> int:
    config, outcome = session.config, result.outcome
    report = session.report(result)
    print(progress.summary(outcome), file=sys.stderr)
    if report is not None:
        print(f"report: {report}", file=sys.stderr)
    for note in result.notes:
        print(note, file=sys.stderr)
    again = f"run `turnstile run {config.config_path}` again"
    if outcome.interrupted_by is not None:
        progress.log.info(f"stopped; {again} to resume")
        return 128 + outcome.interrupted_by
    if result.failed_shards:
        failed = ", ".join(str(i) for i in sorted(result.failed_shards))
        progress.log.info(
            f"shards {failed} failed (see shards/NNNN/error.txt under {config.checkpoint_dir}); "
            f"the others are done: {again} to retry them"
        )
        return EXIT_STOPPED
    if outcome.stats.rows_failed:
        progress.log.info(f"{outcome.stats.rows_failed} rows failed: see {config.failed_output}")
        return EXIT_FAILED_ROWS
    progress.log.info(f"done: {config.output}")
    return EXIT_OK


def _crashed(exc: BaseException, config: RunConfig) -> int:
    secrets = [
        secret
        for model in config.models.values()
        for secret in model_secrets(model.api_key(), model.base_urls)
    ]
    summary, log = write_crash_log(config.checkpoint_dir, exc, secrets)
    print(
        f"error: Turnstile crashed: {summary} (a bug; the traceback is in {log}). "
        f"Nothing finished is lost: run `turnstile run {config.config_path}` again to resume",
        file=sys.stderr,
    )
    return EXIT_CRASHED


async def arun(config: RunConfig, *, fresh: bool, progress_log: bool) -> Summary:
    """The Python API's run inside a running event loop: a Summary, or the error raised.
    No signal handlers: the caller's cancellation stops the run."""
    executor = executor_for(config)
    session = await anyio.to_thread.run_sync(open_run, config, fresh, executor)
    try:
        executor.announce(session)
        display = progress.Display(config.progress_interval_s, live=False, quiet=not progress_log)
        try:
            result = await executor.arun(session, display=display)
        except BaseException:
            await anyio.to_thread.run_sync(session.report)
            raise
    finally:
        session.close()
    await anyio.to_thread.run_sync(session.report, result)
    if result.failed_shards:
        failed = ", ".join(f"{i} ({error})" for i, error in sorted(result.failed_shards.items()))
        raise ExecutorError(f"shards failed: {failed}; the others are done: run again to retry")
    return Summary.of(result.outcome, config.output, config.failed_output, config.filtered_output)
