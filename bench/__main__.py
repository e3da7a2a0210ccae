"""``python -m bench [--quick] [--big] [--only NAME[,NAME]] [--out PATH] [--plan]``: the
benchmark suite.

A full run (no ``--only``) runs every suite below once, in this order, and writes the
whole report: ``--out`` (default bench/RESULTS.md, a Markdown file) with PNG plots beside
it, the raw numbers in ``bench/_work/results.json``. Nothing from an earlier run is kept:
the file says which commit, machine and command produced it, how long each suite took,
and which suites it left out and how to run them. The report is written again after
every suite, so an interrupted run leaves what it measured. ``--plan`` prints each
suite's estimated time and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from bench import report
from bench.plan import BIG_ROWS, FULL, QUICK, Plan, estimate_s, with_big
from bench.report import Section, Target
from bench.runners import ROOT, WORK


@dataclass(frozen=True, slots=True)
class Suite:
    """One ``--only`` name (two for memory and resume, which share their runs): the
    function ``bench.<module>.<function>(plan)`` that measures it and returns its
    section(s); ``run`` instead where it needs more than the plan."""

    names: tuple[str, ...]
    module: str
    function: str = ""
    run: Callable[[Plan, set[str]], list[Section]] | None = None

    @property
    def name(self) -> str:
        return ",".join(self.names)

    def measure(self, plan: Plan, chosen: set[str]) -> list[Section]:
        if self.run is not None:
            return self.run(plan, chosen)
        made = getattr(importlib.import_module(f"bench.{self.module}"), self.function)(plan)
        return made if isinstance(made, list) else [made]


def _memory(plan: Plan, chosen: set[str]) -> list[Section]:
    from bench import memory

    return memory.memory_and_resume(plan, memory="memory" in chosen, resume="resume" in chosen)


# report_write.py and chaos.py have command lines of their own and no section function;
# until they grow one, their suites are these two wrappers.
def _report_write(plan: Plan, _: set[str]) -> list[Section]:
    """bench/report_write.py in a process of its own, so the plotting modules this
    process imported for its PNGs do not count against the report."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.report_write",
            "--json",
            "--repeats",
            str(plan.report_repeats),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    section = Section("report", "The report: writing report.html at a run's end")
    if done.returncode != 0:
        section.lines.append(f"Failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
        return [section]
    found = orjson.loads(done.stdout.strip().splitlines()[-1])
    plotting = found["plotting_imported"]
    section.lines += [
        "`engine.report.write_report` on a day-long run's history as engine.history writes "
        f"it ({found['history_lines']:,} lines, {found['history_bytes'] / 1e6:.1f} MB: a line a "
        "second for 10,000 lines, then one every 10 s; a teacher on two replicas, one out for "
        "10 minutes, a restart after 16 hours), the whole write as a run's end calls it (read "
        "the file, decode the lines the page draws, the page with its JSON and inlined uPlot, "
        f"fsync and rename), in a process with the engine's modules imported; {found['repeats']} "
        "repeats after one warm-up. CPU is the thread's own time, which other load on the "
        "machine does not inflate. `python -m bench.report_write`.",
        "",
        *report.table(
            ["measure", "value"],
            [
                [
                    "wall, median (range)",
                    f"{found['median_ms']:.1f} ms ({found['min_ms']:.1f}-{found['max_ms']:.1f})",
                ],
                ["CPU, median", f"{found['cpu_median_ms']:.1f} ms"],
                ["report.html", f"{found['report_bytes'] / 1e3:.0f} kB"],
                ["plotting modules imported", ", ".join(plotting) or "none"],
                ["load average", f"{found['load_average']:.1f} on {found['cores']} cores"],
            ],
        ),
    ]
    section.targets += [
        Target(
            "report of a day's history: write_report at a run's end",
            "< 50 ms",
            f"{found['median_ms']:.1f} ms (CPU {found['cpu_median_ms']:.1f} ms)",
            found["median_ms"] < 50,
        ),
        Target(
            "report of a day's history: no plotting library imported",
            "none",
            ", ".join(plotting) or "none",
            not plotting,
        ),
    ]
    section.data = found
    return [section]


def _chaos(plan: Plan, _: set[str]) -> list[Section]:
    from bench import chaos

    with tempfile.TemporaryDirectory(prefix="turnstile-chaos-", dir=WORK) as tmp:
        found = asyncio.run(
            chaos.chaos(Path(tmp), turns=plan.chaos_turns, kills=plan.chaos_kills, seed=1)
        )
    command = (
        f"python -m bench.chaos --turns {plan.chaos_turns} --kills {plan.chaos_kills} --seed 1"
    )
    text = chaos.markdown(found, command).splitlines()
    body = text[1:]  # under the suite's own heading
    while body and (not body[0].strip() or body[0].startswith("#")):
        body.pop(0)
    section = Section("chaos", "Chaos: faults and repeated SIGKILLs", body)
    section.targets.append(
        Target(
            "chaos: output after faults and SIGKILLs equals a fault-free run's",
            "every row, none lost or duplicated",
            f"lost {found.lost}, duplicated {found.duplicated}, different {found.mismatched}",
            found.exact,
        )
    )
    section.data = {k: getattr(found, k) for k in found.__dataclass_fields__}
    return [section]


# The order of a full run and of the report's sections: the suites with targets first
# (the open issues' before the met ones), the peers and the real model (reported, no
# targets; the peers may need installing) last, so that a run short of time
# (--budget-min) leaves out what matters least.
SUITES = (
    # The open issues' targets first: the hot path against the bare loop, reasoning
    # traces, the reply cache, the Batch API, start-up and the report.
    Suite(("caps",), "caps", "caps"),
    Suite(("reasoning",), "reasoning", "reasoning"),
    Suite(("cache",), "cache", "cache"),
    Suite(("batch",), "batch", "batch"),
    Suite(("startup",), "startup", "startup"),
    Suite(("report",), "report_write", run=_report_write),
    Suite(("memory", "resume"), "memory", run=_memory),
    Suite(("overhead",), "throughput", "overhead"),
    Suite(("latency",), "throughput", "latency"),
    Suite(("durability",), "throughput", "durability"),
    Suite(("metrics",), "metrics_cost", "metrics_cost"),
    Suite(("checksums",), "crc_cost", "crc_cost"),
    Suite(("shards",), "shards", "shards"),
    Suite(("simulate",), "simulate", "simulate"),
    Suite(("judging",), "judging", "judging"),
    Suite(("chaos",), "chaos", run=_chaos),
    Suite(("replicas",), "replicas", "replicas"),
    Suite(("real",), "realmodel", "real_model"),
    Suite(("peers",), "peers", "peers"),
)
NAMES = tuple(n for suite in SUITES for n in suite.names)
DEFAULT_OUT = ROOT / "bench" / "RESULTS.md"
QUICK_OUT = WORK / "quick" / "RESULTS.md"
PY = ".venv/bin/python"
BUDGET_MIN = 40.0  # a full run skips, and lists, what would take it past this


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


PEER_INSTALL_S = 240.0  # a full run installs the peers' venvs when missing (pip, network)


def _estimate(plan: Plan, suite: Suite) -> float:
    seconds = estimate_s(plan, suite.names[0])
    if "peers" in suite.names and plan.install_peers:
        from bench import peers

        seconds += sum(PEER_INSTALL_S / 2 for p in peers.PEERS if p.version() is None)
    return seconds


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


@dataclass(slots=True)
class Run:
    """What the header says about this run, kept up to date as suites finish."""

    plan: Plan
    command: str
    chosen: set[str]
    started: dt.datetime
    git: dict[str, str]
    big: bool
    took: dict[str, float] = field(default_factory=dict)  # suite name -> seconds
    failed: dict[str, str] = field(default_factory=dict)  # suite name -> why
    first_section: dict[str, int] = field(default_factory=dict)  # suite -> its first section
    skipped_why: dict[str, str] = field(default_factory=dict)  # chosen, but not run
    estimates: dict[str, float] = field(default_factory=dict)  # suite name -> seconds
    state: str = "running"
    end_git: dict[str, str] | None = None  # git_state() again once the run is over

    def suites(self) -> list[Suite]:
        return [s for s in SUITES if self.chosen & set(s.names)]


def _skip_reasons(plan: Plan, chosen: set[str], only: bool) -> dict[str, str]:
    """Suites left out of this run and why (``--quick`` without peer venvs)."""
    if plan.quick and not only and "peers" in chosen:
        from bench import peers

        if all(peer.version() is None for peer in peers.PEERS):
            return {"peers": "their venvs are not installed, and --quick installs nothing"}
    return {}


def _head(run: Run) -> list[str]:
    now = dt.datetime.now(dt.UTC)
    elapsed = (now - run.started).total_seconds()
    info = report.machine()
    kind = "quick smoke run (`--quick`: small sizes, few repeats)" if run.plan.quick else "full run"
    env = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("BENCH_"))
    rows = [
        ["command", f"`{run.command}`" + (f" with `{env}`" if env else "")],
        [
            "kind",
            kind + (f"; memory and resume up to {BIG_ROWS:,} rows (`--big`)" if run.big else ""),
        ],
        ["state", run.state],
        ["started", run.started.strftime("%Y-%m-%d %H:%M:%S UTC")],
        ["written", now.strftime("%Y-%m-%d %H:%M:%S UTC")],
        ["duration", f"{_minutes(elapsed)} ({elapsed:,.0f} s)"],
        ["commit", f"`{run.git['commit']}`"],
        ["tree at the start", run.git["tree"]],
    ]
    if run.end_git and run.end_git.get("digest") != run.git.get("digest"):
        rows.append(["tree at the end", "**changed during the run**: " + run.end_git["tree"]])
    rows += [[k, v] for k, v in info.items()]
    lines = [
        "Generated whole by one run of the command below, at one commit; nothing in it comes "
        "from an earlier run. Every figure was measured in this run side by side with its "
        "reference (runs interleaved, several repeats): figures are medians with the range "
        "(min-max) over repeats, ratios taken per repeat. Ratios are what to read: absolute "
        "rates belong to this machine. Sections are numbered in the order the run made them.",
        "",
        "## This run",
        "",
        *report.table(["", ""], rows),
        "",
        "**Suites** (`--only` names; estimates are `python -m bench --plan`'s, for a quiet "
        "2-core machine):",
        "",
    ]
    suite_rows = []
    for suite in run.suites():
        name = suite.name
        if name in run.took:
            took = f"{run.took[name]:,.0f} s"
            status = f"**failed**: {run.failed[name]}" if name in run.failed else "ok"
        elif name in run.skipped_why:
            took, status = "-", f"skipped: {run.skipped_why[name]}"
        else:
            took, status = "-", "not reached" if run.state != "running" else "to come"
        first = run.first_section.get(name)
        suite_rows.append(
            [
                f"`{name}`",
                f"bench/{suite.module}.py",
                str(first) if first else "-",
                f"{run.estimates.get(name, _estimate(run.plan, suite)):,.0f} s",
                took,
                status,
            ]
        )
    total = sum(run.estimates.values()) or sum(_estimate(run.plan, s) for s in run.suites())
    suite_rows.append(
        ["all", "", "", f"{total:,.0f} s", f"{sum(run.took.values()):,.0f} s", run.state]
    )
    lines += report.table(["suite", "module", "section", "estimate", "took", "status"], suite_rows)
    lines += ["", *_not_run(run)]
    return lines


