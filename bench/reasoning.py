"""Reasoning teachers: every reply carries a 16 KB trace. Turnstile against the bare loop.

The mock answers at 0 ms with ``reasoning_content`` (vLLM's ``--reasoning-parser``
shape) holding a 16,384-character trace, so the client's CPU and the bytes it moves
are the only limit. Turnstile parses the trace out and writes it into the row
(``reasoning_content``), journaling the row's place and its turn's cost, not the
trace a second time (a row's last turn is journaled as the row); the bare loop
(bench/baseline.py ``--reasoning``) writes the same rows, byte for byte, with no
journal. Single-turn rows, cap 64, interleaved repeats. Then Turnstile's peak RSS
over growing inputs, and the journal's bytes per turn (segments on disk over the turn
records in them, a row's v record counting for its last turn).

``BENCH_REASONING_SIZES=10000,100000,1000000`` sets the input sizes of the memory runs.
"""

from __future__ import annotations

import os
from pathlib import Path

from bench import workloads
from bench.mockserver import MockProcess
from bench.plan import Plan
from bench.report import Section, Target, median, pct, spread, table
from bench.runners import (
    ROOT,
    Result,
    RunFolder,
    bare_cmd,
    measure,
    parse_json_line,
    parse_turnstile,
    same_rows,
    turnstile_cmd,
    turnstile_config,
)
from bench.throughput import INPUTS, LOGS, interleave
from bench.workloads import SINGLE
from engine.checkpoint.journal import segments

TRACE_CHARS = 16_384
CAP = 64
TURNSTILE, BARE = "turnstile", "bare loop (uvloop)"
# A turn journaled as it landed, and a row's v record, which stands for its last turn
# (here its only one: the turn's text and trace are in the row, not journaled again).
_TURN_MARKS = (b'"k":"t"', b'"k":"v"')


def _uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def _journal(checkpoint: Path) -> dict[str, int]:
    """Bytes of the journal segments on disk and the turn records they hold."""
    size = turns = 0
    for _, path in segments(checkpoint):
        data = path.read_bytes()
        size += len(data)
        turns += sum(data.count(mark) for mark in _TURN_MARKS)
    return {"journal_bytes": size, "journal_turns": turns}


def _turnstile(mock: MockProcess, wl: workloads.Workload, keep: Path | None = None) -> Result:
    with RunFolder("reasoning") as folder:
        config = turnstile_config(folder, mock.url, wl, cap=CAP)
        output = folder / "out" / "distilled.jsonl"
        result = measure(
            TURNSTILE,
            f"single 0ms cap {CAP} trace {TRACE_CHARS}",
            turnstile_cmd(config),
            folder,
            mock,
            timeout_s=3600,
            parse=parse_turnstile,
            rows_out=output,
        )
        result.extra.update(_journal(folder / "ck"))
        result.extra["output_bytes"] = output.stat().st_size if output.exists() else 0
        if keep is not None and output.exists():
            os.replace(output, keep)
        return result


def _bare(mock: MockProcess, wl: workloads.Workload, keep: Path | None = None) -> Result:
    with RunFolder("reasoning-bare") as folder:
        output = folder / "out.jsonl"
        cmd = [*bare_cmd(mock.url, wl, output, CAP, uvloop=_uvloop()), "--reasoning"]
        result = measure(
            BARE,
            f"single 0ms cap {CAP} trace {TRACE_CHARS}",
            cmd,
            folder,
            mock,
            timeout_s=3600,
            parse=parse_json_line,
            rows_out=output,
            env={"PYTHONPATH": str(ROOT)},
        )
        result.extra["output_bytes"] = output.stat().st_size if output.exists() else 0
        if keep is not None and output.exists():
            os.replace(output, keep)
        return result


def _sizes(plan: Plan) -> list[int]:
    raw = os.environ.get("BENCH_REASONING_SIZES")
    if raw:
        return [int(x) for x in raw.split(",") if x.strip()]
    return [2_000, 10_000] if plan.quick else [10_000, 100_000]


