"""The reply cache and the estimate (issue 21) on the mock at 0 ms.

1. Cache on with no hits (a fresh store: every reply looked up, then stored) against
   cache off: steady requests/s, single-turn rows, cap 64, interleaved repeats; at 0 ms
   (the client's CPU the only bound: the target) and at 50 ms (reported).
2. A rerun answered from the cache: the store the first run filled, a fresh
   checkpoint, every turn a hit (no request sent): turns/s and the time to go through
   it. ``BENCH_CACHE_TURNS`` sets its size (default 10^5 on this shared 2-core
   machine, 10^4 with --quick; 10^6 is ``BENCH_CACHE_TURNS=1000000``).
3. ``turnstile estimate --sample 20`` then ``turnstile run`` on multi-turn rows with a
   price: the estimate's USD against the whole run's actual cost (the journal's spend).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import orjson

from bench import workloads
from bench.mockserver import MockProcess
from bench.plan import Plan
from bench.report import Section, Target, median, pct, ratios, spread, systems_table
from bench.runners import (
    Result,
    RunFolder,
    measure,
    parse_turnstile,
    turnstile_cmd,
    turnstile_config,
)
from bench.throughput import INPUTS, LOGS, interleave
from bench.workloads import MULTI, SINGLE

CAP = 64
LATENCY_MS = 50  # a served model's pace: the client is not the bound there
LATENCY_TURNS = 4_000  # about 3 s at cap / latency = 1,280 requests/s
OFF, ON = "cache off", "cache on, no hits"
PRICE = {"input": 0.40, "output": 1.60, "cached_input": 0.10}
_CACHED = re.compile(r"(\d+) cached")


def _config(folder: Path, mock: MockProcess, wl: workloads.Workload, **extra: Any) -> Path:
    path = turnstile_config(folder, mock.url, wl, cap=CAP)
    raw = orjson.loads(path.read_bytes())
    raw.update(extra)
    path.write_bytes(orjson.dumps(raw, option=orjson.OPT_INDENT_2))
    return path


def _run(
    mock: MockProcess, wl: workloads.Workload, system: str, store: Path | None, name: str
) -> Result:
    """One ``turnstile run`` of ``wl``, its reply store ``store`` (None: cache off)."""
    with RunFolder(name) as folder:
        extra = {"cache": {"dir": str(store)}} if store is not None else {}
        config = _config(folder, mock, wl, **extra)
        result = measure(
            system,
            f"single 0ms cap {CAP}",
            turnstile_cmd(config),
            folder,
            mock,
            timeout_s=3600,
            parse=parse_turnstile,
            rows_out=folder / "out" / "distilled.jsonl",
        )
        err = (folder / "stderr.txt").read_text() if (folder / "stderr.txt").exists() else ""
        found = _CACHED.search(err)
        result.extra["cached"] = int(found.group(1)) if found else 0
        return result


def _turns(plan: Plan) -> int:
    raw = os.environ.get("BENCH_CACHE_TURNS")
    if raw:
        return int(raw)
    return 10_000 if plan.quick else 100_000


def _estimate(mock: MockProcess, rows: int) -> dict[str, float]:
    """The estimate of a priced multi-turn run, then the run: (estimate, range, actual)."""
    import engine
    from engine._api import load
    from engine.checkpoint.checkpoint import Checkpoint

    wl = workloads.make(MULTI, rows, INPUTS)
    with RunFolder("estimate") as folder:
        config = turnstile_config(
            folder,
            mock.url,
            wl,
            cap=CAP,
            model_extra={"price": PRICE},
            params={"temperature": 0.0, "max_tokens": 256},
        )
        began = time.monotonic()
        guess = engine.estimate(config, sample=20)
        estimate_s = time.monotonic() - began
        measure(
            "turnstile",
            "estimate then run",
            turnstile_cmd(config),
            folder,
            mock,
            timeout_s=3600,
            parse=parse_turnstile,
        )
        actual = Checkpoint.of(load(config)).state().spent_usd
    assert guess.usd is not None and guess.usd_low is not None and guess.usd_high is not None
    return {
        "rows": rows,
        "estimate_usd": guess.usd,
        "low_usd": guess.usd_low,
        "high_usd": guess.usd_high,
        "actual_usd": actual,
        "error": (guess.usd - actual) / actual if actual else float("nan"),
        "estimate_s": estimate_s,
        "requests_estimated": guess.models[0].requests if guess.models else 0,
    }


def _on_against_off(mock: MockProcess, rows: int, repeats: int) -> dict[str, list[Result]]:
    """Cache off against cache on with a fresh store each time, interleaved."""
    wl = workloads.make(SINGLE, rows, INPUTS)

    def on() -> Result:
        with RunFolder("cache-store") as store:  # a fresh store: no hits
            return _run(mock, wl, ON, store, "cache-on")

    results: dict[str, list[Result]] = {}
    interleave(repeats, {OFF: lambda: _run(mock, wl, OFF, None, "cache-off"), ON: on}, results)
    return results


def cache(plan: Plan) -> Section:
    rows = plan.caps_zero_turns
    repeats = plan.cache_repeats
    turns = _turns(plan)
    paced_rows = LATENCY_TURNS // 4 if plan.quick else LATENCY_TURNS
    paced_repeats = 1 if plan.quick else 3
    with MockProcess(LATENCY_MS, LOGS) as mock:
        paced = _on_against_off(mock, paced_rows, paced_repeats)
    with MockProcess(0, LOGS) as mock:
        results = _on_against_off(mock, rows, repeats)
        big = workloads.make(SINGLE, turns, INPUTS)
        with RunFolder("cache-big-store") as store:
            fill = _run(mock, big, ON, store, "cache-fill")
            rerun = _run(mock, big, "rerun from the cache", store, "cache-rerun")
        estimate = _estimate(mock, 2_000 if plan.quick else 10_000)
    on_off = ratios(results[ON], results[OFF], "rate_steady")
    paced_on_off = ratios(paced[ON], paced[OFF], "rate_steady")
    hits = rerun.extra.get("cached", 0)
    rerun_rate = hits / rerun.wall_s if rerun.wall_s else 0.0
    section = Section("cache", "20. The reply cache and the estimate (issue 21)")
    section.lines += [
        f"{rows:,} single-turn rows, the mock at 0 ms, cap {CAP}, {repeats} interleaved "
        "repeats: cache off against cache on with a fresh store each time (every request "
        "looked up, missed, sent, then stored).",
        "",
        *systems_table(
            results,
            "steady requests/s",
            [("peak RSS MB", lambda rs: spread([r.maxrss_mb for r in rs]))],
        ),
        "",
        f"The same at {LATENCY_MS} ms ({paced_rows:,} rows, {paced_repeats} interleaved "
        "repeats), where the server's pace is the bound, as with a served model:",
        "",
        *systems_table(paced, "steady requests/s"),
        "",
        f"A rerun of {turns:,} single-turn rows from the store a first run filled (fresh "
        f"checkpoint, same store; the fill ran at {fill.rate_steady:,.0f} requests/s): "
        f"{hits:,} turns answered from the cache, {rerun.served:,} "
        f"sent, in {rerun.wall_s:.1f} s wall ({rerun_rate:,.0f} turns/s), "
        f"peak RSS {rerun.maxrss_mb:.0f} MB.",
        "",
        f"`turnstile estimate --sample 20` on {estimate['rows']:,} multi-turn rows (1-"
        f"{workloads.MAX_TURNS} turns) priced {PRICE}, then `turnstile run` of the rest: "
        f"estimate ${estimate['estimate_usd']:.4f} (range ${estimate['low_usd']:.4f} to "
        f"${estimate['high_usd']:.4f}), actual ${estimate['actual_usd']:.4f}: error "
        f"{estimate['error']:+.1%}; the estimate took {estimate['estimate_s']:.1f} s.",
    ]
    section.targets += [
        Target(
            "20.1 steady requests/s, cache on with no hits against cache off",
            ">= 95%",
            pct(on_off),
            median(on_off) >= 0.95 if on_off else None,
        ),
        Target(
            f"20.1 the same at {LATENCY_MS} ms (the server's pace the bound)",
            "reported",
            pct(paced_on_off),
            None,
        ),
        Target(
            f"20.2 a rerun of {turns:,} turns answered from the cache",
            "every turn a hit",
            f"{hits:,} hits, {rerun_rate:,.0f} turns/s, {rerun.wall_s:.1f} s",
            hits == turns,
        ),
        Target(
            "20.3 estimate (20 sampled rows) against the actual cost of the run",
            "within 15%",
            f"{estimate['error']:+.1%}",
            abs(estimate["error"]) <= 0.15,
        ),
    ]
    section.data = {
        "runs": {s: [r.as_dict() for r in rs] for s, rs in results.items()},
        "runs_paced": {s: [r.as_dict() for r in rs] for s, rs in paced.items()},
        "fill": fill.as_dict(),
        "rerun": rerun.as_dict(),
        "estimate": estimate,
    }
    return section
