"""This engine against another engine tree, back to back on the mock (not in the suite).

This VM's speed moves whole runs by 10-30% from one phase to the next, so a figure
from another day's run says little about a change. Both engines run here against
the same mock server, with the bare loop as the yardstick, in interleaved repeats
(the order rotates)::

    git archive 83ae0c3 engine | tar -x -C /tmp/before
    .venv/bin/python -m bench.versus --engine /tmp/before [--engine DIR ...]
        [--latency-ms 0] [--cap 64] [--rows 20000] [--repeats 5] [--uvloop]

``--engine DIR`` is the parent of another ``engine/`` tree (put first on
PYTHONPATH, as ``bench.profile --engine`` does; give it more than once to compare
several, "other engine 1", "2"... in that order); all run ``turnstile run`` with the
same config (single-turn rows; ``uvloop`` as ``--uvloop`` says, asyncio otherwise,
and so does the bare loop). Printed: each system's steady requests/s and client
CPU per request over the server's window (medians, then every repeat), and each
engine's ratios to the bare loop of the same repeat.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from bench import workloads
from bench.mockserver import MockProcess
from bench.report import median, ratios, spread, table
from bench.runners import ROOT, Result, engine_trees, run_bare, run_turnstile
from bench.throughput import INPUTS, LOGS, interleave
from bench.workloads import SINGLE

THIS, OTHER, BARE = "this engine", "other engine", "bare loop"


def compare(
    others: list[Path], latency_ms: float, cap: int, rows: int, repeats: int, uvloop: bool
) -> list[str]:
    """The comparison's table (markdown lines); raises when a run fails or loses rows."""
    results: dict[str, list[Result]] = {}
    named = {
        OTHER if len(others) == 1 else f"{OTHER} {i + 1}": tree for i, tree in enumerate(others)
    }
    with MockProcess(latency_ms, LOGS, uvloop=True) as mock:
        wl = workloads.make(SINGLE, rows, INPUTS)

        def engine(tree: Path, name: str) -> Result:
            env = {"PYTHONPATH": str(tree)}
            return run_turnstile(mock, wl, cap=cap, system=name, uvloop=uvloop, env=env)

        runs: dict[str, Callable[[], Result]] = {THIS: lambda: engine(ROOT, THIS)}
        for name, tree in named.items():
            runs[name] = lambda tree=tree, name=name: engine(tree, name)
        runs[BARE] = lambda: run_bare(mock, wl, cap=cap, uvloop=uvloop, system=BARE)
        interleave(repeats, runs, results)
    for name, done in results.items():
        for result in done:
            if result.rc != 0 or result.rows_out != rows:
                raise RuntimeError(
                    f"{name}: exit {result.rc}, {result.rows_out:,} of {rows:,} rows; "
                    f"{result.extra.get('stderr_tail', '')}"
                )
    bare = results[BARE]
    body = []
    for name, done in results.items():
        rate = ratios(done, bare, "rate_steady")
        cpu = ratios(done, bare, "cpu_us_per_request")
        body.append(
            [
                name,
                spread([r.rate_steady for r in done]),
                spread([r.cpu_us_per_request for r in done]),
                " ".join(f"{r.cpu_us_per_request:.0f}" for r in done),
                "1" if name == BARE else f"{median(rate):.1%}",
                "1" if name == BARE else f"{median(cpu):.2f}x",
            ]
        )
    loop = "uvloop" if uvloop else "asyncio"
    return [
        f"{rows:,} single-turn rows, mock at {latency_ms:g} ms, cap {cap}, {loop}, "
        f"{repeats} interleaved repeats; "
        + "; ".join(f"{name}: {tree}" for name, tree in named.items()),
        "",
        *table(
            [
                "system",
                "steady requests/s",
                "CPU us/request",
                "CPU us/request, each repeat",
                "requests/s / bare",
                "CPU / bare",
            ],
            body,
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.versus", description=__doc__)
    parser.add_argument(
        "--engine",
        type=Path,
        action="append",
        required=True,
        help="another engine/ tree's parent (repeat it for several)",
    )
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--cap", type=int, default=64)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--uvloop", action="store_true", help="every system on uvloop")
    args = parser.parse_args(argv)
    others = engine_trees(parser, args.engine)
    lines = compare(others, args.latency_ms, args.cap, args.rows, args.repeats, args.uvloop)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
