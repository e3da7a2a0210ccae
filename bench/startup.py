"""Whole processes, start to exit, the way a user's clock sees them: Turnstile against the
bare aiohttp loop on short and medium runs, where fixed costs (imports, the manifest, the
probe, the report at the end) are a large part of the wall time.

Measured side by side in one run, interleaved: wall time, peak RSS, the time from process
start to the first request's arrival at the server, and the run's end (the last reply to
process exit). A separate pair of runs gives the end of a run whose history holds an hour
of samples (the report is drawn from it at every run end): the first run is SIGKILLed
half-way, its ``metrics.jsonl`` is padded to 3,600 samples, and the resumed run is timed.
``python -X importtime`` lists what ``engine.cli`` imports before the first request.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson

from bench import workloads
from bench.mockserver import MockProcess
from bench.plan import Plan
from bench.report import Section, Target, median, spread, table
from bench.runners import (
    BARE,
    ROOT,
    TURNSTILE,
    WORK,
    Result,
    RunFolder,
    kill_when,
    measure,
    parse_turnstile,
    run_bare,
    run_turnstile,
    turnstile_cmd,
    turnstile_config,
)
from bench.throughput import interleave, log
from bench.workloads import MULTI, SINGLE

INPUTS = WORK / "inputs"
LOGS = WORK / "logs"
HOUR_SAMPLES = 3_600
# Modules that only import the others: their cumulative time is everything's.
_WRAPPERS = frozenset({"engine", "engine.cli", "engine._api", "engine.__main__"})


def end_s(r: Result) -> float | None:
    """Seconds from the last reply the server sent to the client's exit."""
    if r.window_s is None or r.to_first_request_s is None:
        return None
    return r.wall_s - r.to_first_request_s - r.window_s


def pad_history(path: Path, samples: int) -> int:
    """Make ``path`` (a metrics.jsonl) hold ``samples`` lines: copies of its first sample
    one second apart, before the real ones. Returns the lines written."""
    lines = path.read_bytes().splitlines()
    first = orjson.loads(lines[0])
    missing = max(0, samples - len(lines))
    start = float(first["t"]) - missing
    padded = []
    for i in range(missing):
        sample = dict(first)
        sample["t"] = round(start + i, 3)
        padded.append(orjson.dumps(sample))
    path.write_bytes(b"\n".join(padded + lines) + b"\n")
    return missing + len(lines)