def _not_run(run: Run) -> list[str]:
    """What this run left out, each with the command that measures it."""
    items = []
    out = "--out bench/_work/NAME.md"
    for suite in SUITES:
        if suite.name in run.skipped_why:
            missing = [n for n in suite.names if n in run.chosen]
            why = run.skipped_why[suite.name]
        else:
            missing = [n for n in suite.names if n not in run.chosen]
            why = "not chosen (`--only`)"
        if not missing:
            continue
        name = ",".join(missing)
        items.append(
            f"- `{name}` ({why}; about {_minutes(estimate_s(FULL, suite.names[0]))} at full "
            f"size): `{PY} -m bench --only {name} {out.replace('NAME', suite.names[0])}`"
        )
    if not run.big and run.chosen & {"memory", "resume"}:
        big = estimate_s(with_big(run.plan), "memory") - estimate_s(run.plan, "memory")
        items.append(
            f"- memory and resume at {BIG_ROWS:,} rows (about {_minutes(big)} more): "
            f"`{PY} -m bench --only memory,resume --big --out bench/_work/big.md`"
        )
    items += [
        "- not part of the suite: per-turn profiles, `python -m bench.profile` (needs py-spy; "
        "bench/README.md)."
    ]
    return ["**Not in this run:**", "", *items]


