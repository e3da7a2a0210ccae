"""Throughput experiments against the mock server: overhead, latency-bound, durability.

- overhead: Turnstile against the bare aiohttp loop at 0 ms, where the client's own
  CPU is the only limit, single-turn and multi-turn;
- latency: mock latency 50 and 200 ms across caps, as a fraction of the Little's-law
  ideal ``cap / latency``;
- durability: the three journal fsync policies against the bare loop, at 0 ms.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from bench import workloads
from bench.mockserver import MockProcess
from bench.plan import Plan
from bench.report import Section, Target, failed_runs, flat, median, other_load, pct, spread, table
from bench.runners import BARE, TURNSTILE, WORK, Result, run_bare, run_turnstile, same_rows
from bench.workloads import MULTI, SINGLE

INPUTS = WORK / "inputs"
LOGS = WORK / "logs"


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _describe(r: Result) -> str:
    return (
        f"{r.system:10s} {r.label:28s} rc={r.rc} wall {r.wall_s:6.2f}s "
        f"steady {r.rate_steady:7.0f}/s cpu {r.cpu_ms_per_1k:5.0f} ms/1k turns "
        f"rss {r.maxrss_mb:4.0f} MB other {r.other_cpu_s / max(r.wall_s, 1e-9):.2f} cores"
    )


def interleave(
    repeats: int, runs: dict[str, Callable[[], Result]], sink: dict[str, list[Result]]
) -> None:
    """Run every system once per repeat, rotating the order so none always goes first."""
    names = list(runs)
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            result = runs[name]()
            log(_describe(result))
            sink.setdefault(name, []).append(result)


def _rate_rows(results: dict[str, list[Result]], reference: str) -> list[list[str]]:
    rows = []
    ref = results[reference]
    for name, runs in results.items():
        rows.append(
            [
                name,
                spread([r.rate_steady for r in runs]),
                spread([r.rate_wall for r in runs]),
                spread([r.cpu_ms_per_1k for r in runs]),
                spread([r.maxrss_mb for r in runs]),
                "1" if name == reference else pct(_paired(runs, ref, "rate_steady")),
                "1" if name == reference else pct(_paired(runs, ref, "rate_wall")),
                "1" if name == reference else pct(_paired(ref, runs, "cpu_ms_per_1k")),
                spread([r.server_busy for r in runs], "{:.0f}%", 100),
            ]
        )
    return rows


def _paired(top: list[Result], bottom: list[Result], attr: str) -> list[float]:
    return [getattr(a, attr) / getattr(b, attr) for a, b in zip(top, bottom, strict=False)]


RATE_HEADERS = [
    "system",
    "turns/s steady",
    "turns/s wall",
    "client CPU ms / 1k turns",
    "peak RSS MB",
    "steady rate vs ref",
    "wall rate vs ref",
    "CPU efficiency vs ref (ref CPU / this CPU)",
    "mock server busy",
]


# -- 1. overhead -------------------------------------------------------------


def overhead(plan: Plan) -> Section:
    section = Section("overhead", "1. Overhead: Turnstile vs the bare aiohttp loop (0 ms)")
    cap = plan.overhead_cap
    shapes = [
        workloads.make(SINGLE, plan.overhead_single, INPUTS),
        workloads.make(MULTI, plan.overhead_multi, INPUTS),
    ]
    section.lines += [
        f"Mock latency 0 ms, cap {cap} for both (Turnstile: `max_concurrency: {cap}`, default "
        f"journal `fsync: interval`; bare loop: `asyncio.Semaphore({cap})`, {2 * cap} rows in "
        "flight like Turnstile's default). "
        f"{plan.repeats} interleaved repeats. At 0 ms the client's CPU is the only limit, so "
        "this is the price of Turnstile's bookkeeping per turn. *steady* = replies / (last "
        "reply - first request) as the mock server saw them; *wall* = turns / process "
        "lifetime, start-up included.",
        "",
    ]
    all_runs: list[Result] = []
    with MockProcess(0, LOGS) as mock:
        for wl in shapes:
            results: dict[str, list[Result]] = {}
            saved = {name: WORK / f"same-{name}.jsonl" for name in (TURNSTILE, BARE)}
            interleave(
                plan.repeats,
                {
                    BARE: lambda wl=wl, saved=saved: run_bare(
                        mock, wl, cap=cap, label=wl.kind, save_output=saved[BARE]
                    ),
                    TURNSTILE: lambda wl=wl, saved=saved: run_turnstile(
                        mock, wl, cap=cap, label=wl.kind, save_output=saved[TURNSTILE]
                    ),
                },
                results,
            )
            identical = same_rows(saved[TURNSTILE], saved[BARE])
            for path in saved.values():
                path.unlink(missing_ok=True)
            all_runs += flat(results)
            section.lines += [f"**{wl.label}** (outputs identical row for row: {identical})", ""]
            section.lines += table(RATE_HEADERS, _rate_rows(results, BARE))
            extra_us = [
                (a.cpu_ms_per_1k - b.cpu_ms_per_1k)
                for a, b in zip(results[TURNSTILE], results[BARE], strict=False)
            ]
            section.lines += [
                "",
                f"Turnstile's extra client CPU per turn over the bare loop: "
                f"{spread(extra_us)} microseconds.",
                "",
            ]
            steady = _paired(results[TURNSTILE], results[BARE], "rate_steady")
            wall = _paired(results[TURNSTILE], results[BARE], "rate_wall")
            cpu = _paired(results[BARE], results[TURNSTILE], "cpu_ms_per_1k")
            section.targets.append(
                Target(
                    f"1. overhead, {wl.kind}-turn: requests/s vs bare loop (steady)",
                    ">= 80%",
                    f"{pct(steady)}; wall {pct(wall)}; CPU efficiency {pct(cpu)}",
                    median(steady) >= 0.8,
                )
            )
            section.data[wl.kind] = {k: [r.as_dict() for r in v] for k, v in results.items()}
    section.lines += [
        f"Other processes on the machine used {other_load(all_runs)} on average during these "
        "runs (2 cores in all).",
        *failed_runs(all_runs),
    ]
    return section


# -- 2. latency-bound --------------------------------------------------------


def latency_turns(plan: Plan, latency_ms: float, cap: int) -> int:
    """Turns for a run of about ``latency_seconds``; where the ideal rate is within the
    machine's reach, also at least ``latency_waves`` rounds of ``cap`` requests, so the
    first and last rounds (half-full pipelines) weigh little."""
    ideal = cap / (latency_ms / 1000)
    turns = max(5 * cap, min(ideal, plan.cpu_rate) * plan.latency_seconds)
    if ideal <= plan.cpu_rate:
        turns = max(turns, plan.latency_waves * cap)
    return int(turns)


def latency(plan: Plan) -> Section:
    section = Section("latency", "2. Latency-bound: turns/s as a fraction of cap / latency")
    section.lines += [
        "Ideal = cap / latency (Little's law: `cap` requests always in flight, each taking the "
        "mock's latency). Each run is sized for about "
        f"{plan.latency_seconds:g} s and at least {plan.latency_waves} rounds of `cap` "
        f"requests; {plan.latency_repeats} interleaved repeat(s). *steady* is measured by the "
        "mock server (first request to last reply), so process start-up is left out; "
        "*client CPU* is the client's CPU seconds over that window (1.00 = one core busy). "
        "*bound by*: `latency` where the bare loop reaches at least 90% of ideal (the target "
        "applies there); otherwise `CPU` when a core is saturated (client or mock server at "
        ">= 0.8 of a core; both share this machine's 2 cores) and `overheads` when neither "
        "is: each round of `cap` requests is handled one request at a time by the client and "
        "by the server, which stretches the effective latency beyond the mock's sleep, and "
        "multi-turn conversations (up to 6 sequential turns) leave slots idle at the start "
        "and the end of a run. The same overheads keep any client a few percent under ideal.",
        "",
    ]
    points = []
    rows = []
    all_runs: list[Result] = []
    met = total = bare_met = 0
    near_bare: list[float] = []  # Turnstile / bare where latency is the bound
    cpu_ratios: list[float] = []  # the same where the CPU is
    for latency_ms in plan.latencies_ms:
        with MockProcess(latency_ms, LOGS) as mock:
            for kind in (SINGLE, MULTI):
                for cap in plan.caps:
                    turns = latency_turns(plan, latency_ms, cap)
                    wl = workloads.make(kind, workloads.rows_for_turns(kind, turns), INPUTS)
                    label = f"{kind} {latency_ms:g}ms cap {cap}"
                    results: dict[str, list[Result]] = {}
                    interleave(
                        plan.latency_repeats,
                        {
                            TURNSTILE: lambda wl=wl, cap=cap, label=label: run_turnstile(
                                mock, wl, cap=cap, label=label
                            ),
                            BARE: lambda wl=wl, cap=cap, label=label: run_bare(
                                mock, wl, cap=cap, label=label
                            ),
                        },
                        results,
                    )
                    ideal = cap / (latency_ms / 1000)
                    ts, bare = results[TURNSTILE], results[BARE]
                    all_runs += ts + bare
                    ts_frac = median([r.rate_steady / ideal for r in ts])
                    bare_frac = median([r.rate_steady / ideal for r in bare])
                    # Where even the bare loop falls short of 90% of ideal, something other
                    # than the latency is the bound: a core (client or mock server) or,
                    # with short multi-turn runs, the ramp and tail of the pipeline.
                    cpu_bound = bare_frac < 0.90
                    busy = max(
                        median([_client_busy(r) for r in ts + bare]),
                        median([r.server_busy for r in ts + bare]),
                    )
                    bound = "latency"
                    if cpu_bound:
                        bound = "CPU" if busy >= 0.8 else "overheads"
                    if cpu_bound:
                        cpu_ratios.append(median(_paired(ts, bare, "rate_steady")))
                    else:
                        total += 1
                        met += ts_frac >= 0.95
                        bare_met += bare_frac >= 0.95
                        near_bare.append(median(_paired(ts, bare, "rate_steady")))
                    rows.append(
                        [
                            f"{latency_ms:g}",
                            kind,
                            cap,
                            f"{wl.turns:,}",
                            f"{ideal:,.0f}",
                            f"{spread([r.rate_steady for r in ts])} "
                            f"({pct([r.rate_steady / ideal for r in ts])})",
                            f"{spread([r.rate_steady for r in bare])} "
                            f"({pct([r.rate_steady / ideal for r in bare])})",
                            pct([r.rate_wall / ideal for r in ts]),
                            pct(_paired(ts, bare, "rate_steady")),
                            spread([_client_busy(r) for r in ts], "{:.2f}"),
                            spread([_client_busy(r) for r in bare], "{:.2f}"),
                            bound,
                        ]
                    )
                    for system, runs in results.items():
                        points.append(
                            {
                                "system": system,
                                "latency_ms": latency_ms,
                                "shape": kind,
                                "cap": cap,
                                "rate": median([r.rate_steady for r in runs]),
                                "ideal": ideal,
                            }
                        )
    section.lines += table(
        [
            "latency ms",
            "shape",
            "cap",
            "turns",
            "ideal turns/s",
            "Turnstile steady/s (of ideal)",
            "bare steady/s (of ideal)",
            "Turnstile wall, of ideal",
            "Turnstile / bare",
            "Turnstile client CPU",
            "bare client CPU",
            "bound by",
        ],
        rows,
    )
    section.lines += [
        "",
        f"Other processes on the machine used {other_load(all_runs)} on average during these runs.",
        *failed_runs(all_runs),
    ]
    section.targets.append(
        Target(
            "2. latency-bound: steady turns/s of ideal, where latency is the bound "
            "(the bare loop reaches >= 90% of ideal)",
            ">= 95%",
            f"{met} of {total} configurations at >= 95%; Turnstile / bare there: {pct(near_bare)}",
            met == total if total else None,
        )
    )
    section.targets.append(
        Target(
            "2. other configurations (the bare loop < 90% of ideal on this machine)",
            "reported",
            f"{len(cpu_ratios)} configurations; Turnstile / bare steady rate {pct(cpu_ratios)}",
            None,
        )
    )
    section.data["points"] = points
    return section


def _client_busy(r: Result) -> float:
    span = r.window_s or r.wall_s
    return r.cpu_s / span if span > 0 else 0.0


# -- 3. durability -----------------------------------------------------------


def durability(plan: Plan) -> Section:
    section = Section("durability", "3. Durability cost: journal fsync policies (0 ms)")
    cap = plan.overhead_cap
    wl = workloads.make(SINGLE, plan.durability_single, INPUTS)
    policies = {
        "fsync: interval (default, 1 s)": {"fsync": "interval"},
        "fsync: always": {"fsync": "always"},
        "fsync: never": {"fsync": "never"},
    }
    results: dict[str, list[Result]] = {}
    with MockProcess(0, LOGS) as mock:
        runs: dict[str, Callable[[], Result]] = {
            "bare loop (no journal)": lambda: run_bare(mock, wl, cap=cap, label="bare")
        }
        for name, journal in policies.items():
            runs[name] = lambda name=name, journal=journal: run_turnstile(
                mock, wl, cap=cap, label=name, journal=journal
            )
        interleave(plan.durability_repeats, runs, results)
    reference = "bare loop (no journal)"
    interval = results["fsync: interval (default, 1 s)"]
    rows = _rate_rows(results, reference)
    for row, (_name, runs_) in zip(rows, results.items(), strict=True):
        row.append(pct(_paired(runs_, interval, "rate_steady")))
    section.lines += [
        f"{wl.label}, cap {cap}, mock latency 0 ms, {plan.durability_repeats} interleaved "
        "repeats. "
        "Journal policies as in the run config's `journal: {fsync: ...}`; the reference "
        "(ref) is the bare loop, which keeps no journal. The last column compares each "
        "row with the default policy.",
        "",
        *table([*RATE_HEADERS, "steady rate vs interval"], rows),
        "",
        f"Other processes on the machine used {other_load(flat(results))} on "
        "average during these runs.",
        *failed_runs(flat(results)),
    ]
    for name in policies:
        ratio = _paired(results[name], results[reference], "rate_steady")
        section.targets.append(
            Target(
                f"3. durability, {name}: steady turns/s vs bare loop",
                "reported (no target)",
                pct(ratio),
                None,
            )
        )
    section.data = {k: [r.as_dict() for r in v] for k, v in results.items()}
    return section