def hour_history_end(mock: MockProcess, workload: workloads.Workload, cap: int) -> Result:
    """A resumed run's end when its history holds an hour of samples."""
    with RunFolder("hour-history") as folder:
        config = turnstile_config(folder, mock.url, workload, cap=cap)
        output = folder / "out" / "distilled.jsonl"
        first = measure(
            TURNSTILE,
            "killed half-way",
            turnstile_cmd(config),
            folder,
            mock,
            timeout_s=300,
            parse=parse_turnstile,
            watch=kill_when(output, workload.rows // 2),
        )
        history = folder / "ck" / "metrics.jsonl"
        samples = pad_history(history, HOUR_SAMPLES) if history.exists() else 0
        resumed = measure(
            TURNSTILE,
            "resumed, an hour of history",
            turnstile_cmd(config),
            folder,
            mock,
            timeout_s=300,
            parse=parse_turnstile,
            rows_out=output,
            reset=False,
        )
        resumed.extra["history_samples"] = samples
        resumed.extra["first_rc"] = first.rc
        return resumed


def import_profile(top: int = 12) -> list[tuple[str, float]]:
    """The slowest modules (cumulative ms) imported by ``import engine.cli``."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import engine.cli"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    rows: list[tuple[str, float]] = []
    for line in proc.stderr.splitlines():
        parts = line.split("|")
        if len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        name = parts[2].strip()
        if name not in _WRAPPERS:
            rows.append((name, int(parts[1]) / 1000))
    rows.sort(key=lambda r: -r[1])
    return rows[:top]


def imports_at_first_request(mock: MockProcess, workload: workloads.Workload) -> dict[str, Any]:
    """What a plain run (one online model, quiet) has imported when its first request
    goes out: how many modules, how many of them the engine's, and the engine's."""
    with RunFolder("imports") as folder:
        config = turnstile_config(folder, mock.url, workload, cap=64)
        proc = subprocess.run(
            [sys.executable, "-m", "engine.testing.first_request", str(config)],
            cwd=folder,
            capture_output=True,
            text=True,
            check=False,
        )
    try:
        modules: list[str] = orjson.loads(proc.stdout.strip().splitlines()[-1])["modules"]
    except (orjson.JSONDecodeError, KeyError, TypeError, IndexError):
        return {"modules": 0, "engine": 0, "engine_modules": [], "rc": proc.returncode}
    ours = [name for name in modules if name == "engine" or name.startswith("engine.")]
    return {"modules": len(modules), "engine": len(ours), "engine_modules": ours}


def compile_sources() -> None:
    """Byte-compile the engine and the bench, as an installed package is: a machine that
    sets PYTHONDONTWRITEBYTECODE (this one does) would otherwise compile every module of
    both systems at every start, a cost no installed copy pays."""
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(ROOT / "engine"), str(ROOT / "bench")],
        check=False,
        capture_output=True,
    )


def startup(plan: Plan) -> Section:
    section = Section("startup", "Whole processes: start-up, end, wall and memory")
    compile_sources()
    shapes = [
        (workloads.make(SINGLE, 64, INPUTS), 0.0, 64, 2.0),
        (workloads.make(SINGLE, 3_000, INPUTS), 0.0, 64, 1.3),
        (workloads.make(MULTI, 500, INPUTS), 100.0, 64, 1.05),
    ]
    repeats = max(3, plan.repeats) if not plan.quick else 2
    section.lines += [
        "Each system as a whole process against the mock server in a process of its own, "
        f"{repeats} interleaved repeats per workload: *wall* from process start to exit; "
        "*to first request* from process start to the first request's arrival at the "
        "server; *end* from the last reply the server sent to the client's exit (for "
        "Turnstile: flushing the journal, the summary, the report). Both systems' modules are "
        "byte-compiled first, as an installed package's are. Turnstile runs with its "
        "defaults (journal `fsync: interval`, uvloop, the report written at the end); the "
        "bare loop is bench/baseline.py on asyncio.",
        "",
    ]
    rows = []
    data: dict[str, Any] = {}
    rss_ok = True
    first_gap: list[float] = []
    for workload, latency, cap, goal in shapes:
        label = f"{workload.label}, {latency:g} ms, cap {cap}"
        results: dict[str, list[Result]] = {}
        with MockProcess(latency, LOGS) as mock:
            interleave(
                repeats,
                {
                    BARE: lambda wl=workload, mock=mock, cap=cap: run_bare(
                        mock, wl, cap=cap, label=wl.kind
                    ),
                    TURNSTILE: lambda wl=workload, mock=mock, cap=cap: run_turnstile(
                        mock, wl, cap=cap, label=wl.kind
                    ),
                },
                results,
            )
        bare, ts = results[BARE], results[TURNSTILE]
        ratio = median(t.wall_s for t in ts) / median(b.wall_s for b in bare)
        rss = median(t.maxrss_mb for t in ts)
        rss_ok = rss_ok and rss <= 60
        gaps = [
            t.to_first_request_s - b.to_first_request_s
            for t, b in zip(ts, bare, strict=False)
            if t.to_first_request_s is not None and b.to_first_request_s is not None
        ]
        first_gap += gaps
        ends = [e for e in (end_s(t) for t in ts) if e is not None]
        rows.append(
            [
                label,
                spread([b.wall_s for b in bare], "{:.2f} s"),
                spread([t.wall_s for t in ts], "{:.2f} s"),
                f"{ratio:.2f}x",
                spread([b.maxrss_mb for b in bare], "{:.0f} MB"),
                spread([t.maxrss_mb for t in ts], "{:.0f} MB"),
                spread([b.to_first_request_s or 0.0 for b in bare], "{:.3f} s"),
                spread([t.to_first_request_s or 0.0 for t in ts], "{:.3f} s"),
                spread(ends, "{:.3f} s") if ends else "-",
                "ok" if all(r.ok for r in bare + ts) else "a run failed",
            ]
        )
        section.targets.append(
            Target(f"wall, {label}", f"<= {goal}x the bare loop", f"{ratio:.2f}x", ratio <= goal)
        )
        data[workload.label] = {k: [r.as_dict() for r in v] for k, v in results.items()}
    section.lines += table(
        [
            "workload",
            "bare wall",
            "Turnstile wall",
            "ratio (medians)",
            "bare peak RSS",
            "Turnstile peak RSS",
            "bare to first request",
            "Turnstile to first request",
            "Turnstile end",
            "exits",
        ],
        rows,
    )
    gap = median(first_gap) if first_gap else float("nan")
    section.targets.append(
        Target("peak RSS, all three workloads", "<= 60 MB", "see the table", rss_ok)
    )
    section.targets.append(
        Target(
            "start to first request",
            "<= 0.15 s more than the bare loop",
            f"+{gap:.3f} s (median of pairs)",
            gap <= 0.15,
        )
    )
    with MockProcess(0.0, LOGS) as mock:
        hour = hour_history_end(mock, workloads.make(SINGLE, 3_000, INPUTS), 64)
    hour_end = end_s(hour)
    section.lines += [
        "",
        f"A run's end with an hour of history: a 3,000-row run SIGKILLed half-way, its "
        f"metrics.jsonl padded to {hour.extra.get('history_samples', 0):,} samples, then "
        f"resumed: last reply to exit {hour_end if hour_end is not None else float('nan'):.3f} "
        f"s (exit {hour.rc}).",
    ]
    section.targets.append(
        Target(
            "end of a run with an hour of history",
            "<= 0.1 s",
            f"{hour_end:.3f} s" if hour_end is not None else "not measured",
            hour_end is not None and hour_end <= 0.1,
        )
    )
    data["hour_history"] = hour.as_dict()
    profile = import_profile()
    section.lines += [
        "",
        "What `import engine.cli` costs before the first request (`python -X importtime`, "
        "cumulative, the largest modules at any depth):",
        "",
        *table(["module", "ms"], [[name, f"{ms:.0f}"] for name, ms in profile]),
    ]
    data["imports"] = profile
    with MockProcess(0.0, LOGS) as mock:
        volume = imports_at_first_request(mock, workloads.make(SINGLE, 64, INPUTS))
    section.lines += [
        "",
        f"Modules loaded when a plain run's first request goes out (64 single-turn rows, one "
        f"online model): {volume['modules']}, {volume['engine']} of them the engine's.",
    ]
    data["imports_at_first_request"] = volume
    section.data = data
    for r in rows:
        log(" | ".join(r))
    return section
