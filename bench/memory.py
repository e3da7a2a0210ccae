"""Memory against input size, and resuming after a SIGKILL near the end of a big run.

Both use single-turn rows at 0 ms with a large cap. The largest size is run once
for both experiments: it is SIGKILLed once ``resume_kill_fraction`` of its rows
are in the output, then resumed to the end; its peak RSS is the larger of the two
processes'. Smaller sizes run to completion.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson

from bench import workloads
from bench.mockserver import MockProcess
from bench.plan import Plan
from bench.report import Section, Target, failed_runs, other_load, table
from bench.runners import (
    TURNSTILE,
    WORK,
    Result,
    RunFolder,
    count_lines,
    kill_when,
    measure,
    parse_turnstile,
    run_turnstile,
    turnstile_cmd,
    turnstile_config,
)
from bench.throughput import INPUTS, LOGS, log
from bench.workloads import SINGLE

_REPLAY = """
import sys, time
from pathlib import Path
from engine.checkpoint.journal import replay
t = time.perf_counter()
state = replay(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
print(time.perf_counter() - t, state.records, len(state.done), len(state.partial))
"""


def _replay_alone(checkpoint: Path, output: Path) -> dict[str, float]:
    """Time engine.checkpoint.journal.replay on its own, in a fresh process."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            _REPLAY,
            str(checkpoint / "journal.jsonl"),
            str(output.stat().st_size),
            "0",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        seconds, records, done, partial = out.stdout.split()
    except ValueError:
        return {}
    return {
        "seconds": float(seconds),
        "records": int(records),
        "done": int(done),
        "partial": int(partial),
    }


def _unique_ids(path: Path) -> tuple[int, int]:
    """(rows, distinct ids) of an output file."""
    ids = set()
    rows = 0
    with path.open("rb") as f:
        for line in f:
            if line.strip():
                rows += 1
                ids.add(orjson.loads(line)["id"])
    return rows, len(ids)


def _kill_and_resume(plan: Plan, mock: MockProcess, rows: int) -> tuple[Result, Result, dict]:
    wl = workloads.make(SINGLE, rows, INPUTS)
    cap = plan.memory_cap
    kill_at = int(rows * plan.resume_kill_fraction)
    with RunFolder("resume") as folder:
        config = turnstile_config(folder, mock.url, wl, cap=cap)
        output = folder / "out" / "distilled.jsonl"
        cmd = turnstile_cmd(config)
        first = measure(
            TURNSTILE,
            f"{rows:,} rows, SIGKILL",
            cmd,
            folder,
            mock,
            timeout_s=3600,
            parse=parse_turnstile,
            rows_out=output,
            watch=kill_when(output, kill_at),
        )
        first.extra["killed"] = True
        log(f"killed at {first.rows_out:,} rows (exit {first.rc}) after {first.wall_s:.1f}s")
        journal = folder / "ck" / "journal.jsonl"
        facts: dict = {
            "rows": rows,
            "kill_at": kill_at,
            "rows_at_kill": first.rows_out,
            "journal_bytes": journal.stat().st_size if journal.exists() else 0,
            "journal_records": count_lines(journal),
            "replay": _replay_alone(folder / "ck", output),
        }
        second = measure(
            TURNSTILE,
            f"{rows:,} rows, resumed",
            cmd,
            folder,
            mock,
            timeout_s=3600,
            parse=parse_turnstile,
            rows_out=output,
            reset=False,
        )
        second.extra["expected_rows"] = rows
        facts["rows_out"], facts["distinct_ids"] = (
            _unique_ids(output) if output.exists() else (0, 0)
        )
        log(
            f"resumed: first request after {second.to_first_request_s}s, done in "
            f"{second.wall_s:.1f}s; {second.repeated} requests repeated"
        )
    return first, second, facts


def memory_and_resume(plan: Plan, *, memory: bool, resume: bool) -> list[Section]:
    sizes = list(plan.memory_rows) if memory else [plan.memory_rows[-1]]
    cap = plan.memory_cap
    points = []
    runs: list[Result] = []
    rows_md = []
    facts: dict = {}
    with MockProcess(0, LOGS) as mock:
        for n in sizes:
            if resume and n == sizes[-1]:
                first, second, facts = _kill_and_resume(plan, mock, n)
                runs += [first, second]
                rss = max(first.maxrss_mb, second.maxrss_mb)
                note = (
                    f"SIGKILLed at {first.rows_out:,} rows ({first.maxrss_mb:.0f} MB), then "
                    f"resumed to the end ({second.maxrss_mb:.0f} MB)"
                )
                rate = first.rate_steady
                wall = first.wall_s + second.wall_s
            else:
                wl = workloads.make(SINGLE, n, INPUTS)
                result = run_turnstile(mock, wl, cap=cap, label=f"{n:,} rows", timeout_s=3600)
                log(f"{n:,} rows: peak RSS {result.maxrss_mb:.0f} MB, wall {result.wall_s:.1f}s")
                runs.append(result)
                rss, rate, wall, note = result.maxrss_mb, result.rate_steady, result.wall_s, ""
            points.append({"rows": n, "rss_mb": rss, "wall_s": wall, "rate": rate})
            rows_md.append([f"{n:,}", f"{rss:.0f}", f"{wall:.1f}", f"{rate:,.0f}", note])
    sections = []
    if memory:
        section = Section("memory", "4. Memory: peak RSS of `turnstile run` against input size")
        section.lines += [
            f"Single-turn rows generated into a file, mock at 0 ms, cap {cap} "
            f"({2 * cap} conversations in flight). Peak RSS is the `turnstile run` process's "
            "own high-water mark (`VmHWM` in /proc/PID/status, read every 0.1 s until it "
            "exits). One run per size.",
            "",
            *table(["conversations", "peak RSS MB", "wall s", "steady turns/s", "note"], rows_md),
            "",
            f"Other processes used {other_load(runs)} on average meanwhile.",
            *failed_runs(runs),
        ]
        peak = max(p["rss_mb"] for p in points)
        low = min(p["rss_mb"] for p in points)
        section.targets.append(
            Target(
                "4. memory: peak RSS",
                "< 200 MB",
                f"{peak:.0f} MB at most (sizes {', '.join(f'{n:,}' for n in sizes)})",
                peak < 200,
            )
        )
        section.targets.append(
            Target(
                "4. memory: flat in input size",
                "largest within 25% of smallest",
                f"{low:.0f} -> {peak:.0f} MB (x{peak / low:.2f})",
                peak <= 1.25 * low,
            )
        )
        section.data["points"] = points
        section.data["other_load"] = other_load(runs)
        sections.append(section)
    if resume and facts:
        second = runs[-1]
        replay = facts.get("replay", {})
        section = Section("resume", "5. Resume after SIGKILL near the end of a big run")
        section.lines += [
            f"`turnstile run` over {facts['rows']:,} single-turn prompts (cap {cap}, 0 ms), "
            f"SIGKILLed once {facts['kill_at']:,} rows were in the output, then the same "
            "command run again. *Repeated requests* are requests the mock server received more "
            "than once over both runs (its per-request log, keyed by model and messages).",
            "",
            *table(
                ["measure", "value"],
                [
                    ["rows in the output at the kill", f"{facts['rows_at_kill']:,}"],
                    [
                        "journal at the kill",
                        f"{facts['journal_records']:,} records, "
                        f"{facts['journal_bytes'] / 2**20:.0f} MiB",
                    ],
                    [
                        "`engine.checkpoint.journal.replay` alone (fresh process)",
                        f"{replay.get('seconds', float('nan')):.2f} s",
                    ],
                    [
                        "restart to first request (process start, replay, skipping done rows)",
                        f"{second.to_first_request_s:.2f} s"
                        if second.to_first_request_s is not None
                        else "n/a",
                    ],
                    ["resumed run, start to exit", f"{second.wall_s:.2f} s"],
                    ["resumed run, peak RSS", f"{second.maxrss_mb:.0f} MB"],
                    ["requests repeated after the SIGKILL", f"{second.repeated} (cap {cap})"],
                    [
                        "final output",
                        f"{facts['rows_out']:,} rows, {facts['distinct_ids']:,} distinct ids",
                    ],
                ],
            ),
        ]
        complete = facts["rows_out"] == facts["rows"] == facts["distinct_ids"]
        section.targets.append(
            Target(
                "5. resume: requests re-sent after SIGKILL",
                f"<= cap ({cap})",
                f"{second.repeated}",
                second.repeated <= cap,
            )
        )
        section.targets.append(
            Target(
                "5. resume: time to first request after restart",
                "reported",
                f"{second.to_first_request_s:.2f} s for a {facts['journal_records']:,}-record "
                "journal"
                if second.to_first_request_s is not None
                else "n/a",
                None,
            )
        )
        section.targets.append(
            Target(
                "5. resume: output complete, no duplicates",
                f"{facts['rows']:,} rows",
                f"{facts['rows_out']:,} rows, {facts['distinct_ids']:,} distinct",
                complete,
            )
        )
        section.data = facts
        sections.append(section)
    return sections


__all__ = ["WORK", "memory_and_resume"]
