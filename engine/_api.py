"""Turnstile from Python: a config in, a summary out. No signals, no exit codes.

``run`` and ``arun`` do what ``turnstile run`` does (the same checkpoint, the same
resume), but raise instead of exiting: a ``ConfigError`` with every problem, a
``CheckpointError`` or ``InputError`` when the checkpoint or input cannot be
used (the CLI's exit 2), and the other errors of ``engine.errors`` when the run
stops on something it cannot go past (the CLI's exit 3). Neither installs signal
handlers: a caller's Ctrl-C (KeyboardInterrupt) or a cancelled task stops the
run, and the same call later resumes it. Progress goes to the ``turnstile``
logger.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engine._runner import run_loop
from engine.config import RunConfig, load_config, parse_config
from engine.stats import Summary

ConfigLike = str | Path | Mapping[str, Any] | RunConfig


def load(config: ConfigLike) -> RunConfig:
    """A validated config from a YAML path or a dict shaped like the YAML (a RunConfig
    is taken as it is).

    In a dict, relative paths resolve against the current folder, and
    ``checkpoint_dir`` defaults to ``checkpoints/<output file stem>`` there.
    """
    if isinstance(config, RunConfig):
        return config
    if isinstance(config, Mapping):
        stem = Path(str(config.get("output") or "run")).stem
        return parse_config(config, Path.cwd() / f"{stem}.yaml")
    return load_config(config)


async def arun(config: ConfigLike, *, fresh: bool = False, progress_log: bool = False) -> Summary:
    """Run (or resume) the job ``config`` describes, inside a running event loop.

    ``fresh`` discards the checkpoint and output first. ``progress_log`` logs a
    progress line every ``progress_interval_s`` (to the ``turnstile`` logger).
    """
    from engine.executors import launch

    return await launch.arun(load(config), fresh=fresh, progress_log=progress_log)


def run(config: ConfigLike, *, fresh: bool = False, progress_log: bool = False) -> Summary:
    """Run (or resume) the job ``config`` describes, and wait for it.

    ``config`` is a path to a YAML config or a dict shaped like one. Raises the
    errors of ``engine.errors``; never exits the process.
    """
    cfg = load(config)
    return run_loop(
        functools.partial(arun, cfg, fresh=fresh, progress_log=progress_log), uvloop=cfg.uvloop
    )


def export(
    config: ConfigLike,
    *,
    format: str = "parquet",
    to: str | Path | None = None,
    pairs_only: bool = False,
    keep_columns: bool = False,
    reasoning: str = "keep",
) -> Path:
    """Write a run's finished rows in input order, as ``turnstile export`` does; returns where.

    ``reasoning``: ``keep`` the traces as in the output, ``inline`` them into each answer
    as ``<think>`` tags, or ``drop`` them (``--reasoning``)."""
    from engine.output.export import export as write_export

    cfg = load(config)
    return write_export(
        cfg,
        format,
        Path(to) if to is not None else None,
        pairs_only=pairs_only,
        keep_columns=keep_columns,
        config_file=Path(config) if isinstance(config, str | Path) else None,
        reasoning=reasoning,
    )
