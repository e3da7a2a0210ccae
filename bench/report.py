"""Turning measurements into RESULTS.md: summaries, tables, targets, plots, the machine.

Every figure is a median over interleaved repeats with its range (min-max); ratios
are taken per repeat (Turnstile and its reference ran back to back) and then
summarised the same way, so a slow minute on a shared machine hits both sides.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import itertools
import math
import os
import platform
import re
import statistics
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.runners import Result


@dataclass(slots=True)
class Target:
    """One goal from the brief and whether this run met it (None: not measured)."""

    what: str
    goal: str
    value: str
    met: bool | None


@dataclass(slots=True)
class Section:
    """One experiment's part of RESULTS.md."""

    key: str
    title: str
    lines: list[str] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


# -- numbers -----------------------------------------------------------------


def median(values: Iterable[float]) -> float:
    clean = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(clean) if clean else float("nan")


def spread(values: Sequence[float], fmt: str = "{:,.0f}", scale: float = 1.0) -> str:
    """``median (min-max)``, or just the value when there is one."""
    clean = [v * scale for v in values if v is not None and not math.isnan(v)]
    if not clean:
        return "n/a"
    mid = fmt.format(statistics.median(clean))
    if len(clean) == 1 or min(clean) == max(clean):
        return mid
    return f"{mid} ({fmt.format(min(clean))}-{fmt.format(max(clean))})"


def pct(values: Sequence[float]) -> str:
    return spread(values, "{:.0f}%", 100.0)


def ratios(top: Sequence[Result], bottom: Sequence[Result], attr: str) -> list[float]:
    """Per-repeat ratios ``top.attr / bottom.attr``, pairing runs in order."""
    out = []
    for a, b in zip(top, bottom, strict=False):
        x, y = getattr(a, attr), getattr(b, attr)
        if y:
            out.append(x / y)
    return out


def flat(results: dict[str, list[Result]]) -> list[Result]:
    """Every run of every system, in one list."""
    return [r for runs in results.values() for r in runs]


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return lines


def systems_table(
    results: dict[str, list[Result]],
    rate: str,
    extra: Sequence[tuple[str, Callable[[list[Result]], str]]] = (),
) -> list[str]:
    """One row a system: its steady rate (headed ``rate``) and CPU a request over its
    runs, then each ``extra`` column (a header, and the cell made of the runs)."""
    return table(
        ["system", rate, "CPU us/request", *(header for header, _ in extra)],
        [
            [
                system,
                spread([r.rate_steady for r in rs]),
                spread([r.cpu_us_per_request for r in rs]),
                *(cell(rs) for _, cell in extra),
            ]
            for system, rs in results.items()
        ],
    )


def other_load(results: Iterable[Result]) -> str:
    """The CPU other processes on the machine used during these runs, in cores."""
    runs = list(results)
    busy = sum(r.other_cpu_s for r in runs)
    wall = sum(r.wall_s for r in runs)
    return f"{busy / wall:.2f} cores" if wall else "n/a"


def failed_runs(results: Iterable[Result]) -> list[str]:
    """A note line per run that did not end cleanly or wrote the wrong number of rows."""
    notes = []
    for r in results:
        if r.extra.get("killed"):
            continue  # SIGKILLed on purpose
        expected = r.extra.get("expected_rows")
        if r.rc != 0 or (expected is not None and r.rows_out != expected):
            tail = str(r.extra.get("stderr_tail", "")).strip().splitlines()[-3:]
            notes.append(
                f"- **{r.system} {r.label}: exit {r.rc}, {r.rows_out:,} rows written"
                f" (expected {expected})** {' / '.join(tail)}"
            )
    return notes


def verdict(met: bool | None) -> str:
    return {True: "met", False: "**not met**", None: "(no target)"}[met]


# -- the machine -------------------------------------------------------------


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    from bench import peers

    return {
        "cpus": f"{os.cpu_count()} (nproc), {_cpu_model()}",
        "ram": f"{_ram_gib():.1f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "turnstile": _version("turnstile"),
        "aiohttp": _version("aiohttp"),
        "orjson": _version("orjson"),
        "anyio": _version("anyio"),
        "uvloop": _version("uvloop"),
        "distilabel": peers.distilabel_version() or "not installed",
        "bespokelabs-curator": peers.curator_version() or "not installed",
        "load": Path("/proc/loadavg").read_text().split(" ")[0] + " (1-min load average, end)",
    }


# What a run writes itself: a change to these is no change to what was measured.
_OUTPUTS = ("bench/RESULTS.md", "bench/*.png")


