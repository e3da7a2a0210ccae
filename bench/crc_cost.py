"""What journal checksums cost: ``turnstile run`` at 0 ms with and without them, side by side.

0 ms latency, cap 64, single-turn: the client's CPU is the only limit, so the cost of
computing a CRC32 for every journal record (a turn and an emit per row) shows in full.
*Without* is the same engine with the writer's ``encode`` replaced by the one from
before checksums (``orjson.dumps(record) + b"\\n"``), run as
``python -m bench.crc_cost CONFIG``; interleaved repeats.
"""

from __future__ import annotations

import sys
from typing import Any

import orjson

from bench import workloads
from bench.mockserver import MockProcess
from bench.plan import Plan
from bench.report import Section, Target, median, pct, systems_table
from bench.runners import (
    ROOT,
    Result,
    RunFolder,
    measure,
    parse_turnstile,
    turnstile_cmd,
    turnstile_config,
)
from bench.throughput import INPUTS, LOGS, interleave
from bench.workloads import SINGLE

WITH, WITHOUT = "with checksums", "without checksums"


def _plain(record: dict[str, Any]) -> bytes:
    return orjson.dumps(record) + b"\n"


def _run(mock: MockProcess, wl: workloads.Workload, cap: int, checksums: bool) -> Result:
    with RunFolder("crc") as folder:
        path = turnstile_config(folder, mock.url, wl, cap=cap)
        cmd = (
            turnstile_cmd(path)
            if checksums
            else [sys.executable, "-m", "bench.crc_cost", str(path)]
        )
        return measure(
            WITH if checksums else WITHOUT,
            f"single 0ms cap {cap}",
            cmd,
            folder,
            mock,
            timeout_s=900,
            parse=parse_turnstile,
            rows_out=folder / "out" / "distilled.jsonl",
            env={"PYTHONPATH": str(ROOT)},
        )


def crc_cost(plan: Plan) -> Section:
    results: dict[str, list[Result]] = {}
    with MockProcess(0, LOGS) as mock:
        wl = workloads.make(SINGLE, plan.caps_zero_turns, INPUTS)
        runs = {WITHOUT: lambda: _run(mock, wl, 64, False), WITH: lambda: _run(mock, wl, 64, True)}
        interleave(plan.caps_repeats + 2, runs, results)
    ratios = [
        on.rate_steady / off.rate_steady
        for off, on in zip(results[WITHOUT], results[WITH], strict=False)
        if off.rate_steady
    ]
    section = Section("crc_cost", "14. Journal checksums: the cost of a CRC32 per record at 0 ms")
    section.lines += [
        f"{plan.caps_zero_turns:,} single-turn rows, mock at 0 ms, cap 64, "
        f"{plan.caps_repeats + 2} interleaved repeats. *Without*: the writer's `encode` "
        "swapped for the one from before checksums (`python -m bench.crc_cost`).",
        "",
        *systems_table(results, "steady turns/s"),
    ]
    section.targets.append(
        Target(
            "16.1 journal checksums: steady requests/s against none (0 ms, cap 64)",
            ">= 98%",
            pct(ratios),
            median(ratios) >= 0.98 if ratios else None,
        )
    )
    section.data = {s: [r.as_dict() for r in rs] for s, rs in results.items()}
    return section


def main(argv: list[str]) -> int:
    """``turnstile run CONFIG --quiet`` with journal records written without checksums."""
    from engine.checkpoint import writer
    from engine.cli import main as cli

    writer.encode = _plain  # type: ignore[assignment]
    return cli(["run", argv[0], "--quiet"])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
