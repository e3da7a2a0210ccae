"""Where a turn's time goes: ``turnstile run`` under py-spy, its samples sorted into parts.

Separate from the suite (it needs ``pip install py-spy``)::

    .venv/bin/python -m bench.profile [--rows 20000] [--cap 64] [--latency-ms 0] [--no-uvloop]
        [--engine DIR] [--bare] [--cache] [--trace-chars N] [--out FILE.json]
        [--samples FILE.txt]

One run of single-turn rows against the mock server (its own process, on uvloop),
sampled by ``py-spy record --nonblocking --threads --format raw`` at 500 Hz. Each
main-thread sample goes to the part of its innermost frame that has one (``PARTS``:
so the pool's work is the pool's though the client called it, and orjson called by
the writer is the writer's), start-up being whatever runs outside the event loop or
imports; the main thread's CPU seconds (from
/proc, sampled until it exits) times each part's share, over the turns, gives
microseconds per turn. The writer's worker threads are reported apart, in CPU
seconds from /proc. ``--engine DIR`` puts DIR first on PYTHONPATH (an ``engine/``
tree of another version, for a before/after table); ``--bare`` profiles the bare
loop (bench/baseline.py) the same way, for the reference's own parts; ``--cache``
runs with the reply cache on (a fresh store: every request looked up, missed, sent
and stored), the case bench section "cache" compares with the cache off;
``--trace-chars N`` has the mock send an N-character reasoning trace with each
reply (``reasoning_content``), as bench section "reasoning" does with 16,384.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson

from bench import workloads
from bench.mockserver import MockProcess
from bench.runners import ROOT, WORK, bare_cmd, turnstile_config
from bench.throughput import INPUTS, LOGS
from bench.workloads import SINGLE

STARTUP = "start-up: imports, config, checkpoint, input fingerprint"
LOOP = "event loop itself (uvloop / asyncio): polling, socket reads, callbacks"
# (part, pattern on a frame "function (file:line)"), matched from the innermost frame out.
PARTS: tuple[tuple[str, str], ...] = (
    ("reply cache (engine/cache/)", r"engine/cache/"),
    ("journal writer, loop side (Writer.*, its thread hops)", r"engine/checkpoint/"),
    ("aiohttp: request, response, connection pool", r"aiohttp/"),
    ("replica pool (engine/http/replicas.py)", r"engine/http/replicas\.py"),
    ("stats (engine/stats.py)", r"engine/stats\.py"),
    ("client: complete, retries, parse (engine/http/client.py)", r"engine/http/client\.py"),
    ("task: rows, dialogue, output row (engine/tasks/)", r"engine/tasks/|engine/input/rows"),
    ("input: read lines, decode JSON (engine/input/)", r"engine/input/"),
    ("row stream (anyio memory objects)", r"anyio/streams/"),
    ("runner: _feed, _work", r"^_feed \(|^_work \("),
    ("the bare loop's own code (bench/baseline.py)", r"^(Loop\.\w+|split_turns) \(bench/baseline"),
)
_PARTS = [(name, re.compile(pattern)) for name, pattern in PARTS]
_STARTUP = re.compile(r"<frozen importlib|^prepare \(")


# Runs the module under test with a clock on the garbage collector: its collections
# happen inside whatever part allocated, so their time is reported on its own as well.
_GC_CLOCK = """
import atexit, gc, runpy, sys, time
spent = [0.0, 0, 0.0]
def clock(phase, info):
    if phase == "start":
        spent[2] = time.perf_counter()
    else:
        spent[0] += time.perf_counter() - spent[2]
        spent[1] += 1
