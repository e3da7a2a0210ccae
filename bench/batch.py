"""Batch API models: client CPU and memory for single-turn requests through batches of
50,000 on the mock's Batch API (``models.teacher.batch``).

Each size is one ``turnstile run`` against the mock (its Batch API completes a batch at
its first poll: the client's own costs are all there is to measure). With
``max_requests: 50000`` and ``max_batches: 10`` every row of up to 500,000 is in flight
at once (each waits on its batch), so peak RSS against size gives the client's memory
per row in flight: the slope between the smallest and the largest size, in MB per 10^5
rows. CPU is the client's whole process (start to exit).

``BENCH_BATCH_SIZES=100000,1000000`` sets the sizes (default: 100,000 and 200,000; a
quick run 10,000 and 20,000). 10^6 holds the mock's files in its memory too (about
2 GB): on a small shared machine run the two defaults instead.
"""

from __future__ import annotations

import os

import orjson

from bench import workloads
from bench.mockserver import MockProcess
from bench.plan import Plan
from bench.report import Section, Target, table
from bench.runners import (
    Result,
    RunFolder,
    measure,
    parse_turnstile,
    turnstile_cmd,
    turnstile_config,
)
from bench.throughput import INPUTS, LOGS
from bench.workloads import SINGLE
from engine.batch.log import log_path, read_log

TURNSTILE = "turnstile"
PER_BATCH = 50_000
BATCH = {"max_requests": PER_BATCH, "max_batches": 10, "poll_s": 0.2, "flush_s": 5}
RSS_GOAL_MB = 1024.0


def _sizes(plan: Plan) -> list[int]:
    raw = os.environ.get("BENCH_BATCH_SIZES")
    if raw:
        return [int(x) for x in raw.split(",") if x.strip()]
    return [10_000, 20_000] if plan.quick else [100_000, 200_000]


def run_batch(mock: MockProcess, rows: int) -> Result:
    """One ``turnstile run`` of ``rows`` single-turn rows through the teacher's batches."""
    wl = workloads.make(SINGLE, rows, INPUTS)
    with RunFolder("batch") as folder:
        config = turnstile_config(folder, mock.url, wl, cap=64, model_extra={"batch": BATCH})
        output = folder / "out" / "distilled.jsonl"
        result = measure(
            TURNSTILE,
            f"single {rows} through batches of {PER_BATCH}",
            turnstile_cmd(config),
            folder,
            mock,
            timeout_s=3600,
            parse=parse_turnstile,
            rows_out=output,
        )
        records = read_log(log_path(folder / "ck", "teacher"))
        result.extra["batches"] = sum(r.get("k") == "batch" for r in records)
        result.extra["expected_rows"] = rows
        return result


def mb_per_100k(runs: list[Result]) -> float | None:
    """Peak RSS growth per 10^5 rows in flight, between the smallest and largest run."""
    ok = sorted((r for r in runs if r.ok and r.rows_out), key=lambda r: r.rows_out)
    if len(ok) < 2 or ok[-1].rows_out == ok[0].rows_out:
        return None
    return 1e5 * (ok[-1].maxrss_mb - ok[0].maxrss_mb) / (ok[-1].rows_out - ok[0].rows_out)


def batch(plan: Plan) -> Section:
    runs: list[Result] = []
    with MockProcess(0, LOGS, name="-batch") as mock:
        for rows in _sizes(plan):
            runs.append(run_batch(mock, rows))
    slope = mb_per_100k(runs)
    section = Section("batch", "19. Batch API models: 50,000 requests a batch on the mock")
    section.lines += [
        "Single-turn rows through `models.teacher.batch` (`max_requests: 50000`, "
        "`max_batches: 10`, `poll_s: 0.2`): the mock's Batch API completes a batch at its "
        "first poll, so the client's CPU and memory are what is measured. Every row is in "
        "flight at once (each waits on its batch). One run per size.",
        "",
        *table(
            [
                "rows",
                "batches",
                "rows out",
                "wall s",
                "client CPU s",
                "CPU us/request",
                "peak RSS MB",
            ],
            [
                [
                    f"{r.extra['expected_rows']:,}",
                    str(r.extra.get("batches", "-")),
                    f"{r.rows_out:,}" + ("" if r.ok else f" (exit {r.rc})"),
                    f"{r.wall_s:.1f}",
                    f"{r.cpu_s:.1f}",
                    f"{1e6 * r.cpu_s / r.rows_out:,.0f}" if r.rows_out else "-",
                    f"{r.maxrss_mb:.0f}",
                ]
                for r in runs
            ],
        ),
        "",
        "Peak RSS per 10^5 rows in flight (slope between the sizes): "
        + ("-" if slope is None else f"{slope:.0f} MB")
        + ".",
    ]
    biggest = max(runs, key=lambda r: r.extra["expected_rows"], default=None)
    if biggest is not None:
        section.targets.append(
            Target(
                f"19.1 peak RSS for {biggest.extra['expected_rows']:,} requests in batches "
                f"of {PER_BATCH:,}",
                "< 1 GB",
                f"{biggest.maxrss_mb:.0f} MB",
                biggest.ok and biggest.maxrss_mb < RSS_GOAL_MB,
            )
        )
    section.data = {
        "runs": [r.as_dict() for r in runs],
        "mb_per_100k_rows": slope,
        "settings": orjson.loads(orjson.dumps(BATCH)),
    }
    return section
