"""Batch API models: client CPU and memory for single-turn requests through batches of
50,000 on the mock's Batch API (``models.teacher.batch``).

Each run is one ``turnstile run`` against the mock (its Batch API completes a batch at
its first poll: the client's own costs are all there is to measure). A batch model holds
up to ``max_requests x max_batches`` rows in flight, each waiting on its batch: with
``max_batches: 1`` that is 50,000 rows whatever the input's size, so peak RSS should not
grow with the input (the sizes), and one more run with ``max_batches: 2`` (100,000 rows
in flight) at the smallest size gives the memory a row in flight costs: MB per 10^5
rows in flight. CPU is the client's whole process (start to exit).

``BENCH_BATCH_SIZES=100000,200000`` sets the sizes (default: the plan's, 100,000 and 10^6; a
quick run 10,000 and 20,000 with batches of 5,000). The mock keeps its batch files on disk
(engine.testing.mock_batch), so 10^6 costs it about a gigabyte of temporary disk, not memory;
it takes a while (each 50,000-line batch is answered in one pass of the mock's loop).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path

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
from engine.batch.settings import BatchSettings

TURNSTILE = "turnstile"
PER_BATCH = 50_000
RSS_GOAL_MB = 1024.0
BATCH_NEVER_DONE = ("--batch-delay-s", "3600")  # the mock's batches, while a trace is taken


def settings(per_batch: int, batches: int) -> dict[str, float]:
    return {"max_requests": per_batch, "max_batches": batches, "poll_s": 0.2, "flush_s": 5}


def _sizes(plan: Plan) -> list[int]:
    raw = os.environ.get("BENCH_BATCH_SIZES")
    if raw:
        return [int(x) for x in raw.split(",") if x.strip()]
    return list(plan.batch_sizes)


def run_batch(mock: MockProcess, rows: int, per_batch: int, batches: int) -> Result:
    """One ``turnstile run`` of ``rows`` single-turn rows through the teacher's batches."""
    wl = workloads.make(SINGLE, rows, INPUTS)
    with RunFolder("batch") as folder:
        batch = settings(per_batch, batches)
        config = turnstile_config(folder, mock.url, wl, cap=64, model_extra={"batch": batch})
        output = folder / "out" / "distilled.jsonl"
        result = measure(
            TURNSTILE,
            f"single {rows} through batches of {per_batch} x {batches}",
            turnstile_cmd(config),
            folder,
            mock,
            timeout_s=3600,
            parse=parse_turnstile,
            rows_out=output,
        )
        records = read_log(log_path(folder / "ck", "teacher"))
        result.extra["batches"] = sum(r.get("k") == "batch" for r in records)
        result.extra.update(expected_rows=rows, in_flight=per_batch * batches)
        return result


def mb_per_100k(one: Result, two: Result) -> float | None:
    """Peak RSS per 10^5 rows in flight: two runs of one input, with more rows in flight."""
    more = int(two.extra["in_flight"]) - int(one.extra["in_flight"])
    if not (one.ok and two.ok) or more <= 0:
        return None
    return 1e5 * (two.maxrss_mb - one.maxrss_mb) / more


