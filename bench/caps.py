"""Fast at every concurrency: Turnstile and the bare loop, each on asyncio and on uvloop.

One experiment for the targets of "fast at every concurrency", every figure measured
in this one run, the four systems interleaved at each point:

- ``turnstile``: ``turnstile run`` with ``uvloop: false`` (asyncio's own loop), every
  other setting the default (journal ``fsync: interval``, 2 x cap rows in flight);
- ``turnstile+uvloop``: the same with ``uvloop: true``, the default configuration;
- ``bare`` and ``bare+uvloop``: bench/baseline.py on asyncio's loop and on uvloop.

Points: mock latency 0 ms at cap 64 (the client's CPU is the only limit) and 50 ms
at caps 16 to 1024, single-turn. Measured per run: the steady rate (replies over
the server's first-request-to-last-reply window), and client CPU per request over
that same window (the client's CPU time is sampled every 50 ms and interpolated at
the window's ends), so start-up and shutdown are left out of both. Memory against
input size is measured in the same run by memory.py's runs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from bench import memory, workloads
from bench.mockserver import MockProcess
from bench.plan import Plan
from bench.report import Section, Target, failed_runs, median, other_load, pct, spread, table
from bench.runners import (
    ROOT,
    Result,
    RunFolder,
    measure,
    parse_turnstile,
    run_bare,
    run_turnstile,
    turnstile_config,
)
from bench.throughput import INPUTS, LOGS, interleave
from bench.workloads import SINGLE

TS, TS_UV, BARE, BARE_UV = "turnstile", "turnstile+uvloop", "bare", "bare+uvloop"
SYSTEMS = (TS, TS_UV, BARE, BARE_UV)
NULL = "turnstile+uvloop, null writer"  # a diagnostic: what the journal writer costs


def turns_for(plan: Plan, latency_ms: float, cap: int) -> int:
    """About ``caps_seconds`` of work at the rate this point allows (cap / latency, or
    what the machine manages), and at least 5 rounds of ``cap`` requests."""
    if latency_ms <= 0:
        return plan.caps_zero_turns
    rate = min(cap / (latency_ms / 1000), plan.caps_rate)
    return int(max(5 * cap, rate * plan.caps_seconds))


def _runs(mock: MockProcess, wl: workloads.Workload, cap: int, label: str) -> dict[str, Any]:
    runs: dict[str, Callable[[], Result]] = {
        TS: lambda: run_turnstile(mock, wl, cap=cap, label=label, uvloop=False, system=TS),
        TS_UV: lambda: run_turnstile(mock, wl, cap=cap, label=label, uvloop=True, system=TS_UV),
        BARE: lambda: run_bare(mock, wl, cap=cap, label=label, system=BARE),
        BARE_UV: lambda: run_bare(mock, wl, cap=cap, label=label, uvloop=True, system=BARE_UV),
    }
    return runs


def run_null_writer(mock: MockProcess, wl: workloads.Workload, cap: int, label: str) -> Result:
    """``turnstile run`` (uvloop) with bench.nullwriter's writer: nothing written."""
    with RunFolder("nullwriter") as folder:
        config = turnstile_config(folder, mock.url, wl, cap=cap, uvloop=True)
        cmd = [sys.executable, "-m", "bench.nullwriter", str(config)]
        return measure(
            NULL,
            label,
            cmd,
            folder,
            mock,
            timeout_s=900,
            parse=parse_turnstile,
            env={"PYTHONPATH": str(ROOT)},
        )


def _ratio(top: list[Result], bottom: list[Result], attr: str) -> list[float]:
    """Per-repeat ratios (the two ran back to back in each repeat)."""
    out = []
    for a, b in zip(top, bottom, strict=False):
        x, y = getattr(a, attr), getattr(b, attr)
        if y and x == x and y == y:  # not NaN
            out.append(x / y)
    return out


