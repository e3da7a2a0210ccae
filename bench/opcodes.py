"""The Python a turn runs, counted: bytecode instructions and calls by function (not in
the suite).

Timings on this VM move by 10-30% from one phase to the next, and a change of a
microsecond a turn hides in that. A count does not move: every bytecode instruction
a run executes (``sys.settrace`` with ``f_trace_opcodes``, in every thread) and every
call, by function, so one engine's Python per turn against another's is exact, and the
functions where they differ are named::

    git archive 83ae0c3 engine | tar -x -C /tmp/before
    .venv/bin/python -m bench.opcodes [--engine /tmp/before ...] [--rows 1000] [--cap 64]
        [--latency-ms 0] [--cache] [--top 30]

Each engine (this one, then each ``--engine DIR``, the parent of another ``engine/``
tree, first on PYTHONPATH) runs ``turnstile run`` (asyncio's loop, so the loop's own
Python counts too) twice against the mock (at 0 ms, or ``--latency-ms``): ``--rows``
single-turn rows, then twice as many; the difference over ``--rows`` is a turn's,
start-up and shutdown cancelled out. Not counted: what C does (orjson, aiohttp's parser, SQLite, the
kernel), which is the same for the same calls. Tracing slows the client about tenfold,
so the writer groups more rows a write than at full speed: compare engines counted
the same way, not a count with a timing. A *call* counts every entry of a frame,
a coroutine's resumptions included (each one a pass through the frames above it).
``--cache`` turns the reply cache on (a fresh store: every request a miss, then stored).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

import orjson

from bench import workloads
from bench._counting import Counts
from bench.mockserver import MockProcess
from bench.report import table
from bench.runners import ROOT, engine_trees, turnstile_config
from bench.throughput import INPUTS, LOGS
from bench.workloads import SINGLE

THIS, OTHER = "this engine", "other engine"
_CHILD = Path(__file__).with_name("_counting.py")  # run as a script: see its docstring


def _run(tree: Path, url: str, rows: int, cap: int, cache: bool, folder: Path) -> Counts:
    wl = workloads.make(SINGLE, rows, INPUTS)
    config = turnstile_config(folder, url, wl, cap=cap, uvloop=False)
    if cache:
        raw = orjson.loads(config.read_bytes())
        raw["cache"] = {"dir": str(folder / "store")}
        config.write_bytes(orjson.dumps(raw))
    dump = folder / "counts.json"
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(
        [sys.executable, str(_CHILD), str(dump), str(config)],
        cwd=folder,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{tree}: the counted run failed: {done.stderr[-2000:]}")
    counts: Counts = orjson.loads(dump.read_bytes())
    return counts


def per_turn(small: Counts, big: Counts, rows: int) -> dict[str, tuple[float, float]]:
    """What one turn more costs, function by function: (big - small) / rows."""
    out = {}
    for name in small.keys() | big.keys():
        a, b = small.get(name, [0, 0]), big.get(name, [0, 0])
        out[name] = ((b[0] - a[0]) / rows, (b[1] - a[1]) / rows)
    return out


def _sum(turn: dict[str, tuple[float, float]], names: Iterable[str]) -> tuple[float, float]:
    picked = [turn[name] for name in names]
    return sum(i for i, _ in picked), sum(c for _, c in picked)


def compare(
    others: list[Path], rows: int, cap: int, cache: bool, top: int, latency_ms: float = 0
) -> list[str]:
    """The comparison's tables (markdown lines)."""
    named = {THIS: ROOT}
    for i, tree in enumerate(others):
        named[OTHER if len(others) == 1 else f"{OTHER} {i + 1}"] = tree
    turns: dict[str, dict[str, tuple[float, float]]] = {}
    with MockProcess(latency_ms, LOGS, uvloop=True) as mock, tempfile.TemporaryDirectory() as tmp:
        for name, tree in named.items():
            runs = []
            for size in (rows, 2 * rows):
                folder = Path(tmp) / f"{len(turns)}-{size}"
                folder.mkdir()
                runs.append(_run(tree, mock.url, size, cap, cache, folder))
            turns[name] = per_turn(runs[0], runs[1], rows)
    lines = [
        f"Python per turn, counted: {rows:,} then {2 * rows:,} single-turn rows (the "
        f"difference), mock at {latency_ms:g} ms, cap {cap}, asyncio, "
        f"cache {'on' if cache else 'off'}; "
        + "; ".join(f"{name}: {tree}" for name, tree in named.items()),
        "",
    ]
    body = []
    for name, turn in turns.items():
        ops, calls = _sum(turn, [n for n in turn if n.startswith("engine/")])
        all_ops, all_calls = _sum(turn, turn)
        body.append([name, f"{ops:,.0f}", f"{calls:.1f}", f"{all_ops:,.0f}", f"{all_calls:.1f}"])
    header = ["engine", "engine/ instructions", "engine/ calls", "all instructions", "all calls"]
    lines += table(header, body)
    first = turns[THIS]
    for name, turn in turns.items():
        if name == THIS:
            continue
        lines += ["", f"Where {THIS} and {name} differ most (per turn):", ""]
        names = sorted(first.keys() | turn.keys(), key=lambda n: -abs(_gap(first, turn, n)))
        listed = []
        for fn in names[:top]:
            mine, theirs = first.get(fn, (0.0, 0.0)), turn.get(fn, (0.0, 0.0))
            listed.append(
                [fn, f"{mine[0]:.1f}", f"{theirs[0]:.1f}", f"{mine[1]:.1f}", f"{theirs[1]:.1f}"]
            )
        lines += table(["function", THIS, name, "calls, " + THIS, "calls, " + name], listed)
    if len(turns) == 1:
        lines += ["", f"Most instructions per turn in {THIS}:", ""]
        names = sorted(first, key=lambda n: -first[n][0])
        listed = [[fn, f"{first[fn][0]:.1f}", f"{first[fn][1]:.1f}"] for fn in names[:top]]
        lines += table(["function", "instructions", "calls"], listed)
    return lines


def _gap(a: dict[str, tuple[float, float]], b: dict[str, tuple[float, float]], name: str) -> float:
    return a.get(name, (0.0, 0.0))[0] - b.get(name, (0.0, 0.0))[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.opcodes", description=__doc__)
    parser.add_argument("--engine", type=Path, action="append", default=[])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--cap", type=int, default=64)
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=0,
        help="the mock's latency (50 at cap 16: a turn's cost where each row is written alone)",
    )
    parser.add_argument("--cache", action="store_true", help="the reply cache on (no hits)")
    parser.add_argument("--top", type=int, default=30, help="functions listed")
    args = parser.parse_args(argv)
    others = engine_trees(parser, args.engine)
    lines = compare(others, args.rows, args.cap, args.cache, args.top, args.latency_ms)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
