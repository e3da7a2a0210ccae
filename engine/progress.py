"""What the user sees: a live display on a terminal, periodic log lines otherwise,
and the final summary. Everything here goes to stderr; the data goes to files.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from typing import TYPE_CHECKING

import anyio

from engine.stats import ModelStats, Outcome, ReplicaStats, RunStats

if TYPE_CHECKING:
    from rich.console import Console, Group


log = logging.getLogger("turnstile")


class ConsoleHandler(logging.Handler):
    """The CLI's log lines: plain on a terminal (under the live display), timestamped
    when not. A library caller configures ``logging`` as it likes instead."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            message = f"{record.levelname.lower()}: {message}"
        if _is_terminal():
            _console().print(message)
        else:
            print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


@functools.cache
def _console() -> Console:
    """The terminal's console: rich is imported only where a terminal shows the live
    display (a run under a script, a pipe or a notebook never pays for it)."""
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _is_terminal() -> bool:
    return sys.stderr.isatty() and _console().is_terminal


def log_to_console() -> None:
    """Send the ``turnstile`` logger's lines to stderr, once."""
    if not any(isinstance(h, ConsoleHandler) for h in log.handlers):
        log.addHandler(ConsoleHandler())
        log.setLevel(logging.INFO)
        log.propagate = False


