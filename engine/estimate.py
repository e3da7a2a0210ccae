"""``turnstile estimate``: run a sample of rows for real, and project the whole input.

The sample is ``sample`` rows spread evenly over the rows the checkpoint has not
started, run through the run's own checkpoint (so a later ``turnstile run`` resumes
them and nothing is paid twice). Each sampled row's replies are entered in a ledger
per model (``Context.ledger``: requests, tokens, USD paid, seconds asking); the
projection is pure: per-row means times the input's rows, a range from the spread
of the per-row costs, and the time the whole input takes at the current caps.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import AsyncIterator, Container, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from engine import progress
from engine.config import RunConfig
from engine.errors import ConfigError
from engine.input.base import FRESH, Resume, Row, Source
from engine.input.slices import Slice
from engine.stats import Outcome

if TYPE_CHECKING:
    from engine._api import ConfigLike

DEFAULT_SAMPLE = 20
Z = 1.96  # the range: a 95% interval for the total, from the spread of per-row costs
Ledger = Mapping[int, Mapping[str, Sequence[float]]]  # line -> model -> Context.ledger's entry


@dataclass(frozen=True, slots=True)
class ModelEstimate:
    """One model's share of the whole input, projected from the sample."""

    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    usd: float | None  # None: the model has no price
    usd_low: float | None
    usd_high: float | None
    time_s: float  # at its caps (max_concurrency, requests/tokens per minute)


@dataclass(frozen=True, slots=True)
class Estimate:
    """What ``engine.estimate`` returns: the whole input projected from ``sampled`` rows."""

    rows: int  # rows in the input
    sampled: int  # rows run for it (journaled: the run resumes them)
    models: tuple[ModelEstimate, ...]
    usd: float | None  # all models; None when none has a price
    usd_low: float | None
    usd_high: float | None
    time_s: float  # the whole input at the current caps
    spent_usd: float  # what the sample itself cost

    def text(self) -> str:
        """The table ``turnstile estimate`` prints."""
        lines = [
            f"estimate for {self.rows:,} rows from {self.sampled} sampled "
            f"(the sample cost ${self.spent_usd:.4f}; a run resumes them):",
            f"  {'model':<16}{'requests':>12}{'prompt tok':>14}{'completion tok':>16}  USD",
        ]
        for m in self.models:
            lines.append(
                f"  {m.model:<16}{m.requests:>12,}{m.prompt_tokens:>14,}"
                f"{m.completion_tokens:>16,}  {_usd(m.usd, m.usd_low, m.usd_high)}"
                f"  ~{_duration(m.time_s)}"
            )
        lines.append(
            f"  total: {_usd(self.usd, self.usd_low, self.usd_high)}, "
            f"~{_duration(self.time_s)} at the current caps"
        )
        return "\n".join(lines)


def _usd(usd: float | None, low: float | None, high: float | None) -> str:
    if usd is None or low is None or high is None:
        return "no price"
    return f"${usd:,.2f} (${low:,.2f} to ${high:,.2f})"


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s"


# -- pure: which rows, and the projection --------------------------------------------


def sample_lines(total: int, n: int, started: Container[int]) -> list[int]:
    """``n`` rows spread over the ``total`` rows not in ``started`` (fewer when fewer are
    left), in order: the rows cut into ``n`` equal runs, one row drawn from each (a
    fixed draw, the same for the same input; drawn, not every k-th row, so an input
    whose rows repeat a pattern is not sampled in step with it)."""
    left = [line for line in range(total) if line not in started]
    if n >= len(left):
        return left
    draw = random.Random(total * 1_000_003 + n)
    step = len(left) / n
    return [left[int(step * i + draw.random() * step)] for i in range(n)]


def _interval(values: Sequence[float], total: int) -> tuple[float, float, float]:
    """The total over ``total`` rows of which ``values`` are a sample: (total, low,
    high), the range a 95% interval with the finite-population correction."""
    n = len(values)
    mean = sum(values) / n
    if n < 2 or total <= n:
        return mean * total, mean * total, mean * total
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    half = Z * math.sqrt(var / n) * math.sqrt((total - n) / (total - 1)) * total
    return mean * total, max(0.0, mean * total - half), mean * total + half


