"""``python -m bench [--quick] [--only NAME[,NAME]] [--out PATH]``: the benchmark suite.

Experiments, in the order a full run does them: overhead, durability, latency, peers,
real, memory, resume (memory and resume share the biggest run), replicas, caps (four
systems side by side across caps, with memory against input size). Results go to
``--out`` (a Markdown file) with PNG plots beside it; the raw numbers to
``bench/_work/results.json``.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson

from bench import report
from bench.plan import FULL, QUICK, Plan
from bench.report import Section
from bench.runners import ROOT, WORK

NAMES = (
    "overhead",
    "durability",
    "latency",
    "peers",
    "real",
    "memory",
    "resume",
    "replicas",
    "caps",
    "shards",
    "metrics",
    "reasoning",
    "startup",
    "simulate",
    "batch",
    "judging",
    "cache",
)
DEFAULT_OUT = ROOT / "bench" / "RESULTS.md"
QUICK_OUT = WORK / "quick" / "RESULTS.md"


def _suites(plan: Plan, chosen: set[str]) -> list[Callable[[], list[Section]]]:
    from bench import (
        batch,
        cache,
        caps,
        judging,
        memory,
        metrics_cost,
        peers,
        realmodel,
        reasoning,
        replicas,
        shards,
        simulate,
        startup,
        throughput,
    )

    suites: list[Callable[[], list[Section]]] = []
    if "overhead" in chosen:
        suites.append(lambda: [throughput.overhead(plan)])
    if "durability" in chosen:
        suites.append(lambda: [throughput.durability(plan)])
    if "latency" in chosen:
        suites.append(lambda: [throughput.latency(plan)])
    if "peers" in chosen:
        suites.append(lambda: [peers.peers(plan)])
    if "real" in chosen:
        suites.append(lambda: [realmodel.real_model(plan)])
    if chosen & {"memory", "resume"}:
        suites.append(
            lambda: memory.memory_and_resume(
                plan, memory="memory" in chosen, resume="resume" in chosen
            )
        )
    if "replicas" in chosen:
        suites.append(lambda: [replicas.replicas(plan)])
    if "caps" in chosen:
        suites.append(lambda: caps.caps(plan))
    if "shards" in chosen:
        suites.append(lambda: [shards.shards(plan)])
    if "metrics" in chosen:
        suites.append(lambda: [metrics_cost.metrics_cost(plan)])
    if "reasoning" in chosen:
        suites.append(lambda: [reasoning.reasoning(plan)])
    if "startup" in chosen:
        suites.append(lambda: [startup.startup(plan)])
    if "simulate" in chosen:
        suites.append(lambda: [simulate.simulate(plan)])
    if "batch" in chosen:
        suites.append(lambda: [batch.batch(plan)])
    if "judging" in chosen:
        suites.append(lambda: [judging.judging(plan)])
    if "cache" in chosen:
        suites.append(lambda: [cache.cache(plan)])
    return suites


def _notes(plan: Plan, command: str, elapsed_s: float) -> list[str]:
    py = ".venv/bin/python"
    return [
        "",
        "## How it was measured",
        "",
        f"- This run: `{command}` ({'quick smoke run' if plan.quick else 'full run'}), "
        f"{elapsed_s / 60:.1f} minutes.",
        "- Mock server: `python -m bench.mockserver --latency-ms L`, i.e. "
        "`engine.testing.mock_server.MockServer` in a process of its own (so its CPU is never "
        "billed to a client), plus a clock of the first request's arrival and the last "
        "reply, which gives every system a *steady* rate measured the same way, start-up "
        "and shutdown excluded.",
        f"- Turnstile: `{py} -m engine run run.yaml --quiet` with a fresh checkpoint per run; "
        "config `task: distill`, one model with `max_concurrency: CAP`, "
        "`params: {temperature: 0.0}`, default journal (`fsync: interval`) unless stated.",
        f"- Bare loop: `{py} -m bench.baseline --url URL --input IN --output OUT --cap CAP` "
        "(bench/baseline.py: one aiohttp `ClientSession`, `asyncio.Semaphore(CAP)`, "
        "2 x CAP rows in flight, orjson, the same multi-turn logic and output rows; no "
        "journal, no retries, no resume; with `--retry-429`, as in section 8, a 429 is "
        "sent again after its Retry-After).",
        "- Distilabel: `bench/_work/venv-distilabel/bin/python bench/distilabel_job.py "
        "--url URL --input IN --output OUT --cap CAP --mode single|multi --cache-dir DIR`; "
        "Curator: `bench/_work/venv-curator/bin/python bench/curator_job.py --url URL "
        "--input IN --output OUT --cap CAP` with the environment given in section 6.",
        "- Client CPU seconds come from `os.wait4` on the client process (children it "
        "reaped included); *CPU ms / 1k turns* is client CPU per 1,000 turns. Peak RSS is "
        "the client's `VmHWM` (/proc/PID/status; `ru_maxrss` would include the benchmark's "
        "own RSS, which Linux carries into a child at fork), or for the peers, which run "
        "several processes, the largest sampled sum over the process tree. "
        "Other processes' CPU is /proc/stat's busy time minus the client's and the mock "
        "server's: this machine is shared, and a high figure there means noisier numbers.",
        "- Inputs: bench/workloads.py, deterministic; single-turn rows are one 20-40 word "
        "prompt, multi-turn rows have 1-6 user turns (3.5 on average) whose assistant "
        "messages are rewritten, each request resending the whole history. User and "
        "assistant messages alternate, so every user message gets a reply under either "
        "turn rule (`distill.turns: every_user`, the default, or `as_in_input`).",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a ~2-minute smoke run")
    parser.add_argument(
        "--only", default="", help=f"comma-separated experiments: {', '.join(NAMES)}"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"Markdown report (default {DEFAULT_OUT.relative_to(ROOT)}; "
        f"with --quick {QUICK_OUT.relative_to(ROOT)})",
    )
    parser.add_argument(
        "--render",
        action="store_true",
        help="measure nothing: write the report again from bench/_work/results.json "
        "(the caps experiment only)",
    )
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the mock servers and the run in progress are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    chosen = {n.strip() for n in args.only.split(",") if n.strip()} or set(NAMES)
    unknown = chosen - set(NAMES)
    if unknown:
        parser.error(f"unknown experiment(s) {', '.join(sorted(unknown))}; choose from {NAMES}")
    plan = QUICK if args.quick else FULL
    if args.quick and not args.only:
        chosen = set(NAMES) if _peers_ready() else set(NAMES) - {"peers"}
    out: Path = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "-m", "bench", *(argv if argv is not None else sys.argv[1:])])
    started = time.monotonic()
    sections: list[Section] = []
    if args.render:
        from bench import caps

        if chosen != {"caps"}:
            parser.error("--render re-renders the caps experiment only: add --only caps")
        stored = orjson.loads((WORK / "results.json").read_bytes())
        sections = caps.render(plan, stored)
        _write(sections, plan, command, time.monotonic() - started, out)
        print(f"[bench] wrote {out} from {WORK / 'results.json'}", file=sys.stderr)
        return 0
    for suite in _suites(plan, chosen):
        sections += suite()
        _write(sections, plan, command, time.monotonic() - started, out)  # keep partial results
    if args.quick and not args.only and "peers" not in chosen:
        sections.append(
            Section(
                "peers",
                "6. Peers",
                ["Not run this time (`--quick` runs peers only when their venv exists)."],
            )
        )
        _write(sections, plan, command, time.monotonic() - started, out)
    print(f"[bench] wrote {out}", file=sys.stderr)
    return 0


def _peers_ready() -> bool:
    from bench import peers

    return any(peer.version() is not None for peer in peers.PEERS)


def _write(sections: list[Section], plan: Plan, command: str, elapsed: float, out: Path) -> None:
    notes = _notes(plan, command, elapsed)
    data = {s.key: s.data for s in sections}
    (WORK / "results.json").write_bytes(
        orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
    )
    plots = []
    latency = data.get("latency", {})
    peers = data.get("peers", {})
    if report.plot_caps(latency, peers, out.parent / "turns_vs_cap.png"):
        plots.append("![turns/s against cap](turns_vs_cap.png)")
    if report.plot_memory(data.get("memory", {}), out.parent / "rss_vs_rows.png"):
        plots.append("![peak RSS against input size](rss_vs_rows.png)")
    # Linked from its own section (replicas), not from the list below.
    report.plot_outage(data.get("replicas", {}).get("outage", {}), out.parent / "outage.png")
    if report.plot_systems(data.get("caps", {}), out.parent / "caps.png"):
        plots.append("![requests/s and CPU per request against cap, four systems](caps.png)")
    if report.plot_memory(data.get("caps_memory", {}), out.parent / "caps_rss_vs_rows.png"):
        plots.append("![peak RSS against input size, the caps run](caps_rss_vs_rows.png)")
    if plots:
        notes += ["", "## Plots", "", *plots]
    out.write_text(report.render(sections, report.machine(), command, notes))


if __name__ == "__main__":
    raise SystemExit(main())
