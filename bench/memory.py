"""Memory against input size, and resuming after a SIGKILL near the end of a big run.

Both use single-turn rows at 0 ms with a large cap. The largest size is run once
for both experiments: it is SIGKILLed once ``resume_kill_fraction`` of its rows
are in the output, then resumed to the end; its peak RSS is the larger of the two
processes'. Smaller sizes run to completion.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
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
from engine.checkpoint.journal import segments
from engine.checkpoint.snapshot import EMITS_NAME, SNAPSHOT_NAME

_LOAD = """
import sys, time
from pathlib import Path
from engine.checkpoint.snapshot import load
t = time.perf_counter()
state = load(Path(sys.argv[1]), *map(int, sys.argv[2:5]))
print(time.perf_counter() - t, state.records, len(state.done), len(state.partial))
"""


def _load_alone(checkpoint: Path, files: tuple[Path, Path, Path]) -> dict[str, float]:
    """Time what a resume reads (engine.checkpoint.snapshot.load: the snapshot and the
    journal segments after it) on its own, in a fresh process."""
    sizes = [str(f.stat().st_size if f.exists() else 0) for f in files]
    out = subprocess.run(
        [sys.executable, "-c", _LOAD, str(checkpoint), *sizes],
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


def _on_disk(checkpoint: Path) -> dict[str, int]:
    """The checkpoint's files: journal segments (count, bytes), snapshot, emits index."""
    journal = [p for _, p in segments(checkpoint)]
    size = lambda p: p.stat().st_size if p.exists() else 0  # noqa: E731
    return {
        "segments": len(journal),
        "journal_bytes": sum(map(size, journal)),
        "journal_records": sum(count_lines(p) for p in journal),
        "snapshot_bytes": size(checkpoint / SNAPSHOT_NAME),
        "emits_bytes": size(checkpoint / EMITS_NAME),
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
        checkpoint = folder / "ck"
        files = (output, *(output.with_suffix(f".{kind}.jsonl") for kind in ("failed", "filtered")))
        facts: dict = {
            "rows": rows,
            "kill_at": kill_at,
            "rows_at_kill": first.rows_out,
            **_on_disk(checkpoint),
            "load": _load_alone(checkpoint, files),
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
        facts["to_first_request_s"] = second.to_first_request_s
        facts["repeated"] = second.repeated
        facts["resumed_wall_s"] = second.wall_s
        facts["resumed_rss_mb"] = second.maxrss_mb
        log(
            f"resumed: first request after {second.to_first_request_s}s, done in "
            f"{second.wall_s:.1f}s; {second.repeated} requests repeated"
        )
    return first, second, facts


def memory_and_resume(plan: Plan, *, memory: bool, resume: bool) -> list[Section]:
    """Peak RSS at each of ``memory_rows``; the sizes in ``resume_rows`` are SIGKILLed
    near the end and resumed (their peak RSS is the larger of the two processes')."""
    chosen = (plan.memory_rows if memory else ()) + (plan.resume_rows if resume else ())
    sizes = sorted(set(chosen))
    cap = plan.memory_cap
    points = []
    runs: list[Result] = []
    rows_md = []
    resumes: list[dict] = []
    with MockProcess(0, LOGS) as mock:
        for n in sizes:
            if resume and n in plan.resume_rows:
                first, second, facts = _kill_and_resume(plan, mock, n)
                resumes.append(facts)
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
            points.append({"rows": n, "rss_mb": rss, "wall_s": wall, "rate": rate, "note": note})
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
    if resume and resumes:
        title = "5. Resume after SIGKILL near the end of a big run"
        sections.append(resume_section(resumes, cap, "resume", title))
    return sections


# The journal a resume reads stays under this whatever the run's size: a snapshot
# every 20,000 rows or 4 MiB of segment (engine.checkpoint.writer).
JOURNAL_BOUND = 32 << 20


def resume_section(resumes: list[dict], cap: int, key: str, title: str) -> Section:
    """The resume table and its targets, from ``_kill_and_resume``'s facts (one per size)."""
    section = Section(key, title)
    sizes = [f"{f['rows']:,} rows" for f in resumes]

    def row(name: str, cell: Callable[[dict], str]) -> list[str]:
        return [name, *(cell(f) for f in resumes)]

    def seconds(value: float | None) -> str:
        return f"{value:.2f} s" if value is not None else "n/a"

    section.lines += [
        f"`turnstile run` over single-turn prompts (cap {cap}, 0 ms), SIGKILLed once 99% of "
        "the rows were in the output, then the same command run again. *Journal on disk* is "
        "what a resume reads: the journal segments the last snapshot does not cover, plus "
        "`snapshot.bin`; `emits.bin` is the index `turnstile export` uses to put rows in "
        "input order (16 bytes a row), never read by a resume. *Repeated requests*: "
        "requests the mock server received more than once over both runs (its per-request "
        "log, keyed by model and messages): a turn is requested again only when it was not "
        "journaled when the process died, in flight or answered but not yet written, so at "
        "most one per row in flight (2 x cap).",
        "",
        *table(
            ["measure", *sizes],
            [
                row("rows in the output at the kill", lambda f: f"{f['rows_at_kill']:,}"),
                row(
                    "journal on disk at the kill",
                    lambda f: (
                        f"{f['segments']} segment(s), {f['journal_records']:,} records, "
                        f"{f['journal_bytes'] / 2**20:.1f} MiB"
                    ),
                ),
                row("snapshot.bin", lambda f: f"{f['snapshot_bytes'] / 2**10:.0f} KiB"),
                row("emits.bin", lambda f: f"{f['emits_bytes'] / 2**20:.0f} MiB"),
                row(
                    "`engine.checkpoint.snapshot.load` alone (fresh process)",
                    lambda f: seconds(f.get("load", {}).get("seconds")),
                ),
                row(
                    "restart to first request (process start, load, seek past done rows)",
                    lambda f: seconds(f.get("to_first_request_s")),
                ),
                row("resumed run, start to exit", lambda f: seconds(f.get("resumed_wall_s"))),
                row("resumed run, peak RSS", lambda f: f"{f.get('resumed_rss_mb', 0):.0f} MB"),
                row("requests repeated after the SIGKILL", lambda f: f"{f.get('repeated')}"),
                row(
                    "final output",
                    lambda f: f"{f['rows_out']:,} rows, {f['distinct_ids']:,} distinct ids",
                ),
            ],
        ),
    ]
    first_request = [f.get("to_first_request_s") for f in resumes]
    on_disk = [f["journal_bytes"] + f["snapshot_bytes"] for f in resumes]
    section.targets += [
        Target(
            "3. resume: time to first request after SIGKILL",
            "< 1 s at every size",
            ", ".join(f"{seconds(t)} at {n}" for t, n in zip(first_request, sizes, strict=True)),
            all(t is not None and t < 1 for t in first_request),
        ),
        Target(
            "3. resume: journal on disk bounded (segments + snapshot)",
            f"< {JOURNAL_BOUND >> 20} MiB at every size",
            ", ".join(f"{b / 2**20:.1f} MiB at {n}" for b, n in zip(on_disk, sizes, strict=True)),
            all(b < JOURNAL_BOUND for b in on_disk),
        ),
        Target(
            "3. resume: requests re-sent after SIGKILL (turns not journaled when it died)",
            f"<= rows in flight (2 x cap = {2 * cap})",
            ", ".join(f"{f.get('repeated')} at {n}" for f, n in zip(resumes, sizes, strict=True)),
            all((f.get("repeated") or 0) <= 2 * cap for f in resumes),
        ),
        Target(
            "3. resume: output complete, no duplicates",
            "every row once",
            ", ".join(f"{f['rows_out']:,} of {f['rows']:,}" for f in resumes),
            all(f["rows_out"] == f["rows"] == f["distinct_ids"] for f in resumes),
        ),
    ]
    section.data = {"resumes": resumes}
    return section


__all__ = ["WORK", "memory_and_resume", "resume_section"]
