"""The `turnstile` command.

Exit codes: 0 every row succeeded; 1 some rows failed (see the failed file);
2 the config, input or checkpoint cannot be used as it is (nothing was sent);
3 the run stopped on an error it cannot go past (disk full, local server would
not start): run the same command to resume; 70 Turnstile crashed (a bug: the
traceback is in <checkpoint_dir>/crash.log), resumable; 128+N stopped by signal N,
resumable.
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

from engine import progress
from engine.checkpoint.checkpoint import Checkpoint
from engine.checkpoint.journal import repair as repair_journal
from engine.checkpoint.journal import segments
from engine.checkpoint.manifest import has_checksums, lock_checkpoint, read_manifest
from engine.checkpoint.snapshot import read_snapshot, tail_segments
from engine.checkpoint.snapshotter import SNAPSHOT_EVERY_ROWS
from engine.config import RunConfig, load_config
from engine.errors import (
    EXIT_CRASHED,
    EXIT_OK,
    EXIT_STOPPED,
    EXIT_UNUSABLE,
    CheckpointError,
    ConfigError,
    TurnstileError,
)
from engine.executors.base import is_sharded
from engine.executors.launch import run_command
from engine.executors.registry import names as executor_names
from engine.input.sources import open_source


def _load(path: str, *, check_env: bool = True) -> RunConfig | None:
    try:
        return load_config(path, check_env=check_env)
    except ConfigError as exc:
        _problems(path, exc)
        return None


def _problems(path: str, exc: ConfigError) -> int:
    print(f"{path}: {len(exc.problems)} problem(s) in the config:", file=sys.stderr)
    for problem in exc.problems:
        print(f"  {problem}", file=sys.stderr)
    return EXIT_UNUSABLE


def cmd_run(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_UNUSABLE
    try:
        config = _overrides(config, args)
    except ConfigError as exc:
        return _problems(args.config, exc)
    return run_command(
        config, fresh=args.fresh, quiet=args.quiet, snapshot_every_rows=args.snapshot_every_rows
    )


def _overrides(config: RunConfig, args: argparse.Namespace) -> RunConfig:
    """--executor, --shards and --metrics-port over the config's sections."""
    executor = config.executor
    keys = {"kind": args.executor, "shards": args.shards}
    given = {key: value for key, value in keys.items() if value is not None}
    if given:
        executor = executor.override(**given)
    metrics = config.metrics
    if args.metrics_port is not None:
        metrics = replace(metrics, port=args.metrics_port)
    return replace(config, executor=executor, metrics=metrics)


