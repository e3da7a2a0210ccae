"""What writing the report costs at the end of a run: ``write_report`` on a day's history.

The history is the one engine.history would write for a day-long run (its own
``History.line`` on a run's counters): one line a second for the first 10,000
lines, then one every 10 s, 17,640 lines in all; a teacher on two replicas, one of
them out for 10 minutes, and a restart after 16 hours. Timed: the whole
``write_report`` as a run's end calls it (read the file, decode the lines it draws,
the page with its JSON and inlined uPlot, fsync and rename), in this process with
its modules imported (as at the end of a run), median and range of 15 repeats, wall
clock and the CPU time of the thread (which a busy machine does not inflate). No
plotting library is imported on the way (checked).

    python -m bench.report_write            # prints the figures (add --json for data)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import orjson

from engine.history import HISTORY_NAME, History, step_for
from engine.report import write_report
from engine.stats import ModelStats, ReplicaStats, RunStats

T0 = 1_796_357_872.0
DAY_S = 86_400
OUT_FROM, OUT_TO = 3 * 3600.0, 3 * 3600.0 + 600.0  # gpu2 out, 10 minutes
RESTART_AT = 16 * 3600.0  # the run stopped here and was resumed a minute later


def day_history() -> bytes:
    """A day of history lines, as engine.history writes them."""
    urls = ["http://gpu1:8000/v1", "http://gpu2:8000/v1"]
    lines: list[bytes] = []
    elapsed, run = 0.0, 0
    stats = history = None
    while elapsed < DAY_S:
        if history is None or (run == 1 and elapsed >= RESTART_AT):
            run += 1
            replicas = [ReplicaStats(url, 16) for url in urls]
            teacher = ModelStats("teacher", cap=32, replicas=replicas, limit=32)
            stats = RunStats(rows_total=2_000_000, models={"teacher": teacher})
            history = History(f"20261203T000000Z-{run}", len(lines))
            elapsed += 60.0 if run > 1 else 0.0
        assert stats is not None
        teacher = stats.models["teacher"]
        out = OUT_FROM <= elapsed < OUT_TO
        step = step_for(len(lines))
        finished = int(step * (6 if out else 12))
        stats.turns_done += finished
        stats.rows_done += finished // 3
        teacher.requests += finished
        teacher.ok += finished
        teacher.prompt_tokens += finished * 80
        teacher.completion_tokens += finished * 150
        teacher.in_flight = 16 if out else 30
        teacher.replicas[1].live = not out
        teacher.replicas[1].in_flight = 0 if out else 15
        teacher.replicas[0].in_flight = 15
        teacher.latency.add(0.8)
        lines.append(history.line(stats, T0 + elapsed))
        elapsed += step
    return b"".join(lines)


def measure(repeats: int) -> dict[str, object]:
    data = day_history()
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder)
        (checkpoint / HISTORY_NAME).write_bytes(data)
        config = {"task": "distill", "models": {"teacher": {"base_url": "http://gpu1:8000/v1"}}}
        totals = {"rows ok": 1_000_000, "rows failed": 12}
        times, cpu = [], []
        load = os.getloadavg()[0]
        for _ in range(repeats + 1):  # the first reads the vendored files: not counted
            start, start_cpu = time.perf_counter(), time.thread_time()
            path = write_report(checkpoint, title="a day", config=config, totals=totals)
            times.append(time.perf_counter() - start)
            cpu.append(time.thread_time() - start_cpu)
        size = path.stat().st_size
    times, cpu = times[1:], cpu[1:]
    return {
        "history_lines": data.count(b"\n"),
        "history_bytes": len(data),
        "report_bytes": size,
        "median_ms": statistics.median(times) * 1000,
        "min_ms": min(times) * 1000,
        "max_ms": max(times) * 1000,
        # CPU time of this thread: what the machine's other work does not inflate (the
        # wall time includes the fsync and any wait for a core on a busy machine).
        "cpu_median_ms": statistics.median(cpu) * 1000,
        "load_average": max(load, os.getloadavg()[0]),
        "cores": os.cpu_count(),
        "repeats": repeats,
        "plotting_imported": sorted(m for m in ("matplotlib", "numpy") if m in sys.modules),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    found = measure(args.repeats)
    if args.json:
        print(orjson.dumps(found).decode())
        return 0
    print(
        f"report of a day's history ({found['history_lines']:,} lines, "
        f"{found['history_bytes'] / 1e6:.1f} MB): written in {found['median_ms']:.1f} ms "
        f"(median of {found['repeats']}; {found['min_ms']:.1f}-{found['max_ms']:.1f}; CPU "
        f"{found['cpu_median_ms']:.1f} ms), {found['report_bytes'] / 1e3:.0f} kB; load average "
        f"{found['load_average']:.1f} on {found['cores']} cores; plotting modules imported: "
        f"{found['plotting_imported'] or 'none'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