def _rate(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


def _num(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.1f}M"
    if value >= 1e4:
        return f"{value / 1e3:.1f}k"
    return f"{value:.0f}" if value >= 100 or value == int(value) else f"{value:.1f}"


def _turns(stats: RunStats) -> str:
    """'N/~M rule': turns written, the run's total estimated from the rows finished so far
    (rows vary in length), and the turn rule the estimate counts by."""
    text = str(stats.turns_done)
    finished = stats.rows_done - stats.rows_skipped - stats.rows_failed
    if stats.rows_total is not None and finished >= 10:
        per_row = (stats.turns_done + stats.turns_resumed) / finished
        remaining_rows = max(0, stats.rows_total - stats.rows_done)
        text += f"/~{stats.turns_done + round(per_row * remaining_rows)}"
    if stats.turn_rule is not None:
        text += f" {stats.turn_rule}"
    return text


def status_line(stats: RunStats, elapsed: float) -> str:
    """The whole progress in one line (the non-terminal log format)."""
    total = "?" if stats.rows_total is None else str(stats.rows_total)
    tokens = stats.prompt_tokens + stats.completion_tokens
    parts = [
        *([stats.shards] if stats.shards else []),
        f"rows {stats.rows_done}/{total} ({stats.rows_failed} failed)",
        f"turns {_turns(stats)} ({_num(_rate(stats.turns_done, elapsed))}/s)",
        f"tokens {_num(tokens)} ({_num(_rate(stats.completion_tokens, elapsed))} out/s)",
        *([cost] if (cost := cost_text(stats)) else []),
    ]
    for m in stats.models.values():
        limit = f" limit {m.limit}" if m.limit is not None and m.limit != m.cap else ""
        flight = f"{m.in_flight}/{m.cap} in flight{limit}"
        if m.batch:  # its batches stand in for requests in flight
            flight = f"{m.batches_running} batches running ({m.in_flight} requests)"
        parts.append(
            f"{m.name}: {flight}, {m.retries} retries, {m.failures} failures" + _replicas_line(m)
        )
    return " | ".join(parts)


def cost_text(stats: RunStats) -> str:
    """'cost $X (Y cached, saved $Z)': what the run's requests cost at the models' prices
    and what the reply cache answered (free: what those would have cost); '' for a run
    with neither."""
    models = stats.models.values()
    cost = stats.cost_usd
    saved = sum(m.saved_usd for m in models if m.priced)
    parts = []
    if cost is not None:
        parts.append(f"cost ${cost:.4f}")
    if stats.cached:
        parts.append(
            f"{stats.cached} cached" + (f", saved ${saved:.4f}" if cost is not None else "")
        )
    return ", ".join(parts)


def batches_text(m: ModelStats) -> str:
    """', N batches submitted, M done' for a batch model (its batches attached from an
    earlier run too); '' for an online one."""
    if not m.batch:
        return ""
    attached = f", {m.batches_attached} attached" if m.batches_attached else ""
    return f", {m.batches_submitted} batches submitted{attached}, {m.batches_done} done"


def _replicas_line(m: ModelStats) -> str:
    """' [r0 3/8, r1 out, ...]' for a model with several replicas or one out."""
    if len(m.replicas) < 2 and all(r.live for r in m.replicas):
        return ""
    items = [
        f"r{i} {r.in_flight}/{r.cap}" if r.live else f"r{i} out" for i, r in enumerate(m.replicas)
    ]
    return f" [{', '.join(items)}]"


def _state(r: ReplicaStats, now: float) -> str:
    if r.live:
        return "live"
    return f"out {now - r.out_since:.0f}s" if r.out_since is not None else "out"


class Display:
    """Shows progress until cancelled: live on a terminal, log lines otherwise."""

    def __init__(self, interval_s: float, *, live: bool | None = None, quiet: bool = False):
        self.interval_s = interval_s
        self.live = _is_terminal() if live is None else live
        self.quiet = quiet

    async def run(self, stats: RunStats, started: float) -> None:
        if self.quiet:
            return
        if not self.live:
            while True:
                await anyio.sleep(self.interval_s)
                log.info(status_line(stats, time.monotonic() - started))
        from rich.live import Live

        with Live(console=_console(), refresh_per_second=4, transient=True) as live:
            while True:
                live.update(_panel(stats, time.monotonic() - started))
                await anyio.sleep(0.25)


def eta_s(stats: RunStats, elapsed: float) -> float | None:
    """Seconds left at this run's pace of finishing rows; None until it can tell."""
    finished = stats.rows_done - stats.rows_skipped
    if stats.rows_total is None or finished <= 0 or elapsed <= 0:
        return None
    return max(0, stats.rows_total - stats.rows_done) * elapsed / finished


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _panel(stats: RunStats, elapsed: float) -> Group:
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    total = stats.rows_total
    done = stats.rows_done
    eta = eta_s(stats, elapsed)
    bar = Table.grid(padding=(0, 1))
    bar.add_row(
        ProgressBar(total=total or None, completed=done, width=40),
        Text(
            f"rows {done}/{'?' if total is None else total}"
            + (f" ({100 * done / total:.0f}%)" if total else "")
            + f"  ETA {'?' if eta is None else _clock(eta)}  elapsed {_clock(elapsed)}"
        ),
    )
    head = Text(
        (f"{stats.shards}\n" if stats.shards else "")
        + f"failed {stats.rows_failed}  turns {_turns(stats)}"
        + f" ({_rate(stats.turns_done, elapsed):.1f}/s)"
        + f"  tokens {_num(stats.prompt_tokens + stats.completion_tokens)}"
        + f" ({_rate(stats.completion_tokens, elapsed):.0f} out/s)"
        + (f"  {cost}" if (cost := cost_text(stats)) else "")
    )
    table = Table(box=None, pad_edge=False)
    for column in ("model", "in flight", "limit", "state", "requests", "retries", "failures"):
        table.add_column(column, justify="left" if column in ("model", "state") else "right")
    now = time.monotonic()
    for m in stats.models.values():
        live = sum(r.live for r in m.replicas)
        table.add_row(
            m.name,
            f"{m.batches_running} batches" if m.batch else f"{m.in_flight}/{m.cap}",
            "-" if m.batch else str(m.limit if m.limit is not None else m.cap),
            "live" if live == len(m.replicas) else f"{live}/{len(m.replicas)} live",
            str(m.requests),
            str(m.retries),
            str(m.failures),
        )
        if len(m.replicas) > 1:
            for r in m.replicas:
                table.add_row(
                    f"  {r.url}",
                    f"{r.in_flight}/{r.cap}",
                    str(r.limit if r.limit is not None else r.cap),
                    _state(r, now),
                    str(r.requests),
                    "",
                    str(r.failures),
                )
    return Group(bar, head, table)


def judge_lines(stats: RunStats) -> list[str]:
    """A pairwise judge's flip rate (verdicts that changed with the order, over pairs
    judged in both orders) and the judge filter's requests, when the run has them."""
    lines = [
        f"judge {judge}: flip rate {100 * stats.order_flips.get(judge, 0) / both:.1f}% "
        f"({stats.order_flips.get(judge, 0)} of {both} pairs judged in both orders changed "
        "verdict with the order)"
        for judge, both in sorted(stats.order_pairs.items())
        if both
    ]
    if stats.judge_filter_requests:
        lines.append(f"filters.judge: {stats.judge_filter_requests} requests")
    return lines


def summary(outcome: Outcome) -> str:
    """The final report: rates, tokens, and per-model latency, retries and failures."""
    stats = outcome.stats
    elapsed = outcome.elapsed_s
    lines = [
        f"rows: {stats.rows_done - stats.rows_failed - stats.rows_filtered} ok, "
        f"{stats.rows_failed} failed"
        + (f", {stats.rows_filtered} filtered" if stats.rows_filtered else "")
        + (f" ({stats.rows_skipped} finished in earlier runs)" if stats.rows_skipped else ""),
        f"turns: {stats.turns_done} written in {elapsed:.1f}s "
        f"({_rate(stats.turns_done, elapsed):.1f}/s)"
        + (f", {stats.turns_resumed} recovered from the journal" if stats.turns_resumed else ""),
        f"tokens: {stats.prompt_tokens} prompt, {stats.completion_tokens} completion "
        f"({_rate(stats.completion_tokens, elapsed):.1f} completion tokens/s)"
        + (f", {stats.reasoning_tokens} of them reasoning" if stats.reasoning_tokens else ""),
    ]
    if cost_text(stats):
        lines.append(cost_text(stats))
    if stats.filtered_by_rule:
        counts = ", ".join(f"{rule} {n}" for rule, n in sorted(stats.filtered_by_rule.items()))
        lines.append(f"filtered this run, by rule: {counts}")
    lines += judge_lines(stats)
    for m in stats.models.values():
        p50 = m.latency.percentile(50)
        p95 = m.latency.percentile(95)
        lat = (
            f"latency p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms"
            if p50 is not None and p95 is not None
            else "no replies"
        )
        lines.append(
            f"model {m.name}: {m.ok}/{m.requests} requests ok, {lat}, "
            f"{m.retries} retries, {m.failures} failures"
            + batches_text(m)
            + (f", {m.resent} re-sent after server failures" if m.resent else "")
            + (f", {m.reasoning_tokens} reasoning tokens" if m.reasoning_tokens else "")
            + (f", ${m.cost_usd:.4f}" if m.priced else "")
            + (f", {m.cached} cached" if m.cached else "")
            + (f" (saved ${m.saved_usd:.4f})" if m.cached and m.priced else "")
        )
        if len(m.replicas) > 1:
            for r in m.replicas:
                lines.append(f"  {r.url}: {r.ok}/{r.requests} ok, {r.failures} server failures")
        end = time.monotonic()
        for outage in m.outages:
            took = (outage.ended if outage.ended is not None else end) - outage.started
            still = "" if outage.ended is not None else " (still out at the end)"
            lines.append(f"  outage: {m.name} {outage.url} out for {took:.1f}s{still}")
    return "\n".join(lines)