def caps(plan: Plan) -> list[Section]:
    """Measure every point (and memory against input size), then build the sections."""
    by_point: dict[tuple[float, int], dict[str, list[Result]]] = {}
    for latency_ms in sorted({lat for lat, _ in plan.caps_points}):
        with MockProcess(latency_ms, LOGS, uvloop=plan.caps_mock_uvloop) as mock:
            for lat, cap in plan.caps_points:
                if lat != latency_ms:
                    continue
                wl = workloads.make(SINGLE, turns_for(plan, lat, cap), INPUTS)
                label = f"single {lat:g}ms cap {cap}"
                runs = _runs(mock, wl, cap, label)
                if (lat, cap) in plan.caps_null_writer:
                    runs[NULL] = lambda wl=wl, cap=cap, label=label: run_null_writer(
                        mock, wl, cap, label
                    )
                results: dict[str, list[Result]] = {}
                interleave(plan.caps_repeats, runs, results)
                by_point[(lat, cap)] = results
    memory_data: dict[str, Any] = {}
    resume_data: dict[str, Any] = {}
    if plan.caps_memory_rows:
        sized = replace(plan, memory_rows=plan.caps_memory_rows, resume_rows=plan.caps_resume_rows)
        for section in memory.memory_and_resume(
            sized, memory=True, resume=bool(plan.caps_resume_rows)
        ):
            if section.key == "memory":
                memory_data = section.data
            else:
                resume_data = section.data
    return sections(plan, by_point, memory_data, resume_data)


def render(plan: Plan, data: dict[str, Any]) -> list[Section]:
    """The same sections again from a run's stored measurements (results.json's
    ``caps``, ``caps_memory`` and ``caps_resume``), without measuring anything."""
    by_point: dict[tuple[float, int], dict[str, list[Result]]] = {}
    for key, runs in data.get("caps", {}).get("runs", {}).items():
        lat, cap = key.split("ms cap ")
        by_point[(float(lat), int(cap))] = {
            system: [Result.from_dict(r) for r in rs] for system, rs in runs.items()
        }
    return sections(plan, by_point, data.get("caps_memory", {}), data.get("caps_resume", {}))


def sections(
    plan: Plan,
    by_point: dict[tuple[float, int], dict[str, list[Result]]],
    memory_data: dict[str, Any],
    resume_data: dict[str, Any] | None = None,
) -> list[Section]:
    section = Section(
        "caps", "9. Fast at every concurrency: Turnstile and the bare loop, asyncio and uvloop"
    )
    points = []
    every: list[Result] = []
    for (lat, cap), results in by_point.items():
        for system, runs in results.items():
            every += runs
            points.append(
                {
                    "system": system,
                    "latency_ms": lat,
                    "cap": cap,
                    "turns": runs[0].turns if runs else 0,
                    "rate": median([r.rate_steady for r in runs]),
                    "cpu_us": median([r.cpu_us_per_request for r in runs]),
                    "ideal": cap / (lat / 1000) if lat else None,
                }
            )
    section.lines += _method(plan)
    section.lines += _rate_table(by_point)
    section.lines += ["", *_cpu_table(by_point)]
    section.lines += _writer_table(by_point)
    section.lines += [
        "",
        f"Other processes on the machine used {other_load(every)} on average during these "
        "runs (2 cores in all).",
        *failed_runs(every),
    ]
    section.targets += _targets(by_point)
    section.data = {
        "points": points,
        "runs": {
            f"{lat:g}ms cap {cap}": {k: [r.as_dict() for r in v] for k, v in res.items()}
            for (lat, cap), res in by_point.items()
        },
    }
    out = [section]
    if memory_data.get("points"):
        out.append(_memory_section(plan, memory_data))
    if resume_data and resume_data.get("resumes"):
        out.append(
            memory.resume_section(
                resume_data["resumes"],
                plan.memory_cap,
                "caps_resume",
                "11. Resume in the same run: SIGKILL near the end, time to the first request",
            )
        )
    return out


def _memory_section(plan: Plan, data: dict[str, Any]) -> Section:
    points = sorted(data["points"], key=lambda p: p["rows"])
    section = Section(
        "caps_memory",
        "10. Memory in the same run: peak RSS of `turnstile run` against input size",
    )
    section.lines += [
        f"Single-turn rows, mock at 0 ms, cap {plan.memory_cap} ({2 * plan.memory_cap} "
        "conversations in flight), the default configuration (uvloop). Peak RSS is the "
        "process's own high-water mark (`VmHWM` in /proc/PID/status, read every 50 ms until "
        "it exits). One run per size (bench/memory.py's runs).",
        "",
        *table(
            ["conversations", "peak RSS MB", "wall s", "steady turns/s", "note"],
            [
                [
                    f"{p['rows']:,}",
                    f"{p['rss_mb']:.0f}",
                    f"{p['wall_s']:.1f}",
                    f"{p['rate']:,.0f}",
                    p.get("note", ""),
                ]
                for p in points
            ],
        ),
    ]
    if data.get("other_load"):
        section.lines += ["", f"Other processes used {data['other_load']} on average meanwhile."]
    largest = points[-1]
    if largest.get("rate") and largest["rows"] < 10**7:
        section.lines += [
            "",
            f"Sizes up to {largest['rows']:,} rows, what fits in a few minutes here: at the "
            f"largest size's rate, 10^7 rows would take about "
            f"{1e7 / largest['rate'] / 60:.0f} minutes, so that size is left out of this run.",
        ]
    peak = max(p["rss_mb"] for p in points)
    low = min(p["rss_mb"] for p in points)
    sizes = ", ".join(f"{p['rows']:,}" for p in points)
    section.targets += [
        Target(
            "10. memory (this run): peak RSS",
            "< 200 MB",
            f"{peak:.0f} MB at most (sizes {sizes})",
            peak < 200,
        ),
        Target(
            "10. memory (this run): flat in input size",
            "largest within 25% of smallest",
            f"{low:.0f} -> {peak:.0f} MB (x{peak / low:.2f})",
            peak <= 1.25 * low,
        ),
    ]
    section.data = data
    return section