gc.callbacks.append(clock)
atexit.register(lambda: print(f"GC-CLOCK {spent[0]} {spent[1]}", file=sys.stderr))
module, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def _part(frames: list[str]) -> str:
    """The part a sample (frames from the outermost in) belongs to: start-up when it is
    importing, preparing, or outside the run's event loop; else the innermost frame's
    part that has one. (A sample py-spy took mid-change may lack its outer frames: it
    is placed by its inner ones.)"""
    whole = bool(frames) and frames[0].startswith(("<module> (", "_run_module_as_main ("))
    in_loop = any(f.startswith("Runner.run (") for f in frames)
    if (whole and not in_loop) or any(_STARTUP.search(f) for f in frames):
        return STARTUP
    for frame in reversed(frames):
        for name, rx in _PARTS:
            if rx.search(frame):
                return name
    return LOOP


class _ThreadCPU(threading.Thread):
    """Per-thread CPU seconds of a process, read from /proc until it is gone."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.last: dict[str, tuple[str, float]] = {}
        self.done = threading.Event()

    def run(self) -> None:
        ticks = os.sysconf("SC_CLK_TCK")
        while not self.done.is_set():
            try:
                tids = os.listdir(f"/proc/{self.pid}/task")
            except OSError:
                tids = []
            for tid in tids:
                try:
                    stat = Path(f"/proc/{self.pid}/task/{tid}/stat").read_text()
                except OSError:
                    continue
                name = stat[stat.index("(") + 1 : stat.rindex(")")]
                fields = stat.rsplit(")", 1)[1].split()
                self.last[tid] = (name, (int(fields[11]) + int(fields[12])) / ticks)
            time.sleep(0.02)


def profile(
    rows: int,
    cap: int,
    latency_ms: float,
    uvloop: bool,
    engine: Path | None,
    bare: bool = False,
    keep: Path | None = None,
    cache: bool = False,
    trace_chars: int = 0,
) -> dict[str, Any]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        raise SystemExit("py-spy is not installed: .venv/bin/pip install py-spy")
    wl = workloads.make(SINGLE, rows, INPUTS)
    env = dict(os.environ)
    if engine is not None:
        env["PYTHONPATH"] = str(engine)
    traced: dict[str, Any] = (
        {"reasoning": "reasoning_content", "reasoning_chars": trace_chars} if trace_chars else {}
    )
    with (
        MockProcess(latency_ms, LOGS, uvloop=True, **traced) as mock,
        tempfile.TemporaryDirectory(dir=WORK) as tmp,
    ):
        folder = Path(tmp)
        config = turnstile_config(folder, mock.url, wl, cap=cap, uvloop=uvloop)
        if cache:
            raw_config = orjson.loads(config.read_bytes())
            raw_config["cache"] = {"dir": str(folder / "store")}
            config.write_bytes(orjson.dumps(raw_config))
        if bare:
            env["PYTHONPATH"] = str(ROOT)
            system = bare_cmd(mock.url, wl, folder / "out.jsonl", cap, uvloop=uvloop)[2:]
            if trace_chars:
                system.append("--reasoning")
        else:
            system = ["engine", "run", str(config), "--quiet"]
        raw = folder / "samples.txt"
        cmd = [spy, "record", "-r", "500", "--nonblocking", "--threads", "--format", "raw"]
        cmd += ["-o", str(raw)]
        cmd += ["--", sys.executable, "-c", _GC_CLOCK, *system]
        mock.reset()
        started = time.monotonic()
        proc = subprocess.Popen(
            cmd, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        child = _child_pid(proc.pid)
        threads = _ThreadCPU(child) if child else None
        if threads is not None:
            threads.start()
        _, err = proc.communicate()
        wall = time.monotonic() - started
        if threads is not None:
            threads.done.set()
            threads.join()
        if proc.returncode != 0:
            raise SystemExit(f"py-spy run failed ({proc.returncode}): {err.decode()[-2000:]}")
        stats = mock.stats()
        samples = raw.read_text()
        if keep is not None:
            keep.write_text(samples)
    parts: Counter[str] = Counter()
    main = 0
    lines = [line.rpartition(" ") for line in samples.splitlines() if line.startswith("thread (")]
    # The main thread's id: the one py-spy names MainThread (some samples carry no name).
    main_tid = next(
        (s.split(")", 1)[0] for s, _, _ in lines if "MainThread" in s.split(";")[0]), ""
    )
    for stack, _, count in lines:
        frames = stack.split(";")
        if frames[0].split(")", 1)[0] != main_tid:
            continue  # a worker thread: its CPU is read from /proc below
        main += int(count)
        parts[_part(frames[1:])] += int(count)
    gc_s, collections = 0.0, 0
    for line in err.decode(errors="replace").splitlines():
        if line.startswith("GC-CLOCK "):
            gc_s, collections = float(line.split()[1]), int(line.split()[2])
    cpu = dict(threads.last.values()) if threads is not None else {}
    by_thread = sorted((threads.last.values() if threads else []), key=lambda t: -t[1])
    main_cpu = by_thread[0][1] if by_thread else 0.0
    others = sum(c for _, c in by_thread[1:])
    window = (stats.get("last_done") or 0) - (stats.get("first_arrival") or 0)
    return {
        "rows": rows,
        "cap": cap,
        "latency_ms": latency_ms,
        "uvloop": uvloop,
        "system": "bare loop (bench/baseline.py)" if bare else "turnstile run",
        "engine": str(engine) if engine else "this tree",
        "cache": cache,
        "trace_chars": trace_chars,
        "wall_s": wall,
        "served": stats.get("completed", 0),
        "steady_rate": stats.get("completed", 0) / window if window > 0 else None,
        "main_thread_cpu_s": main_cpu,
        "other_threads_cpu_s": others,
        "threads": cpu,
        "samples": main,
        "gc_s": gc_s,
        "gc_collections": collections,
        "gc_us_per_turn": 1e6 * gc_s / rows,
        "parts_us_per_turn": {
            name: 1e6 * main_cpu * n / main / rows for name, n in parts.most_common()
        }
        if main
        else {},
    }


def _child_pid(spy_pid: int, timeout_s: float = 5.0) -> int | None:
    """The Python process py-spy started (its only child)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            children = Path(f"/proc/{spy_pid}/task/{spy_pid}/children").read_text().split()
        except OSError:
            children = []
        if children:
            return int(children[0])
        time.sleep(0.005)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--cap", type=int, default=64)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--no-uvloop", action="store_true", help="run Turnstile on asyncio")
    parser.add_argument("--engine", type=Path, default=None, help="another engine/ tree's parent")
    parser.add_argument("--bare", action="store_true", help="profile bench/baseline.py instead")
    parser.add_argument("--cache", action="store_true", help="the reply cache on, a fresh store")
    parser.add_argument(
        "--trace-chars", type=int, default=0, help="a reasoning trace of N characters a reply"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON")
    parser.add_argument(
        "--samples", type=Path, default=None, help="keep py-spy's raw samples (flamegraph input)"
    )
    args = parser.parse_args(argv)
    result = profile(
        args.rows,
        args.cap,
        args.latency_ms,
        not args.no_uvloop,
        args.engine,
        args.bare,
        args.samples,
        args.cache,
        args.trace_chars,
    )
    if args.out is not None:
        args.out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    print(
        f"{result['system']}: {result['rows']:,} single-turn rows, cap {result['cap']}, "
        f"{result['latency_ms']:g} ms, "
        f"uvloop {result['uvloop']}, engine {result['engine']}, cache {result['cache']}, "
        f"trace {result['trace_chars']} chars: steady "
        f"{result['steady_rate'] or 0:,.0f}/s under py-spy; main thread "
        f"{result['main_thread_cpu_s']:.2f} s CPU, other threads "
        f"{result['other_threads_cpu_s']:.2f} s"
    )
    total = 0.0
    for name, us in result["parts_us_per_turn"].items():
        total += us
        print(f"  {us:6.1f} us/turn  {name}")
    print(f"  {total:6.1f} us/turn  main thread in all")
    print(
        f"  {result['gc_us_per_turn']:6.1f} us/turn  of which garbage collection "
        f"({result['gc_collections']} collections, {result['gc_s']:.2f} s), inside the parts"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