def _notes(run: Run, sections: list[Section]) -> list[str]:
    numbers = {s.key: i for i, s in enumerate(sections, 1)}
    peers = f"section {numbers['peers']}" if "peers" in numbers else "the peers section"
    replicas = f"section {numbers['replicas']}" if "replicas" in numbers else "the replicas section"
    return [
        "",
        "## How it was measured",
        "",
        "- Each section above says what it measured and how; the suite that made it, its "
        "module and its time are in the table under *This run*.",
        "- Mock server: `python -m bench.mockserver --latency-ms L`, i.e. "
        "`engine.testing.mock_server.MockServer` in a process of its own (so its CPU is never "
        "billed to a client), plus a clock of the first request's arrival and the last "
        "reply, which gives every system a *steady* rate measured the same way, start-up "
        "and shutdown excluded.",
        f"- Turnstile: `{PY} -m engine run run.yaml --quiet` with a fresh checkpoint per run; "
        "config `task: distill`, one model with `max_concurrency: CAP`, "
        "`params: {temperature: 0.0}`, default journal (`fsync: interval`) unless stated.",
        f"- Bare loop: `{PY} -m bench.baseline --url URL --input IN --output OUT --cap CAP` "
        "(bench/baseline.py: one aiohttp `ClientSession`, `asyncio.Semaphore(CAP)`, "
        "2 x CAP rows in flight, orjson, the same multi-turn logic and output rows; no "
        f"journal, no retries, no resume; with `--retry-429`, as in {replicas}, a 429 is "
        "sent again after its Retry-After).",
        "- Distilabel: `bench/_work/venv-distilabel/bin/python bench/distilabel_job.py "
        "--url URL --input IN --output OUT --cap CAP --mode single|multi --cache-dir DIR`; "
        "Curator: `bench/_work/venv-curator/bin/python bench/curator_job.py --url URL "
        f"--input IN --output OUT --cap CAP` with the environment given in {peers}.",
        "- Client CPU seconds come from `os.wait4` on the client process (children it "
        "reaped included); *CPU ms / 1k turns* is client CPU per 1,000 turns. Peak RSS is "
        "the client's `VmHWM` (/proc/PID/status; `ru_maxrss` would include the benchmark's "
        "own RSS, which Linux carries into a child at fork), or for the peers, which run "
        "several processes, the largest sampled sum over the process tree. "
        "Other processes' CPU is /proc/stat's busy time minus the client's and the mock "
        "server's: a high figure there means noisier numbers.",
        "- Inputs: bench/workloads.py, deterministic; single-turn rows are one 20-40 word "
        "prompt, multi-turn rows have 1-6 user turns (3.5 on average) whose assistant "
        "messages are rewritten, each request resending the whole history. User and "
        "assistant messages alternate, so every user message gets a reply under either "
        "turn rule (`distill.turns: every_user`, the default, or `as_in_input`).",
    ]


