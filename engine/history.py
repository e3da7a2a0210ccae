"""A run's history: a sample of its counters every second, in ``<checkpoint_dir>/metrics.jsonl``.

One JSON line per sample (the format engine.report reads): the time, the id of this
process run, the rows finished over the whole job, and for this run the replies
journaled and, per model and replica, requests, retries, failures, tokens, in
flight against limit and cap, and the latency quantiles of the requests finished
since the previous sample (for a batch model, its batches running, submitted and
done too); per replica also ``out``, how many of this run's samples, this one
included, found it out of service (with it a reader finds every outage from a few
lines, engine.report.samples, instead of searching the whole file). A resumed run
appends with a new ``run`` id, so the file tells every run of a job apart (the
report marks the restarts).

Bounded: the step between samples grows with the file, 1 s for the first 10,000
lines (about 3 hours), 10 s for the next 10,000 (28 hours), 60 s for the next
10,000 (a week), 600 s after that (10,000 lines per 10 weeks). The writer appends
the lines with everything else it writes (engine.checkpoint.writer) through an
``Appender``; a line torn by a SIGKILL is cut off when the next run opens the file.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import orjson

from engine.checkpoint.files import AppendFile
from engine.stats import RunStats

HISTORY_NAME = "metrics.jsonl"
VERSION = 1
_STEPS = ((10_000, 1.0), (20_000, 10.0), (30_000, 60.0))
_LAST_STEP = 600.0


def step_for(lines: int) -> float:
    """Seconds between samples once the history holds ``lines`` lines."""
    for limit, step in _STEPS:
        if lines < limit:
            return step
    return _LAST_STEP


def run_id(now: float | None = None) -> str:
    """This process run's id: its start time (UTC) and process id."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    return f"{stamp}-{os.getpid()}"


def whole_length(path: Path) -> int:
    """The length of ``path`` up to its last complete line (0 when it does not exist)."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            tail = 1 << 16
            while True:
                start = max(0, size - tail)
                f.seek(start)
                data = f.read(size - start)
                cut = data.rfind(b"\n")
                if cut >= 0:
                    return start + cut + 1
                if start == 0:
                    return 0
                tail *= 4
    except FileNotFoundError:
        return 0


def count_lines(path: Path, end: int) -> int:
    """Lines in the first ``end`` bytes of ``path``. Blocking."""
    lines = 0
    with path.open("rb") as f:
        left = end
        while left > 0 and (data := f.read(min(left, 1 << 22))):
            lines += data.count(b"\n")
            left -= len(data)
    return lines


class History:
    """Turns a run's counters into history lines, one per ``step`` seconds."""

    def __init__(self, run: str, lines: int = 0) -> None:
        self.run = run
        self.lines = lines  # in the file so far, earlier runs' included
        self._latency: dict[str, dict[int, int]] = {}
        self._out: dict[tuple[str, str], int] = {}  # samples out, this run, by (model, url)

    @property
    def step(self) -> float:
        return step_for(self.lines)

    def line(self, stats: RunStats, now: float, **extra: Any) -> bytes:
        """The sample of ``stats`` at ``now`` (unix time), as one JSON line."""
        ok = stats.rows_done - stats.rows_failed - stats.rows_filtered
        sample: dict[str, Any] = {
            "v": VERSION,
            "t": round(now, 3),
            "run": self.run,
            "step": self.step,
            "rows_ok": ok,
            "rows_failed": stats.rows_failed,
            "rows_filtered": stats.rows_filtered,
            "rows_total": stats.rows_total,
            "turns": stats.turns_done,
            "models": {name: self._model(name, m) for name, m in stats.models.items()},
            **extra,
        }
        if stats.shards:
            sample["shards"] = stats.shards
        self.lines += 1
        return orjson.dumps(sample) + b"\n"

    def _model(self, name: str, m: Any) -> dict[str, Any]:
        window = m.latency.since(self._latency.get(name, {}))
        self._latency[name] = m.latency.buckets()
        # A batch model's batches (running now, and submitted and done by this run).
        batches = (
            {
                "batches_running": m.batches_running,
                "batches_submitted": m.batches_submitted,
                "batches_done": m.batches_done,
            }
            if m.batch
            else {}
        )
        return {
            **batches,
            "requests": m.requests,
            "ok": m.ok,
            "retries": m.retries,
            "resent": m.resent,
            "failures": m.failures,
            "prompt_tokens": m.prompt_tokens,
            "completion_tokens": m.completion_tokens,
            "reasoning_tokens": m.reasoning_tokens,
            # USD at the model's price (None: it has none); the reply cache's answers
            # (not sent) and what they would have cost.
            "cost_usd": round(m.cost_usd, 9) if m.priced else None,
            "cached": m.cached,
            "saved_usd": round(m.saved_usd, 9) if m.priced else None,
            "in_flight": m.in_flight,
            "limit": m.limit,
            "cap": m.cap,
            "p50": window.percentile(50),
            "p95": window.percentile(95),
            "replicas": [
                {
                    "url": r.url,
                    "in_flight": r.in_flight,
                    "limit": r.limit,
                    "cap": r.cap,
                    "live": r.live,
                    "requests": r.requests,
                    "ok": r.ok,
                    "failures": r.failures,
                    "out": self._count_out(name, r.url, out=not r.live),
                }
                for r in m.replicas
            ],
        }

    def _count_out(self, model: str, url: str, *, out: bool) -> int:
        key = (model, url)
        count = self._out.get(key, 0) + out
        self._out[key] = count
        return count


class Appender(AppendFile):
    """The history file, opened for appending: cut back to its last whole line (a SIGKILL
    can tear one), with the number of lines earlier runs wrote (``lines``).

    The run's writer (engine.checkpoint.writer) appends to it with each batch it
    writes; a sharded run's driver, which has no writer, calls ``write`` itself.
    Blocking to open (it counts the lines).
    """

    def __init__(self, path: Path) -> None:
        super().__init__(path, whole_length(path))
        self.lines = count_lines(path, self.size) if self.size else 0