def _method(plan: Plan) -> list[str]:
    zero = [cap for lat, cap in plan.caps_points if lat == 0]
    lat50 = [cap for lat, cap in plan.caps_points if lat > 0]
    return [
        "Single-turn rows; the same input for all four systems at each point, "
        f"{plan.caps_repeats} interleaved repeats (the order rotates). Systems: "
        "`turnstile` = `turnstile run` with `uvloop: false`, every other setting the "
        "default (journal `fsync: interval`, 2 x cap rows in flight); `turnstile+uvloop` = "
        "the default configuration (`uvloop: true`); `bare` and `bare+uvloop` = "
        "`python -m bench.baseline` on asyncio's loop and with `--uvloop`. Mock server "
        f"{'on uvloop' if plan.caps_mock_uvloop else 'on asyncio'}, its own process. "
        f"Points: 0 ms at cap {', '.join(map(str, zero))}; 50 ms at caps "
        f"{', '.join(map(str, lat50))}. Runs sized for about {plan.caps_seconds:g} s of "
        f"work at the point's rate (0 ms: {plan.caps_zero_turns:,} turns). "
        "*Steady* = replies / (last reply - first request) as the mock server saw them; "
        "*CPU per request* = the client's CPU time over that same window / replies "
        "(sampled every 50 ms, interpolated at the window's ends): start-up (imports, "
        "the input's fingerprint) and shutdown are left out of both. *Whole process* = "
        "all its CPU / turns, start-up included. Ratios are per repeat (the systems ran "
        "back to back), then the median (min-max).",
        "",
    ]


def _rate_table(by_point: dict[tuple[float, int], dict[str, list[Result]]]) -> list[str]:
    rows = []
    for (lat, cap), res in by_point.items():
        ideal = cap / (lat / 1000) if lat else None
        rows.append(
            [
                f"{lat:g}",
                cap,
                f"{res[TS][0].turns:,}" if res[TS] else "",
                f"{ideal:,.0f}" if ideal else "-",
                *(spread([r.rate_steady for r in res[s]]) for s in SYSTEMS),
                pct(_ratio(res[TS], res[BARE], "rate_steady")),
                pct(_ratio(res[TS_UV], res[BARE], "rate_steady")),
                pct(_ratio(res[TS_UV], res[BARE_UV], "rate_steady")),
            ]
        )
    return [
        "**Requests/s (steady)**",
        "",
        *table(
            [
                "latency ms",
                "cap",
                "turns",
                "ideal/s",
                *(f"{s} /s" for s in SYSTEMS),
                "turnstile / bare",
                "turnstile+uvloop / bare",
                "turnstile+uvloop / bare+uvloop",
            ],
            rows,
        ),
    ]


def _cpu_table(by_point: dict[tuple[float, int], dict[str, list[Result]]]) -> list[str]:
    rows = []
    for (lat, cap), res in by_point.items():
        rows.append(
            [
                f"{lat:g}",
                cap,
                *(spread([r.cpu_us_per_request for r in res[s]]) for s in SYSTEMS),
                _x(_ratio(res[TS], res[BARE], "cpu_us_per_request")),
                _x(_ratio(res[TS_UV], res[BARE_UV], "cpu_us_per_request")),
                _x(_ratio(res[TS], res[BARE], "cpu_ms_per_1k")),
            ]
        )
    return [
        "**Client CPU per request (microseconds, steady window)**",
        "",
        *table(
            [
                "latency ms",
                "cap",
                *(f"{s} us" for s in SYSTEMS),
                "turnstile / bare",
                "turnstile+uvloop / bare+uvloop",
                "turnstile / bare, whole process",
            ],
            rows,
        ),
    ]