def git_state() -> dict[str, str]:
    """The commit measured and whether the tree differed from it: ``commit`` (short
    hash), ``tree`` (clean, or what was changed) and ``digest`` (of ``git diff HEAD``
    outside the report's own files, to tell whether it changed during the run)."""
    git = ["git", "-C", str(Path(__file__).resolve().parent.parent)]
    excluded = [f":(exclude){p}" for p in _OUTPUTS]
    try:
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no", "--", ".", *excluded],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
        diff = subprocess.run(
            [*git, "diff", "HEAD", "--", ".", *excluded], capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "tree": "unknown (git failed)", "digest": ""}
    if not status:
        return {"commit": head, "tree": "clean (no tracked file differs from it)", "digest": ""}
    paths = [line[3:] for line in status]
    engine = [p for p in paths if p.startswith("engine/")]
    shown = ", ".join(paths[:8]) + (f" and {len(paths) - 8} more" if len(paths) > 8 else "")
    digest = hashlib.sha1(diff).hexdigest()[:10]
    tree = (
        f"**dirty**: {len(paths)} tracked file(s) differ from {head} "
        f"({len(engine)} under engine/): {shown}; `git diff HEAD` sha1 {digest}"
    )
    return {"commit": head, "tree": tree, "digest": digest}


# -- plots -------------------------------------------------------------------


