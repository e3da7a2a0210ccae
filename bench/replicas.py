"""One model, many servers: Turnstile against several mock server processes (replicas).

- scaling: multi-turn turns/s against 1, 2 and 4 replicas (cap 32 each, 50 ms);
- affinity on vs off, 3 replicas: conversations whose turns all landed on one replica
  (from each mock's ``requests_by_key`` and the request keys of the output's turns),
  each replica's share of requests, and turns/s;
- sporadic 429s (2%, Retry-After 1 s): Turnstile against the bare loop that retries a
  429 after its Retry-After;
- an outage (bench/outage.py): both of 2 replicas SIGKILLed a third of the way into a
  run, restarted on the same ports 10 s later.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import orjson

from bench import workloads
from bench.mockserver import MockGroup, MockProcess
from bench.plan import Plan
from bench.report import (
    Section,
    Target,
    failed_runs,
    median,
    other_load,
    pct,
    ratios,
    spread,
    table,
)
from bench.runners import (
    BARE,
    ROOT,
    TURNSTILE,
    Result,
    RunFolder,
    bare_cmd,
    measure,
    parse_json_line,
    parse_turnstile,
    turnstile_cmd,
    turnstile_config,
)
from bench.throughput import INPUTS, LOGS, interleave
from bench.workloads import MULTI, SINGLE, Workload
from engine.testing.mock_server import request_key

MODEL = "mock"
_REPLICA_LINE = re.compile(r"^\s+(http\S+): (\d+)/(\d+) ok, (\d+) server failures$", re.M)
_OUTAGE_LINE = re.compile(r"^\s+outage: .*$", re.M)
_RETRIES = re.compile(r"requests ok, .*?, (\d+) retries")


@contextmanager
def mock_processes(n: int, latency_ms: float, **faults: Any) -> Iterator[list[MockProcess]]:
    with ExitStack() as stack:
        yield [
            stack.enter_context(MockProcess(latency_ms, LOGS, name=f"-r{i}", **faults))
            for i in range(n)
        ]


def run_on(
    group: MockGroup,
    wl: Workload,
    *,
    cap: int,
    label: str,
    model_extra: dict[str, Any] | None = None,
    inspect: Callable[[Path], dict[str, Any]] | None = None,
    watch: Callable[[Any], None] | None = None,
) -> Result:
    """One ``turnstile run`` against every replica of ``group``; ``inspect`` reads the
    run folder (output, stderr) before it is removed."""
    with RunFolder(TURNSTILE) as folder:
        # One replica is the plain config: base_url a string.
        urls = {"base_url": group.urls} if len(group.mocks) > 1 else {}
        extra = {**urls, **(model_extra or {})}
        config = turnstile_config(folder, group.url, wl, cap=cap, model_extra=extra)
        output = folder / "out" / "distilled.jsonl"
        result = measure(
            TURNSTILE,
            label,
            turnstile_cmd(config),
            folder,
            group,
            timeout_s=600,
            parse=parse_turnstile,
            rows_out=output,
            watch=watch,
        )
        result.extra["expected_rows"] = wl.rows
        result.extra["replicas"] = [
            {"completed": s["completed"], "peak_in_flight": s["peak_in_flight"]}
            for s in group.per_replica()
        ]
        if inspect is not None:
            result.extra.update(inspect(folder))
        return result


def _busy(r: Result) -> float:
    span = r.window_s or r.wall_s
    return r.cpu_s / span if span > 0 else 0.0


def _turns_for(plan: Plan, replicas: int) -> Workload:
    """A multi-turn workload lasting about ``replica_seconds`` at the ideal rate."""
    ideal = replicas * plan.replica_cap / (plan.replica_latency_ms / 1000)
    turns = int(ideal * plan.replica_seconds)
    return workloads.make(MULTI, workloads.rows_for_turns(MULTI, turns), INPUTS)


# -- 1. scaling --------------------------------------------------------------


def _scaling(plan: Plan, mocks: list[MockProcess], section: Section) -> list[Result]:
    cap, latency = plan.replica_cap, plan.replica_latency_ms
    counts = plan.replica_counts
    runs: dict[str, Callable[[], Result]] = {}
    for n in counts:
        wl = _turns_for(plan, n)
        runs[str(n)] = lambda n=n, wl=wl: run_on(
            MockGroup(mocks[:n]), wl, cap=cap, label=f"{n} replica(s), {wl.turns:,} turns"
        )
    results: dict[str, list[Result]] = {}
    interleave(plan.replica_repeats, runs, results)
    ref = results[str(counts[0])]
    rows = []
    for n in counts:
        rs = results[str(n)]
        ideal = n * cap / (latency / 1000)
        rows.append(
            [
                n,
                n * cap,
                f"{rs[0].turns:,}",
                f"{ideal:,.0f}",
                f"{spread([r.rate_steady for r in rs])} "
                f"({pct([r.rate_steady / ideal for r in rs])})",
                pct(ratios(rs, ref, "rate_steady")),
                spread([r.wall_s for r in rs], "{:.1f}"),
                spread([_busy(r) for r in rs], "{:.2f}"),
                spread([r.server_busy for r in rs], "{:.2f}"),
                max((p["peak_in_flight"] for r in rs for p in r.extra["replicas"]), default=0),
            ]
        )
    section.lines += [
        f"**Scaling.** Multi-turn, mock latency {latency:g} ms, `max_concurrency: {cap}` per "
        f"replica, one mock server process per replica; each run sized for about "
        f"{plan.replica_seconds:g} s at the ideal rate (replicas x {cap} / {latency:g} ms), "
        f"{plan.replica_repeats} interleaved repeat(s). *steady* is the mocks' view (first "
        "request at any replica to the last reply from any); ratios are per repeat against "
        "the 1-replica run next to it. *client CPU* is Turnstile's CPU seconds over that "
        "window (1.00 = one core); *mocks CPU* is all mock processes together.",
        "",
        *table(
            [
                "replicas",
                "cap in all",
                "turns",
                "ideal turns/s",
                "steady turns/s (of ideal)",
                "vs 1 replica",
                "wall s",
                "client CPU",
                "mocks CPU",
                "peak in flight at one replica",
            ],
            rows,
        ),
        "",
    ]
    top = str(counts[-1])
    ratio = ratios(results[top], ref, "rate_steady")
    want = 0.9 * counts[-1] / counts[0]
    busy = spread([_busy(r) for r in results[top]], "{:.2f}")
    section.targets.append(
        Target(
            f"8. replicas, scaling: {top} replicas' steady turns/s vs 1 replica "
            f"(multi-turn, {latency:g} ms, cap {cap} each)",
            f">= {want:.1f}x",
            f"{spread(ratio, '{:.2f}')}x; client CPU {busy} cores",
            median(ratio) >= want,
        )
    )
    section.data["scaling"] = {k: [r.as_dict() for r in v] for k, v in results.items()}
    return [r for v in results.values() for r in v]


# -- 2. affinity -------------------------------------------------------------


def _placement(group: MockGroup) -> Callable[[Path], dict[str, Any]]:
    """Where each conversation's turns went, from the mocks' per-request counters.

    Turn i's request is the output's messages before its i-th assistant message; its
    key (``request_key``) is in the counters of the replica that received it.
    """

    def inspect(folder: Path) -> dict[str, Any]:
        where: dict[str, set[int]] = {}
        requests = []
        for i, mock in enumerate(group.mocks):
            by_key = mock.full_stats()["requests_by_key"]
            requests.append(sum(by_key.values()))
            for key in by_key:
                where.setdefault(key, set()).add(i)
        multi = together = missing = 0
        output = folder / "out" / "distilled.jsonl"
        if not output.exists():  # the run failed: failed_runs says so
            output = Path("/dev/null")
        with output.open("rb") as f:
            for line in f:
                messages = orjson.loads(line)["messages"]
                seen: set[int] = set()
                turns = 0
                for j, message in enumerate(messages):
                    if message["role"] != "assistant":
                        continue
                    turns += 1
                    found = where.get(request_key(MODEL, messages[:j]))
                    if found is None:
                        missing += 1
                    else:
                        seen |= found
                if turns >= 2:
                    multi += 1
                    together += len(seen) == 1
        total = sum(requests) or 1
        return {
            "multi_turn_rows": multi,
            "one_replica": together / multi if multi else float("nan"),
            "shares": [n / total for n in requests],
            "keys_missing": missing,
        }

    return inspect


def _on_off(plan: Plan, group: MockGroup, wl: Workload, tag: str) -> dict[str, list[Result]]:
    """Affinity on and off against ``group``, interleaved."""

    def run(affinity: bool) -> Result:
        return run_on(
            group,
            wl,
            cap=plan.replica_cap,
            label=f"affinity {'on' if affinity else 'off'}{tag}",
            model_extra=None if affinity else {"affinity": False},
            inspect=_placement(group),
        )

    results: dict[str, list[Result]] = {}
    interleave(plan.replica_repeats, {"on": lambda: run(True), "off": lambda: run(False)}, results)
    return results


def _affinity(plan: Plan, mocks: list[MockProcess], section: Section) -> list[Result]:
    n, cap, latency = plan.affinity_replicas, plan.replica_cap, plan.replica_latency_ms
    wl = _turns_for(plan, n)
    results = _on_off(plan, MockGroup(mocks[:n]), wl, "")
    # The same against replicas of unequal speed: with one latency for all, replies
    # come back in waves, and conversations queued in order fall back onto the
    # replica they came from even with affinity off (a mock's artefact).
    spread_ms = [latency * (0.75 + 0.5 * i / (n - 1)) for i in range(n)] if n > 1 else [latency]
    with ExitStack() as stack:
        uneven = [
            stack.enter_context(MockProcess(ms, LOGS, name=f"-u{i}"))
            for i, ms in enumerate(spread_ms)
        ]
        mixed = _on_off(plan, MockGroup(uneven), wl, ", uneven latency")
    on, off = results["on"], results["off"]
    # What chance alone gives: a conversation of k turns spread at random over n
    # replicas stays on one with probability (1/n)^(k-1).
    chance = [(1 / n) ** (workloads.turns_of_row(MULTI, i) - 1) for i in range(wl.rows)]
    chance = [c for i, c in enumerate(chance) if workloads.turns_of_row(MULTI, i) >= 2]
    uneven_label = "/".join(f"{ms:g}" for ms in spread_ms)
    rows = []
    for name, rs, ref in (
        (f"on (default), {latency:g} ms each", on, off),
        (f"off, {latency:g} ms each", off, off),
        (f"on (default), {uneven_label} ms", mixed["on"], mixed["off"]),
        (f"off, {uneven_label} ms", mixed["off"], mixed["off"]),
    ):
        shares = [s for r in rs for s in r.extra["shares"]]
        rows.append(
            [
                name,
                spread([r.rate_steady for r in rs]),
                pct(ratios(rs, ref, "rate_steady")),
                pct([r.extra["one_replica"] for r in rs]),
                f"{min(shares, default=0):.0%}-{max(shares, default=0):.0%}",
                sum(r.extra["keys_missing"] for r in rs),
                spread([_busy(r) for r in rs], "{:.2f}"),
            ]
        )
    section.lines += [
        f"**Affinity.** {n} replicas, {wl.label}, mock latency {latency:g} ms, cap {cap} "
        f"each, no faults; `affinity: true` (the default) against `affinity: false`, "
        f"{plan.replica_repeats} interleaved repeat(s). *On one replica* counts the "
        f"{on[0].extra['multi_turn_rows']:,} conversations of 2 or more turns (one-turn ones "
        "are on one replica by definition): the key of each turn's request "
        "(`engine.testing.mock_server.request_key(model, messages before that reply)`) is "
        "looked up in each mock's `requests_by_key`. Spread at random, "
        f"{sum(chance) / len(chance):.0%} of them would be on one replica by chance. "
        "*Keys not found* should be 0 (every turn located). With one latency for all "
        "replicas, replies come back in waves and the conversations waiting in order fall "
        "back onto the replica they came from even with affinity off, so the last two rows "
        f"repeat the pair against replicas at {uneven_label} ms: there *off* is near chance, "
        "and the share per replica follows each one's speed (the most free room wins). "
        "The targets are read from the first two rows.",
        "",
        *table(
            [
                "affinity, replicas",
                "steady turns/s",
                "vs off",
                "conversations on one replica",
                "share of requests per replica (all repeats)",
                "keys not found",
                "client CPU",
            ],
            rows,
        ),
        "",
    ]
    one = [r.extra["one_replica"] for r in on]
    on_shares = [s for r in on for s in r.extra["shares"]]
    rate = ratios(on, off, "rate_steady")
    section.targets += [
        Target(
            f"8. replicas, affinity on: conversations (>= 2 turns) on one replica ({n} replicas)",
            ">= 90%",
            f"{pct(one)} (off: {pct([r.extra['one_replica'] for r in off])}; uneven latency: "
            f"on {pct([r.extra['one_replica'] for r in mixed['on']])}, "
            f"off {pct([r.extra['one_replica'] for r in mixed['off']])})",
            median(one) >= 0.9,
        ),
        Target(
            "8. replicas, affinity on: share of requests per replica",
            ">= 20% each",
            f"{min(on_shares, default=0):.0%}-{max(on_shares, default=0):.0%}",
            min(on_shares, default=0) >= 0.2,
        ),
        Target(
            "8. replicas, affinity on: steady turns/s vs off",
            ">= 95%",
            pct(rate),
            median(rate) >= 0.95,
        ),
    ]
    section.data["affinity"] = {k: [r.as_dict() for r in v] for k, v in results.items()}
    section.data["affinity_uneven"] = {k: [r.as_dict() for r in v] for k, v in mixed.items()}
    return on + off + mixed["on"] + mixed["off"]


# -- 3. sporadic 429s --------------------------------------------------------


def _run_bare_retrying(mock: MockProcess, wl: Workload, cap: int) -> Result:
    with RunFolder(BARE) as folder:
        output = folder / "out.jsonl"
        result = measure(
            BARE,
            "retries 429 after Retry-After",
            [*bare_cmd(mock.url, wl, output, cap), "--retry-429"],
            folder,
            mock,
            timeout_s=600,
            parse=parse_json_line,
            rows_out=output,
            env={"PYTHONPATH": str(ROOT)},
        )
        result.extra["expected_rows"] = wl.rows
        return result


def summary_facts(folder: Path) -> dict[str, Any]:
    text = (folder / "stderr.txt").read_text(errors="replace")
    match = _RETRIES.search(text)
    return {
        "retries": int(match.group(1)) if match else None,
        "outages": _OUTAGE_LINE.findall(text),
        "replica_lines": [m.group(0).strip() for m in _REPLICA_LINE.finditer(text)],
    }


def _rate_429(plan: Plan, section: Section) -> list[Result]:
    cap, latency = plan.replica_cap, plan.rate429_latency_ms
    wl = workloads.make(SINGLE, plan.rate429_rows, INPUTS)
    results: dict[str, list[Result]] = {}
    with mock_processes(1, latency, rate_429=0.02, retry_after_s=1.0) as mocks:
        group = MockGroup(mocks)
        interleave(
            plan.rate429_repeats,
            {
                TURNSTILE: lambda: run_on(group, wl, cap=cap, label="429s", inspect=summary_facts),
                BARE: lambda: _run_bare_retrying(mocks[0], wl, cap),
            },
            results,
        )
    ts, bare = results[TURNSTILE], results[BARE]
    ratio = ratios(ts, bare, "rate_steady")
    ideal = cap / (latency / 1000)
    rows = [
        [
            name,
            spread([r.rate_steady for r in rs]),
            pct([r.rate_steady / ideal for r in rs]),
            "1" if rs is bare else pct(ratio),
            spread([r.extra.get("retries") or 0 for r in rs]),
            spread([r.wall_s for r in rs], "{:.1f}"),
            spread([_busy(r) for r in rs], "{:.2f}"),
        ]
        for name, rs in ((TURNSTILE, ts), ("bare loop, retrying 429s", bare))
    ]
    section.lines += [
        f"**Sporadic 429s.** {wl.label}, mock latency {latency:g} ms, cap {cap}, the mock "
        "answering 2% of requests (drawn in arrival order, the same seed for both) with "
        "429 and `Retry-After: 1`. Reference: the bare loop with `--retry-429`, which sends "
        "a 429 again after its Retry-After, its slot released meanwhile (Turnstile adds up "
        f"to 0.15 s of jitter). {plan.rate429_repeats} interleaved repeat(s). *steady* = "
        f"replies / (first request to last reply); ideal = {ideal:,.0f}/s. Both finish with "
        "the last retries' 1 s wait, which weighs on both alike.",
        "",
        *table(
            [
                "system",
                "steady requests/s",
                "of ideal",
                "vs retrying loop",
                "retries",
                "wall s",
                "client CPU",
            ],
            rows,
        ),
        "",
    ]
    section.targets.append(
        Target(
            "8. replicas, sporadic 429s (2%, Retry-After 1 s): requests/s vs the bare loop "
            "retrying after Retry-After",
            ">= 80%",
            pct(ratio),
            median(ratio) >= 0.8,
        )
    )
    section.data["rate_429"] = {k: [r.as_dict() for r in v] for k, v in results.items()}
    return ts + bare


# -- the section -------------------------------------------------------------


def replicas(plan: Plan) -> Section:
    section = Section("replicas", "8. Replicas: one model, many servers")
    section.lines += [
        "A model's `base_url` is a list of servers (replicas) of one model, "
        "`max_concurrency` per replica. Each replica is a mock server process of its own "
        "(`python -m bench.mockserver`), all on this machine's 2 cores with the client.",
        "",
    ]
    runs: list[Result] = []
    counts = max(max(plan.replica_counts), plan.affinity_replicas)
    with mock_processes(counts, plan.replica_latency_ms) as mocks:
        runs += _scaling(plan, mocks, section)
        runs += _affinity(plan, mocks, section)
    runs += _rate_429(plan, section)
    from bench import outage  # it builds on this module's helpers

    runs += outage.outage(plan, section)
    section.lines += [
        f"Other processes on the machine used {other_load(runs)} on average during these runs.",
        *failed_runs(runs),
    ]
    return section