def _plan_text(plan: Plan, chosen: set[str]) -> list[str]:
    suites = [s for s in SUITES if chosen & set(s.names)]
    width = max(len(s.name) for s in suites)
    lines = [f"  {s.name:<{width}}  ~{_estimate(plan, s):5.0f} s" for s in suites]
    total = sum(_estimate(plan, s) for s in suites)
    return [*lines, f"  {'total':<{width}}  ~{total:5.0f} s ({_minutes(total)})"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few minutes")
    parser.add_argument("--only", default="", help=f"comma-separated suites: {', '.join(NAMES)}")
    parser.add_argument(
        "--big",
        action="store_true",
        help=f"also run memory and resume at {BIG_ROWS:,} rows (about 20 minutes more)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"Markdown report (default {DEFAULT_OUT.relative_to(ROOT)}; "
        f"with --quick {QUICK_OUT.relative_to(ROOT)})",
    )
    parser.add_argument(
        "--plan", action="store_true", help="print each chosen suite's estimated time and exit"
    )
    parser.add_argument(
        "--budget-min",
        type=float,
        default=None,
        help=f"skip (and list, with the command for each) the suites that would end the run "
        f"past this many minutes, going by their estimates (default {BUDGET_MIN:g} for a full "
        "run, none with --only or --quick; 0: none)",
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
    only = {n.strip() for n in args.only.split(",") if n.strip()}
    unknown = only - set(NAMES)
    if unknown:
        parser.error(f"unknown suite(s) {', '.join(sorted(unknown))}; choose from {NAMES}")
    chosen = only or set(NAMES)
    plan = QUICK if args.quick else FULL
    if args.big:
        plan = with_big(plan)
    if args.plan:
        print("\n".join(_plan_text(plan, chosen)))
        return 0
    out: Path = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    python = Path(sys.executable)
    shown = str(python.relative_to(ROOT)) if python.is_relative_to(ROOT) else "python"
    argv_shown = argv if argv is not None else sys.argv[1:]
    run = Run(
        plan=plan,
        command=shlex.join([shown, "-m", "bench", *argv_shown]),
        chosen=chosen,
        started=dt.datetime.now(dt.UTC),
        git=report.git_state(),
        big=args.big,
    )
    run.skipped_why = _skip_reasons(plan, chosen, bool(only))
    run.estimates = {suite.name: _estimate(plan, suite) for suite in run.suites()}
    budget = args.budget_min
    if budget is None:
        budget = BUDGET_MIN if not (only or args.quick) else 0.0
        if budget and args.big:  # asked for: the 10^7-row run's time on top
            budget += (estimate_s(plan, "memory") - estimate_s(FULL, "memory")) / 60
    sections: list[Section] = []
    if args.render:
        from bench import caps

        if chosen != {"caps"}:
            parser.error("--render re-renders the caps experiment only: add --only caps")
        stored = orjson.loads((WORK / "results.json").read_bytes())
        sections = caps.render(plan, stored)
        run.state = "rendered again from bench/_work/results.json (nothing measured)"
        _write(sections, run, out)
        log(f"wrote {out} from {WORK / 'results.json'}")
        return 0
    log(f"commit {run.git['commit']}, tree {run.git['tree']}")
    log("estimated times:\n" + "\n".join(_plan_text(plan, chosen)))
    for suite in run.suites():
        if suite.name in run.skipped_why:
            log(f"suite {suite.name} skipped: {run.skipped_why[suite.name]}")
            continue
        elapsed = (dt.datetime.now(dt.UTC) - run.started).total_seconds()
        estimate = run.estimates[suite.name]
        if budget and elapsed + estimate > budget * 60:
            run.skipped_why[suite.name] = (
                f"to keep the run under {budget:.0f} minutes (`--budget-min`): {_minutes(elapsed)} "
                f"had passed and it takes about {_minutes(estimate)}"
            )
            log(f"suite {suite.name} skipped: {run.skipped_why[suite.name]}")
            continue
        log(f"suite {suite.name} (estimated {estimate:,.0f} s)")
        started = time.monotonic()
        try:
            made = suite.measure(plan, chosen)
        except Exception as exc:  # one suite's failure must not lose the others' results
            detail = traceback.format_exc().strip().splitlines()[-6:]
            made = [
                Section(
                    suite.names[0],
                    f"{suite.name}: failed",
                    [
                        f"The suite raised `{type(exc).__name__}`; the last lines of its "
                        "traceback:",
                        "",
                        "```",
                        *detail,
                        "```",
                    ],
                )
            ]
            run.failed[suite.name] = f"`{type(exc).__name__}: {str(exc)[:120]}`"
        except BaseException:
            run.took[suite.name] = time.monotonic() - started
            run.failed[suite.name] = "interrupted"
            run.state = f"**interrupted** during suite `{suite.name}`"
            _write(sections, run, out)
            raise
        took = time.monotonic() - started
        run.took[suite.name] = took
        for section in made:
            section.lines[:0] = [
                f"*Suite `{suite.name}` (bench/{suite.module}.py), {took:,.0f} s of this run; on "
                f"its own: `{PY} -m bench --only {suite.name}`.*",
                "",
            ]
        run.first_section[suite.name] = len(sections) + 1
        sections += made
        log(f"suite {suite.name} took {took:,.0f} s (estimated {estimate:,.0f} s)")
        _write(sections, run, out)  # keep partial results
    run.end_git = report.git_state()
    run.state = "complete" if not run.failed else f"complete, {len(run.failed)} suite(s) failed"
    _write(sections, run, out)
    log(f"wrote {out} ({_minutes((dt.datetime.now(dt.UTC) - run.started).total_seconds())})")
    return 0


def _write(sections: list[Section], run: Run, out: Path) -> None:
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
    notes = _notes(run, sections)
    if plots:
        notes += ["", "## Plots", "", *plots]
    head = _head(run)
    out.write_text(report.render(sections, head, notes))


if __name__ == "__main__":
    raise SystemExit(main())