def cmd_status(args: argparse.Namespace) -> int:
    config = _load(args.config, check_env=False)
    if config is None:
        return EXIT_UNUSABLE
    try:
        manifest = read_manifest(config.checkpoint_dir)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    if manifest is None:
        print(f"no run yet in {config.checkpoint_dir}")
        return EXIT_OK

    try:
        # Read without the lock, beside a run that may be taking a snapshot.
        state = Checkpoint.of(config).read_state(
            repair=True,  # count the damaged records instead of stopping at the first
            strict=has_checksums(manifest),
        )
    except (FileNotFoundError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    try:
        total = open_source(config.input, config.input_columns).count()
    except (OSError, TurnstileError):
        total = None  # missing, or unreadable here (an extra not installed)
    done = len(state.done)
    print(f"checkpoint: {config.checkpoint_dir} (started {manifest.get('created')})")
    print(f"input:      {config.input} ({'missing' if total is None else f'{total} rows'})")
    print(f"output:     {config.output}")
    note = config.kind.describe(config.section)
    if note is not None:
        print(f"turns:      {note}")
    if is_sharded(config.checkpoint_dir):
        from engine.executors.sharded import status_lines

        for line in status_lines(config):
            print(line)
        return EXIT_OK
    recorded = manifest.get("config")
    section = recorded.get(config.task) if isinstance(recorded, dict) else None
    problem = config.kind.resume_problem(section if isinstance(section, dict) else None, config)
    if problem is not None:
        print(f"resume:     refused: {problem}run with --fresh to start over")
    filtered = f", {state.rows_filtered} filtered" if state.rows_filtered else ""
    print(f"finished:   {done} rows ({state.rows_ok} ok, {state.rows_failed} failed{filtered})")
    for line in config.kind.status_lines(config):  # the task's own (a judge's flip rate)
        print(line)
    print(f"in progress: {len(state.partial)} rows, {state.work_records} replies journaled")
    for line in _batch_status(config):  # a batch model's batches (engine.batch.control)
        print(line)
    if total is not None:
        print(f"remaining:  {max(0, total - done)} rows ({100 * done / max(total, 1):.1f}% done)")
    if state.damaged:
        print(f"damaged:    {_damage(len(state.damaged), state.checksum_failures)} in the journal;")
        print(
            f"            a run refuses to resume: run `turnstile repair {args.config}` to drop "
            "them (their work is requested again)"
        )
        return EXIT_UNUSABLE
    return EXIT_OK


def _batch_status(config: RunConfig) -> list[str]:
    from engine.batch.control import batch_status

    return batch_status(config)


def cmd_cancel(args: argparse.Namespace) -> int:
    """Cancel the run's running batches (its batch models', engine.batch.control)."""
    config = _load(args.config, check_env=False)
    if config is None:
        return EXIT_UNUSABLE
    import anyio

    from engine.batch.control import cancel
    from engine.errors import ModelError

    try:
        cancelled = anyio.run(cancel, config)
    except ModelError as exc:
        print(f"error: {exc}; nothing more was cancelled, run it again", file=sys.stderr)
        return EXIT_STOPPED
    for line in cancelled:
        print(line)
    if not cancelled:
        print(f"no running batches in {config.checkpoint_dir}")
    return EXIT_OK


def _damage(records: int, checksum_failures: int) -> str:
    failing = f", {checksum_failures} failing their checksum" if checksum_failures else ""
    return f"{records} damaged record{'s' if records != 1 else ''}{failing}"


def cmd_report(args: argparse.Namespace) -> int:
    config = _load(args.config, check_env=False)
    if config is None:
        return EXIT_UNUSABLE
    if read_manifest(config.checkpoint_dir) is None:
        print(f"error: no run yet in {config.checkpoint_dir}", file=sys.stderr)
        return EXIT_UNUSABLE
    from engine._reporting import write_run_report

    path = write_run_report(config)
    if path is None:
        return EXIT_STOPPED
    print(path)
    return EXIT_OK


def cmd_repair(args: argparse.Namespace) -> int:
    config = _load(args.config, check_env=False)
    if config is None:
        return EXIT_UNUSABLE
    if not segments(config.checkpoint_dir):
        print(f"nothing to repair: no journal in {config.checkpoint_dir}")
        return EXIT_OK
    try:
        lock = lock_checkpoint(config.checkpoint_dir)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    try:
        manifest = read_manifest(config.checkpoint_dir)
        checksums = manifest is not None and has_checksums(manifest)
        # Where the damage is, and what the files were vouched for before it.
        state = Checkpoint.of(config).state(repair=True, strict=checksums)
        # The segments a resume reads: those after the snapshot (it covers the others).
        snapshot = read_snapshot(config.checkpoint_dir)
        first = 0 if snapshot is None else snapshot.first_segment
        strict = checksums or (snapshot is not None and snapshot.strict)
        repaired = []
        for _, journal in tail_segments(config.checkpoint_dir, first):
            result = repair_journal(journal, strict=strict, limits=state.cut)
            strict = result.strict
            repaired.append((journal, result))
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    finally:
        lock.close()
    for journal, result in repaired:
        if not result.dropped and not result.emits_dropped:
            print(f"{journal}: no damaged records")
            continue
        for offset, length in result.dropped:
            print(f"dropped a damaged record at byte {offset} ({length} bytes)")
        print(
            f"{journal}: {_damage(len(result.dropped), result.checksum_failures)} dropped "
            f"(the old journal is kept as {journal.name}.damaged); their work will be "
            "requested again on the next run"
        )
        if result.emits_dropped:
            print(
                f"{journal}: {result.emits_dropped} rows written after the damage will be "
                "written again from the journal on the next run, once each (the output is "
                "cut back to what the journal vouches for)"
            )
    return EXIT_OK


def _bench(argv: list[str]) -> int:
    """`turnstile bench`: the suite in the checkout's bench/ (it is not installed)."""
    import importlib

    if not (Path.cwd() / "bench" / "__main__.py").is_file():
        print(
            "error: run `turnstile bench` from a Turnstile checkout (it needs bench/)",
            file=sys.stderr,
        )
        return EXIT_UNUSABLE
    sys.path.insert(0, str(Path.cwd()))
    code = importlib.import_module("bench.__main__").main(argv)
    return int(code or 0)


def cmd_estimate(args: argparse.Namespace) -> int:
    """``turnstile estimate``: run a sample of rows into the checkpoint, print the
    projection (exit 4 at the budget, 2 for an unusable config or checkpoint)."""
    from engine.errors import EXIT_BUDGET, BudgetReached, InputError
    from engine.estimate import estimate

    config = _load(args.config)
    if config is None:
        return EXIT_UNUSABLE
    progress.log_to_console()
    try:
        guess = estimate(config, sample=args.sample)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return EXIT_UNUSABLE
    except (CheckpointError, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    except BudgetReached as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BUDGET
    except TurnstileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_STOPPED
    print(guess.text())
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    config = _load(args.config, check_env=False)
    if config is None:
        return EXIT_UNUSABLE
    from engine.output.export import export

    try:
        dest = export(
            config,
            args.format,
            Path(args.to) if args.to else None,
            pairs_only=args.pairs_only,
            keep_columns=args.keep_columns,
            config_file=Path(args.config),
            reasoning=args.reasoning,
        )
    except TurnstileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    print(dest)
    return EXIT_OK


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return value


def _port(text: str) -> int:
    """A TCP port for --metrics-port: 1-65535, or 0 for a free one (exit 2 otherwise)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(
            f"must be a TCP port from 1 to 65535 (0 picks a free one), got {text!r}"
        )
    return value


# The commands with arguments of their own (build_parser's ``only``).
_COMMANDS = frozenset({"run", "estimate", "status", "cancel", "report", "repair", "export"})


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The command line's parser; ``only``: with that one command's arguments alone (the
    others are not built: a run's start does not pay for every command's parser)."""
    parser = argparse.ArgumentParser(
        prog="turnstile",
        description="Generate LLM training data from prompt and conversation datasets.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    if only is None or only == "run":
        run = sub.add_parser("run", help="run (or resume) the job a config describes")
        run.add_argument("config", help="the run's YAML config")
        run.add_argument(
            "--fresh", action="store_true", help="discard the checkpoint and output and start over"
        )
        run.add_argument("--quiet", action="store_true", help="no progress display")
        run.add_argument(
            "--executor",
            choices=executor_names(),
            default=None,
            help=f"override executor.kind: {', '.join(executor_names())}",
        )
        run.add_argument(
            "--shards",
            type=_positive,
            default=None,
            help="override executor.shards (first run only)",
        )
        run.add_argument(
            "--metrics-port",
            type=_port,
            default=None,
            help="serve Prometheus metrics at http://127.0.0.1:PORT/metrics (metrics.port)",
        )
        # Rows between two checkpoint snapshots: tests and benchmarks take them often, to
        # crash a run between them; not a setting a run needs, so not in --help.
        run.add_argument(
            "--snapshot-every-rows",
            type=_positive,
            default=SNAPSHOT_EVERY_ROWS,
            help=argparse.SUPPRESS,
        )
        run.set_defaults(func=cmd_run)
    if only is None or only == "estimate":
        estimate = sub.add_parser(
            "estimate",
            help="run a sample of rows for real (a later run resumes them) and print the whole "
            "input's requests, tokens, USD (with a range) and time at the current caps",
        )
        estimate.add_argument("config")
        estimate.add_argument(
            "--sample", type=_positive, default=20, help="rows to run, spread over the input"
        )
        estimate.set_defaults(func=cmd_estimate)
    if only is None or only == "status":
        status = sub.add_parser("status", help="progress read from the checkpoint, without running")
        status.add_argument("config")
        status.set_defaults(func=cmd_status)
    if only is None or only == "cancel":
        cancel = sub.add_parser("cancel", help="cancel the run's running batches (batch models)")
        cancel.add_argument("config")
        cancel.set_defaults(func=cmd_cancel)
    if only is None or only == "report":
        report = sub.add_parser(
            "report", help="write <checkpoint_dir>/report.html: plots of how the run went"
        )
        report.add_argument("config")
        report.set_defaults(func=cmd_report)
    if only is None or only == "repair":
        repair = sub.add_parser(
            "repair",
            help="drop damaged journal records so the run can resume (their work is redone)",
        )
        repair.add_argument("config")
        repair.set_defaults(func=cmd_repair)
    if only is None or only == "export":
        export = sub.add_parser(
            "export", help="the run's finished rows in input order: Parquet, a HF dataset, or JSONL"
        )
        export.add_argument("config")
        export.add_argument("--format", choices=("parquet", "hf", "jsonl"), default="parquet")
        export.add_argument(
            "--to",
            default=None,
            help="where to write (default: next to the output: <stem>.parquet, <stem>_hf/, "
            "<stem>.sorted.jsonl)",
        )
        export.add_argument(
            "--pairs-only",
            action="store_true",
            help="preference runs: keep only rows with a chosen/rejected pair",
        )
        export.add_argument(
            "--keep-columns",
            action="store_true",
            help="keep input fields named like TRL's own columns (completion, label, "
            "chat_template_kwargs); by default they are left out, with a note in the card",
        )
        export.add_argument(
            "--reasoning",
            choices=("keep", "inline", "drop"),
            default="keep",
            help="reasoning traces: keep them as in the output (reasoning_content), inline them "
            "into each answer as <think>TRACE</think> (for chat templates that do not read the "
            "field), or drop them (answers only)",
        )
        export.set_defaults(func=cmd_export)
    if only is None:  # run by main before any parsing; listed in --help
        sub.add_parser("mock-server", help="the mock OpenAI-compatible server (see --help)")
        sub.add_parser("serve-local", help="the built-in llama.cpp server in the foreground")
        sub.add_parser("bench", help="the benchmark suite (from a checkout; see bench/)")
    return parser


def entry() -> NoReturn:
    """The ``turnstile`` process (``python -m engine``): :func:`main`, then the exit.

    The interpreter's own teardown after a run (freeing every module and object it
    loaded, the cyclic collector over all of it) took about 40 ms of a run's end
    (bench/startup.py), longer than the run's report. Everything the run wrote is
    closed and synced when ``main`` returns, so the exit skips the teardown: the
    atexit handlers still run (logging's flush, Ray's shutdown), then the standard
    streams are flushed and the process ends with ``main``'s code. A worker thread
    still counting the input's rows for the progress total is not waited for.
    """
    code = main()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it
            pass
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    # Subcommands with parsers of their own get the rest of the line untouched.
    if args_list and args_list[0] == "mock-server":
        from engine.testing import mock_server

        return mock_server.main(args_list[1:])
    if args_list and args_list[0] == "serve-local":
        from engine.local import server as local_server

        return local_server.main(args_list[1:])
    if args_list and args_list[0] == "bench":
        return _bench(args_list[1:])
    command = args_list[0] if args_list else None
    args = build_parser(command if command in _COMMANDS else None).parse_args(args_list)
    progress.log_to_console()
    try:
        code = args.func(args)
    except Exception as exc:  # a bug outside a run (cmd_run keeps its own crash log)
        from engine.crash import crash_report

        summary, text = crash_report(exc, ())
        print(text, file=sys.stderr, end="")
        print(f"error: Turnstile crashed: {summary} (a bug)", file=sys.stderr)
        return EXIT_CRASHED
    assert isinstance(code, int)
    return code