def reasoning(plan: Plan) -> Section:
    rows = plan.caps_zero_turns
    repeats = plan.caps_repeats + 2
    results: dict[str, list[Result]] = {}
    memory: list[Result] = []
    with MockProcess(
        0, LOGS, reasoning="reasoning_content", reasoning_chars=TRACE_CHARS, uvloop=_uvloop()
    ) as mock:
        wl = workloads.make(SINGLE, rows, INPUTS)
        # The same bytes: one run of each kept and compared row for row.
        ours, theirs = INPUTS / "reasoning-turnstile.jsonl", INPUTS / "reasoning-bare.jsonl"
        first = {TURNSTILE: _turnstile(mock, wl, ours), BARE: _bare(mock, wl, theirs)}
        same = same_rows(ours, theirs) and ours.read_bytes() != b""
        identical = _same_bytes(ours, theirs)
        ours.unlink(missing_ok=True)
        theirs.unlink(missing_ok=True)
        for name, result in first.items():
            results.setdefault(name, []).append(result)
        runs = {TURNSTILE: lambda: _turnstile(mock, wl), BARE: lambda: _bare(mock, wl)}
        interleave(repeats - 1, runs, results)
        for size in _sizes(plan):
            memory.append(_turnstile(mock, workloads.make(SINGLE, size, INPUTS)))
    ratios = [
        t.rate_steady / b.rate_steady
        for t, b in zip(results[TURNSTILE], results[BARE], strict=False)
        if b.rate_steady
    ]
    journal = [
        r.extra["journal_bytes"] / r.extra["journal_turns"]
        for r in results[TURNSTILE] + memory
        if r.extra.get("journal_turns")
    ]
    out_per_row = [r.extra["output_bytes"] / r.rows_out for r in results[TURNSTILE] if r.rows_out]
    section = Section("reasoning", "16. Reasoning teachers: 16 KB traces at 0 ms")
    section.lines += [
        f"{rows:,} single-turn rows; the mock answers at 0 ms with `reasoning_content` holding "
        f"a {TRACE_CHARS:,}-character trace (`--reasoning reasoning_content "
        f"--reasoning-chars {TRACE_CHARS}`); cap {CAP}; {repeats} interleaved repeats. "
        "Turnstile splits the trace out of each reply and writes it into the row, where the "
        "journal's record of the row (its place and its turn's cost) finds it: a row's last "
        "turn is journaled as the row, not a second time; the bare loop "
        "(`bench/baseline.py --reasoning`) writes the same rows with no journal.",
        "",
        f"Same rows from both (id, messages with their traces): **{same}**; same bytes "
        f"(rows sorted by id): **{identical}**.",
        "",
        *table(
            ["system", "steady requests/s", "CPU us/request", "peak RSS MB", "output bytes/row"],
            [
                [
                    system,
                    spread([r.rate_steady for r in rs]),
                    spread([r.cpu_us_per_request for r in rs]),
                    spread([r.maxrss_mb for r in rs]),
                    spread([r.extra.get("output_bytes", 0) / r.rows_out for r in rs if r.rows_out]),
                ]
                for system, rs in results.items()
            ],
        ),
        "",
        "Turnstile's peak RSS against input size (same trace, one run each):",
        "",
        *table(
            ["rows", "peak RSS MB", "steady requests/s", "journal bytes/turn"],
            [
                [
                    f"{r.rows_out:,}",
                    f"{r.maxrss_mb:.0f}",
                    f"{r.rate_steady:,.0f}",
                    f"{r.extra['journal_bytes'] / r.extra['journal_turns']:,.0f}"
                    if r.extra.get("journal_turns")
                    else "-",
                ]
                for r in memory
            ],
        ),
        "",
        f"Journal bytes per turn (segments on disk / turn records in them, a row's `v` "
        "record counting for its turn): "
        f"{spread(journal)}; output bytes per row: {spread(out_per_row)}.",
    ]
    section.targets.append(
        Target(
            "16.1 steady requests/s against the bare loop writing the same rows (16 KB traces)",
            ">= 90%",
            pct(ratios),
            median(ratios) >= 0.90 if ratios else None,
        )
    )
    rss = [r.maxrss_mb for r in memory]
    if len(rss) >= 2:
        growth = rss[-1] / rss[0]
        section.targets.append(
            Target(
                f"16.2 peak RSS flat from {memory[0].rows_out:,} to {memory[-1].rows_out:,} rows",
                "<= 1.2x",
                f"{growth:.2f}x ({rss[0]:.0f} -> {rss[-1]:.0f} MB)",
                growth <= 1.2,
            )
        )
    section.data = {
        "runs": {s: [r.as_dict() for r in rs] for s, rs in results.items()},
        "memory": [r.as_dict() for r in memory],
        "same_rows": same,
        "same_bytes": identical,
    }
    return section


def _same_bytes(a: Path, b: Path) -> bool:
    """Whether two outputs hold the same row bytes, in any order (rows sorted)."""

    def lines(path: Path) -> list[bytes]:
        return sorted(path.read_bytes().splitlines())

    return lines(a) == lines(b)