def plot_caps(data: dict[str, Any], peers: dict[str, Any], path: Path) -> bool:
    """Turns/s against the cap, one panel per (latency, shape), with the ideal line."""
    points = data.get("points", [])
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latencies = sorted({p["latency_ms"] for p in points})
    shapes = ["single", "multi"]
    fig, axes = plt.subplots(len(latencies), 2, figsize=(11, 4.2 * len(latencies)), squeeze=False)
    styles = {"turnstile": "o-", "bare": "s--", "distilabel": "^:", "curator": "v:"}
    for row, latency in enumerate(latencies):
        for col, shape in enumerate(shapes):
            ax = axes[row][col]
            here = [p for p in points if p["latency_ms"] == latency and p["shape"] == shape]
            extra = [  # the peers' own points (their Turnstile/bare runs repeat ours)
                p
                for p in peers.get("points", [])
                if p["latency_ms"] == latency
                and p["shape"] == shape
                and p["system"] not in ("turnstile", "bare")
            ]
            caps = sorted({p["cap"] for p in here + extra})
            if not caps:
                ax.set_visible(False)
                continue
            ax.plot(caps, [c / (latency / 1000) for c in caps], "k-", lw=0.8, label="ideal")
            for system in styles:
                mine = sorted(
                    (p for p in here + extra if p["system"] == system), key=lambda p: p["cap"]
                )
                if mine:
                    ax.plot(
                        [p["cap"] for p in mine],
                        [p["rate"] for p in mine],
                        styles[system],
                        label="bare aiohttp loop" if system == "bare" else system,
                    )
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("cap (max_concurrency)")
            ax.set_ylabel("turns/s (steady state)")
            ax.set_title(f"{shape}-turn, mock latency {latency:g} ms")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_systems(data: dict[str, Any], path: Path) -> bool:
    """The caps experiment: requests/s and CPU per request against the cap (50 ms), and
    the 0 ms point, for Turnstile and the bare loop, each on asyncio and on uvloop."""
    points = data.get("points", [])
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(dict.fromkeys(p["system"] for p in points))
    styles = {
        "turnstile": ("o-", "C0"),
        "turnstile+uvloop": ("o-", "C1"),
        "bare": ("s--", "C2"),
        "bare+uvloop": ("s--", "C3"),
    }
    default = ("^", "0.5")  # a diagnostic (the null writer), at a few caps: grey markers
    latencies = sorted({p["latency_ms"] for p in points if p["latency_ms"] > 0})
    zero = [p for p in points if p["latency_ms"] == 0]
    panels = 2 * len(latencies) + (1 if zero else 0)
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.4), squeeze=False)
    col = 0
    for latency in latencies:
        here = [p for p in points if p["latency_ms"] == latency]
        caps = sorted({p["cap"] for p in here})
        rate_ax, cpu_ax = axes[0][col], axes[0][col + 1]
        col += 2
        rate_ax.plot(caps, [c / (latency / 1000) for c in caps], "k-", lw=0.8, label="ideal")
        for system in systems:
            mine = sorted((p for p in here if p["system"] == system), key=lambda p: p["cap"])
            style, color = styles.get(system, default)
            xs = [p["cap"] for p in mine]
            rate_ax.plot(xs, [p["rate"] for p in mine], style, color=color, label=system)
            cpu_ax.plot(xs, [p["cpu_us"] for p in mine], style, color=color, label=system)
        for ax in (rate_ax, cpu_ax):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("cap (max_concurrency)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        rate_ax.set_yscale("log")
        rate_ax.set_ylabel("requests/s (steady)")
        rate_ax.set_title(f"requests/s, single-turn, mock latency {latency:g} ms")
        cpu_ax.set_ylim(bottom=0)
        cpu_ax.set_ylabel("client CPU per request (us, steady window)")
        cpu_ax.set_title(f"client CPU per request, {latency:g} ms")
    if zero:
        ax = axes[0][col]
        names = [p["system"] for p in zero]
        bars = ax.bar(
            range(len(zero)),
            [p["rate"] for p in zero],
            color=[styles.get(n, default)[1] for n in names],
        )
        for bar, p in zip(bars, zero, strict=True):
            ax.annotate(
                f"{p['rate']:,.0f}/s\n{p['cpu_us']:.0f} us",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        labels = [n.replace("+", "\n+").replace(", ", ",\n") for n in names]
        ax.set_xticks(range(len(zero)), labels, fontsize=8)
        ax.set_ylabel("requests/s (steady)")
        ax.set_title(f"0 ms, cap {zero[0]['cap']}: the client's CPU is the limit")
        ax.set_ylim(0, max(p["rate"] for p in zero) * 1.2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_memory(data: dict[str, Any], path: Path) -> bool:
    points = data.get("points", [])
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    xs = [p["rows"] for p in points]
    ax.plot(xs, [p["rss_mb"] for p in points], "o-", label="turnstile run: peak RSS")
    ax.axhline(200, color="r", lw=0.8, ls="--", label="target: 200 MB")
    ax.set_xscale("log")
    ax.set_ylim(0, max(220, *(p["rss_mb"] * 1.2 for p in points)))
    ax.set_xlabel("conversations in the input")
    ax.set_ylabel("peak RSS (MB)")
    ax.set_title("Memory against input size (0 ms mock, cap 1024)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_outage(data: dict[str, Any], path: Path) -> bool:
    """Turns/s over time (per sampling interval) through an outage of every replica."""
    points = data.get("points", [])
    if len(points) < 2:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Bins from sample to sample; one much shorter than the sampling interval (the
    # driver's sample just before the kill) joins the bin before it, or its rate is noise.
    bins: list[tuple[float, int]] = [(points[0][0], points[0][1])]  # (end time, served)
    for t, n in points[1:]:
        if len(bins) > 1 and t - bins[-1][0] < 0.2:
            bins[-1] = (t, n)
        elif t > bins[-1][0]:
            bins.append((t, n))
    edges = [t for t, _ in bins]
    rates = [(n1 - n0) / (t1 - t0) for (t0, n0), (t1, n1) in itertools.pairwise(bins)]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    ax.stairs(rates, edges, lw=1.5, label="turns/s (replies served by both mocks)")
    ax.axvspan(data["kill_s"], data["back_s"], color="r", alpha=0.15, label="both mocks down")
    ax.axvline(data["resumed_s"], color="g", lw=0.8, ls="--", label="first request after restart")
    ax.set_xlabel("seconds since the run started")
    ax.set_ylabel("turns/s (between samples, every 0.5 s)")
    ax.set_title(f"{data.get('outage_s', 0):g} s outage of both replicas ({data.get('label', '')})")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- the document ------------------------------------------------------------

_NUMBER = re.compile(r"^\d+\.(\d+\.?)?\s+")  # "9. ", "16.1 ", "10.2. "; not "2 x"


def unnumbered(text: str) -> str:
    """``text`` without a leading section number ("9. ", "16.1 "): the report numbers
    sections by the order a run makes them, whatever their modules called them."""
    return _NUMBER.sub("", text, count=1)


def render(sections: list[Section], head: list[str], notes: list[str]) -> str:
    """The whole RESULTS.md: ``head`` (the run, the machine, the suites), the targets,
    one numbered part per section in the order given, then ``notes``."""
    lines = ["# Turnstile benchmarks", "", *head]
    numbered = [(i, section) for i, section in enumerate(sections, 1)]
    targets = [(i, t) for i, s in numbered for t in s.targets]
    if targets:
        met = sum(1 for _, t in targets if t.met)
        missed = sum(1 for _, t in targets if t.met is False)
        lines += [
            "",
            "## Targets",
            "",
            f"{met} met, {missed} not met, {len(targets) - met - missed} reported without "
            "a target; each row is explained in its section.",
            "",
        ]
        lines += table(
            ["section", "experiment", "target", "measured", "verdict"],
            [[i, unnumbered(t.what), t.goal, t.value, verdict(t.met)] for i, t in targets],
        )
    for i, section in numbered:
        lines += ["", f"## {i}. {unnumbered(section.title)}", "", *section.lines]
    lines += notes
    return "\n".join(lines).rstrip() + "\n"