def batch(plan: Plan) -> Section:
    per_batch = PER_BATCH // 10 if plan.quick else PER_BATCH
    runs: list[Result] = []
    with MockProcess(0, LOGS, name="-batch", uvloop=True) as mock:
        sizes = _sizes(plan)
        for rows in sizes:
            runs.append(run_batch(mock, rows, per_batch, 1))
        runs.append(run_batch(mock, min(sizes), per_batch, 2))
    slope = mb_per_100k(runs[0], runs[-1])
    section = Section("batch", "19. Batch API models: batches of 50,000 on the mock")
    section.lines += [
        f"Single-turn rows through `models.teacher.batch` (`max_requests: {per_batch}`, "
        "`poll_s: 0.2`): the mock's Batch API completes a batch at its first poll, so the "
        "client's CPU and memory are what is measured. Rows in flight: `max_requests x "
        "max_batches` (each waits on its batch). One run each.",
        "",
        *table(
            [
                "rows",
                "rows in flight",
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
                    f"{r.extra['in_flight']:,}",
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
        "Peak RSS per 10^5 rows in flight (the same input with `max_batches` 1 and 2): "
        + ("-" if slope is None else f"{slope:.0f} MB")
        + ".",
    ]
    biggest = max(runs[:-1], key=lambda r: r.extra["expected_rows"], default=None)
    if biggest is not None:
        section.targets.append(
            Target(
                f"19.1 peak RSS for {biggest.extra['expected_rows']:,} requests in batches "
                f"of {per_batch:,} (one running)",
                "< 1 GB",
                f"{biggest.maxrss_mb:.0f} MB",
                biggest.ok and biggest.maxrss_mb < RSS_GOAL_MB,
            )
        )
    section.data = {
        "runs": [r.as_dict() for r in runs],
        "mb_per_100k_rows": slope,
        "settings": settings(per_batch, 1),
    }
    return section


def trace_waiting_rows(rows: int) -> list[str]:
    """Where the memory of ``rows`` single-turn rows waiting on one batch goes.

    The run goes in this process (``engine.arun``) against the mock in a child process
    whose batch never completes; once every row waits on the created batch, a
    tracemalloc snapshot is compared with one taken before the run (traced bytes only:
    the allocator's own overhead and the interpreter's arenas are not counted).
    ``python -m bench.batch trace 20000``; with tracemalloc on, it takes a few minutes.
    """
    import yaml

    import engine
    from engine.batch.endpoint import BatchEndpoint

    wl = workloads.make(SINGLE, rows, INPUTS)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mock = subprocess.Popen(
        [sys.executable, "-m", "engine", "mock-server", "--port", str(port), *BATCH_NEVER_DONE],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoints: list[BatchEndpoint] = []
    init = BatchEndpoint.__init__

    def remember(self: BatchEndpoint, *args: object, **kwargs: object) -> None:
        endpoints.append(self)
        init(self, *args, **kwargs)  # type: ignore[arg-type]

    async def measure() -> list[str]:
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                await asyncio.sleep(0.1)
        batch = BatchSettings(max_requests=rows, max_batches=1, poll_s=3600, flush_s=3600)
        with tempfile.TemporaryDirectory() as folder:
            config = {
                "task": "distill",
                "input": str(wl.path),
                "output": "out/distilled.jsonl",
                "checkpoint_dir": "ck",
                "progress_interval_s": 60,
                "models": {
                    "teacher": {
                        "base_url": f"http://127.0.0.1:{port}/v1",
                        "model": "mock",
                        "timeout_s": 60,
                        "batch": {
                            "max_requests": batch.max_requests,
                            "max_batches": 1,
                            "poll_s": batch.poll_s,
                            "flush_s": batch.flush_s,
                        },
                    }
                },
                "distill": {"model": "teacher"},
            }
            path = Path(folder) / "run.yaml"
            path.write_text(yaml.safe_dump(config))
            tracemalloc.start(8)
            before = tracemalloc.take_snapshot()
            run = asyncio.ensure_future(engine.arun(str(path)))
            while not (
                endpoints and endpoints[0].stats.in_flight == rows and endpoints[0].batches()
            ):
                await asyncio.sleep(0.5)
                if run.done():
                    run.result()
            after = tracemalloc.take_snapshot()
            tracemalloc.stop()
            run.cancel()
            try:
                await run
            except BaseException:
                pass  # stopped on purpose: its rows are what was measured
        diff = after.compare_to(before, "lineno")
        total = sum(d.size_diff for d in diff)
        lines = [
            f"{rows:,} rows waiting: {total / rows:,.0f} B a row traced ({total / 1e6:.1f} MB)"
        ]
        for d in diff[:20]:
            frame = d.traceback[0]
            lines.append(
                f"{d.size_diff / rows:8.0f} B {d.count_diff / rows:5.2f} objects  "
                f"{frame.filename}:{frame.lineno}"
            )
        return lines

    BatchEndpoint.__init__ = remember  # type: ignore[method-assign]
    try:
        return asyncio.run(measure())
    finally:
        BatchEndpoint.__init__ = init  # type: ignore[method-assign]
        mock.terminate()
        mock.wait()


if __name__ == "__main__" and sys.argv[1:2] == ["trace"]:
    print("\n".join(trace_waiting_rows(int(sys.argv[2]) if len(sys.argv) > 2 else 20_000)))