def _writer_table(by_point: dict[tuple[float, int], dict[str, list[Result]]]) -> list[str]:
    rows = []
    for (lat, cap), res in by_point.items():
        if NULL not in res:
            continue
        extra = [
            a.cpu_us_per_request - b.cpu_us_per_request
            for a, b in zip(res[TS_UV], res[NULL], strict=False)
        ]
        rows.append(
            [
                f"{lat:g}",
                cap,
                spread([r.rate_steady for r in res[TS_UV]]),
                spread([r.rate_steady for r in res[NULL]]),
                pct(_ratio(res[TS_UV], res[NULL], "rate_steady")),
                spread([r.cpu_us_per_request for r in res[TS_UV]]),
                spread([r.cpu_us_per_request for r in res[NULL]]),
                spread(extra),
            ]
        )
    if not rows:
        return []
    return [
        "",
        "**What the journal writer costs** (a diagnostic: `python -m bench.nullwriter`, "
        "the same run with a writer that encodes every record and row as the real one does "
        "but never writes, never hops to a thread and never makes a caller wait; its "
        "output is empty, so it is no result of its own)",
        "",
        *table(
            [
                "latency ms",
                "cap",
                "turnstile+uvloop /s",
                "null writer /s",
                "with the writer / without",
                "turnstile+uvloop CPU us/request",
                "null writer CPU us/request",
                "the writer's CPU us/request",
            ],
            rows,
        ),
    ]


def _x(values: list[float]) -> str:
    return spread(values, "{:.2f}x")


def _targets(by_point: dict[tuple[float, int], dict[str, list[Result]]]) -> list[Target]:
    targets = []

    def rate(lat: float, cap: int, goal: float, what: str) -> None:
        res = by_point.get((lat, cap))
        if res is None:
            return
        ratios = _ratio(res[TS], res[BARE], "rate_steady")
        targets.append(
            Target(
                f"9.1 requests/s, turnstile / bare (asyncio both, journal on), {what}",
                f">= {goal:.0%}",
                pct(ratios),
                median(ratios) >= goal,
            )
        )

    rate(0, 64, 0.90, "0 ms cap 64")
    rate(50, 512, 0.90, "50 ms cap 512")
    rate(50, 1024, 0.85, "50 ms cap 1024")
    cpu = {
        (lat, cap): median(_ratio(res[TS], res[BARE], "cpu_us_per_request"))
        for (lat, cap), res in by_point.items()
    }
    worst = max(cpu.items(), key=lambda kv: kv[1]) if cpu else None
    if worst is not None:
        targets.append(
            Target(
                "9.1 client CPU per request, turnstile / bare, every cap (16-1024 at 50 ms, "
                "and 0 ms cap 64)",
                "<= 1.25x",
                "; ".join(f"{lat:g} ms cap {cap}: {v:.2f}x" for (lat, cap), v in cpu.items()),
                worst[1] <= 1.25,
            )
        )
    for name, reference, goal in (
        ("9.2 uvloop: turnstile+uvloop / bare (asyncio)", BARE, 1.0),
        ("9.2 uvloop: turnstile+uvloop / bare+uvloop", BARE_UV, 0.90),
    ):
        per = {
            (lat, cap): median(_ratio(res[TS_UV], res[reference], "rate_steady"))
            for (lat, cap), res in by_point.items()
        }
        if not per:
            continue
        # Where latency is the bound (the reference reaches 90% of cap / latency, as in
        # section 2), nobody can go faster: there the target is "as fast", within the
        # 2% that repeats vary by.
        bound = {point for point, res in by_point.items() if _latency_bound(point, res[reference])}
        targets.append(
            Target(
                f"{name}, requests/s at every point",
                f">= {goal:.0%} (>= 98% where latency is the bound)",
                "; ".join(
                    f"{lat:g} ms cap {cap}: {v:.0%}"
                    + (" (latency-bound)" if (lat, cap) in bound else "")
                    for (lat, cap), v in per.items()
                ),
                all(v >= goal or (point in bound and v >= 0.98) for point, v in per.items()),
            )
        )
    return targets


def _latency_bound(point: tuple[float, int], reference: list[Result]) -> bool:
    """Whether ``reference`` reaches 90% of cap / latency at ``point``."""
    lat, cap = point
    return lat > 0 and median(r.rate_steady for r in reference) >= 0.9 * cap / (lat / 1000)


__all__ = ["SYSTEMS", "caps", "turns_for"]
