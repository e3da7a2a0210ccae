"""The end of every run, and ``turnstile report``: ``<checkpoint_dir>/report.html``.

engine.report draws the page from the run's history (metrics.jsonl); this module
gathers what the page shows besides: the config as the user wrote it (engine.report
removes its secrets) and the totals. A report that cannot be written is a warning,
never the run's failure: the run's work is already safe in its checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from engine.checkpoint.snapshot import load
from engine.config import YAML, RunConfig, parse_document
from engine.errors import TurnstileError
from engine.stats import RunStats

log = logging.getLogger("turnstile")


def write_run_report(
    config: RunConfig, stats: RunStats | None = None, elapsed_s: float | None = None
) -> Path | None:
    """Write the run's report; its path, or None (and a warning) when it cannot be."""
    try:
        from engine.report import write_report

        totals = _totals(stats, elapsed_s) if stats is not None else checkpoint_totals(config)
        raw, syntax = config_dict(config)
        path = write_report(
            config.checkpoint_dir,
            title=f"Turnstile: {config.config_path.name} ({config.task})",
            config=raw,
            totals=totals,
            syntax=syntax,
        )
    except (OSError, ValueError, TurnstileError) as exc:
        log.warning(f"the report could not be written ({exc}); `turnstile report` tries again")
        return None
    except Exception as exc:  # a bug in drawing it: the run's work is safe all the same
        log.warning(
            f"the report could not be written: {type(exc).__name__}: {exc} (a bug; the run's "
            "output and checkpoint are not affected)"
        )
        return None
    return path


def config_dict(config: RunConfig) -> tuple[dict[str, Any], str]:
    """The config as written (its YAML or JSON file) and that file's syntax, or what
    the config fixes (shown as YAML) when it came as a dict."""
    try:
        raw, syntax = parse_document(config.config_path.read_text())
    except (OSError, ValueError):
        raw, syntax = None, YAML
    if isinstance(raw, dict):
        return raw, syntax
    fixed = {"input": str(config.input), "output": str(config.output)}
    return {**fixed, **config.fingerprint_fields()}, YAML


def checkpoint_totals(config: RunConfig) -> dict[str, object]:
    """The totals a checkpoint holds (``turnstile report`` after the run)."""
    files = (config.output, config.failed_output, config.filtered_output)
    sizes = [path.stat().st_size if path.exists() else 0 for path in files]
    state = load(config.checkpoint_dir, *sizes)
    totals: dict[str, object] = {
        "rows ok": state.rows_ok,
        "rows failed": state.rows_failed,
        "rows filtered": state.rows_filtered,
        "replies journaled": state.work_records,
        "rows in progress": len(state.partial),
    }
    if state.spent_tokens:  # the paid replies of every run, from the journal
        totals["spent (every run)"] = f"${state.spent_usd:.4f}, {state.spent_tokens:,} tokens"
    return totals


def _totals(stats: RunStats, elapsed_s: float | None) -> dict[str, object]:
    totals: dict[str, object] = {
        "rows ok": stats.rows_done - stats.rows_failed - stats.rows_filtered,
        "rows failed": stats.rows_failed,
        "rows filtered": stats.rows_filtered,
        "rows finished in earlier runs": stats.rows_skipped,
        "replies written by this run": stats.turns_done,
        "prompt tokens (this run)": stats.prompt_tokens,
        "completion tokens (this run)": stats.completion_tokens,
        "reasoning tokens (this run, part of completion)": stats.reasoning_tokens,
    }
    if elapsed_s is not None:
        totals["elapsed (this run)"] = f"{elapsed_s:.1f} s"
    for judge, both in sorted(stats.order_pairs.items()):
        flipped = stats.order_flips.get(judge, 0)
        rate = f"{100 * flipped / both:.1f}% ({flipped} of {both} pairs)" if both else "none"
        totals[f"{judge}: flip rate (pairs judged in both orders, this run)"] = rate
    if stats.judge_filter_requests:
        totals["filters.judge: requests (this run)"] = stats.judge_filter_requests
    for name, m in stats.models.items():
        totals[f"{name}: requests ok / sent"] = f"{m.ok} / {m.requests}"
        totals[f"{name}: retries, failures"] = f"{m.retries}, {m.failures}"
        if m.reasoning_tokens:
            totals[f"{name}: reasoning tokens"] = m.reasoning_tokens
        if m.priced:
            totals[f"{name}: cost (this run)"] = f"${m.cost_usd:.4f}"
        if m.cached:
            saved = f" (saved ${m.saved_usd:.4f})" if m.priced else ""
            totals[f"{name}: answered from the reply cache"] = f"{m.cached}{saved}"
    if stats.cost_usd is not None:
        totals["cost (this run, every model)"] = f"${stats.cost_usd:.4f}"
    if stats.cached:
        totals["answered from the reply cache (this run)"] = stats.cached
    return totals