def project(
    config: RunConfig, ledger: Ledger, lines: Sequence[int], total: int, workers: int
) -> Estimate:
    """The whole input's ``total`` rows projected from the ``lines`` sampled (their
    ledger entries; a row that asked a model nothing counts as 0 for it). ``workers``:
    rows in flight at once (a row's requests go one after another)."""
    n = max(1, len(lines))
    scale = total / n
    models = []
    names = sorted({model for line in lines for model in ledger.get(line, {})})
    row_seconds = [sum(e[4] for e in ledger.get(line, {}).values()) for line in lines]
    row_usd = [sum(e[3] for e in ledger.get(line, {}).values()) for line in lines]
    priced = False
    for name in names:
        entries = [ledger.get(line, {}).get(name, (0, 0, 0, 0.0, 0.0)) for line in lines]
        requests = sum(e[0] for e in entries) * scale
        prompt = sum(e[1] for e in entries) * scale
        completion = sum(e[2] for e in entries) * scale
        model = config.models[name]
        usd = low = high = None
        if model.price is not None:
            priced = True
            usd, low, high = _interval([e[3] for e in entries], total)
        seconds = sum(e[4] for e in entries) * scale
        limits = [seconds / max(1, model.total_concurrency)]
        if model.requests_per_minute:
            limits.append(requests / model.requests_per_minute * 60)
        if model.tokens_per_minute:
            limits.append((prompt + completion) / model.tokens_per_minute * 60)
        models.append(
            ModelEstimate(
                name, round(requests), round(prompt), round(completion), usd, low, high, max(limits)
            )
        )
    usd = low = high = None
    if priced:
        usd, low, high = _interval(row_usd, total)
    by_rows = sum(row_seconds) * scale / max(1, workers)
    time_s = max([by_rows, *(m.time_s for m in models)])
    return Estimate(total, len(lines), tuple(models), usd, low, high, time_s, sum(row_usd))


# -- the sampled run -------------------------------------------------------------------


class _Sampled(Source):
    """The run's source, yielding only the sampled rows (and stopping after the last)."""

    __slots__ = ("_inner", "_lines", "_set")
    fmt = "sample"
    what = "sample of rows"

    def __init__(self, inner: Source, lines: Sequence[int]) -> None:
        super().__init__(inner.path, inner.columns)
        self._inner = inner
        self._lines = list(lines)
        self._set = frozenset(lines)

    @classmethod
    def sniff(cls, path: Path) -> bool:
        return False

    def files(self) -> list[Path]:
        return self._inner.files()

    def _check(self) -> None:
        self._inner.check()

    def count(self) -> int:
        return len(self._lines)

    def _plan(self, shards: int) -> list[Slice]:
        return self._inner.plan(shards)

    async def read(self, piece: Slice | None = None, resume: Resume = FRESH) -> AsyncIterator[Row]:
        if not self._lines:
            return
        last = self._lines[-1]
        skip = _Skip(self._set, resume.done)
        async for row in self._inner.read(piece, Resume(skip, resume.seek)):
            yield row
            if row.line >= last:
                return


class _Skip:
    """Every row but the sampled ones not yet done."""

    __slots__ = ("_done", "_keep")

    def __init__(self, keep: frozenset[int], done: Container[int]) -> None:
        self._keep = keep
        self._done = done

    def __contains__(self, line: object) -> bool:
        return line not in self._keep or line in self._done


async def aestimate(config: ConfigLike, *, sample: int = DEFAULT_SAMPLE) -> Estimate:
    """Run ``sample`` rows spread over the input into the run's checkpoint (a later run
    resumes them), and project the whole input from them. Raises as ``arun`` does
    (BudgetReached at the budget)."""
    from engine._api import load
    from engine._runner import execute, prepare
    from engine.tasks.base import rows_in_flight

    cfg = load(config)
    if sample < 1:
        raise ConfigError([f"--sample: must be at least 1 row, got {sample}"])
    if cfg.executor.kind != "local":
        raise ConfigError(
            [
                f"executor: {cfg.executor.kind}: estimate runs in the local executor's "
                "checkpoint; set executor: local (or run without --executor) to estimate"
            ]
        )
    task = cfg.kind.build(cfg)
    lock, state, resumed, source = await anyio.to_thread.run_sync(
        functools.partial(prepare, cfg, fresh=False)
    )
    try:
        total = await anyio.to_thread.run_sync(source.count)
        started = _Started(state.done, state.partial)
        lines = await anyio.to_thread.run_sync(sample_lines, total, sample, started)
        ledger: dict[int, dict[str, list[float]]] = {}
        display = progress.Display(cfg.progress_interval_s, live=False, quiet=True)
        outcome: Outcome = await execute(
            cfg,
            task,
            state,
            source=_Sampled(source, lines),
            resumed=resumed,
            display=display,
            ledger=ledger,
        )
    finally:
        lock.close()
    del outcome
    return project(cfg, ledger, lines, total, rows_in_flight(cfg, task))


class _Started:
    """Rows done or in progress in the checkpoint: not sampled again."""

    __slots__ = ("_done", "_partial")

    def __init__(self, done: Container[int], partial: Container[int]) -> None:
        self._done = done
        self._partial = partial

    def __contains__(self, line: object) -> bool:
        return line in self._done or line in self._partial


def estimate(config: ConfigLike, *, sample: int = DEFAULT_SAMPLE) -> Estimate:
    """Run ``sample`` rows of the job ``config`` describes (a YAML path, a dict shaped
    like it, or a RunConfig) into its checkpoint, and return the whole input's cost
    and time projected from them. ``await aestimate(...)`` inside a running loop."""
    from engine._api import load
    from engine._runner import run_loop

    cfg = load(config)
    return run_loop(functools.partial(aestimate, cfg, sample=sample), uvloop=cfg.uvloop)
