"""Peers: Distilabel 1.5.3 and Curator on the same workloads and the same mock server.

Each peer lives in a venv of its own under ``bench/_work`` (git-ignored), installed by
a full run when missing; ``--quick`` uses a peer only if its venv already exists. The
jobs are ``bench/distilabel_job.py`` and ``bench/curator_job.py``, whose docstrings say
exactly how each is configured; the same text goes into RESULTS.md.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import workloads
from bench.mockserver import MockProcess
from bench.plan import Plan
from bench.report import Section, Target, failed_runs, flat, median, other_load, pct, spread, table
from bench.runners import (
    BARE,
    DISTILABEL,
    ROOT,
    TURNSTILE,
    WORK,
    Result,
    RunFolder,
    Server,
    measure,
    parse_json_line,
    run_bare,
    run_turnstile,
)
from bench.throughput import INPUTS, LOGS, interleave, log
from bench.workloads import MULTI, SINGLE, Workload

PARAMS = {"temperature": 0.0, "max_tokens": 128}  # what the peers send; the others match


@dataclass(frozen=True, slots=True)
class Peer:
    """A peer framework: its own venv, what to install there, and its job script."""

    name: str
    package: str  # distribution name, for its version
    pip: tuple[str, ...]
    job: str  # file under bench/

    @property
    def venv(self) -> Path:
        return WORK / f"venv-{self.name}"

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def version(self) -> str | None:
        for site in self.venv.glob("lib/python*/site-packages"):
            prefix = self.package.replace("-", "_") + "-"
            for info in site.glob(f"{prefix}*.dist-info"):
                return info.name.removesuffix(".dist-info").removeprefix(prefix)
        return None

    def env(self, folder: Path) -> dict[str, str]:
        if self.name != CURATOR:
            return {}
        # Offline: tiktoken's BPE file from the copy litellm ships, no telemetry, no
        # cost-map download, and a fresh cache (Curator answers repeats from it).
        tokenizers = [
            str(p) for p in self.venv.glob("lib/python*/site-packages/litellm/*/tokenizers")
        ]
        return {
            "TIKTOKEN_CACHE_DIR": tokenizers[0] if tokenizers else "",
            "TELEMETRY_ENABLED": "false",
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "CURATOR_DISABLE_RICH_DISPLAY": "1",
            "CURATOR_CACHE_DIR": str(folder / "cache"),
        }

    def ensure(self, install: bool) -> str | None:
        """None when the peer is ready, else why it is not."""
        if self.python.exists() and self.version():
            return None
        if not install:
            return f"{self.venv.relative_to(ROOT)} does not exist (--quick installs nothing)"
        log(f"installing {' '.join(self.pip)} into {self.venv}")
        try:
            subprocess.run([sys.executable, "-m", "venv", str(self.venv)], check=True)
            subprocess.run(
                [str(self.venv / "bin" / "pip"), "install", "-q", *self.pip],
                check=True,
                capture_output=True,
            )
        except (OSError, subprocess.CalledProcessError) as exc:
            return f"installing {self.name} failed: {exc}"
        return None if self.version() else f"{self.package} is not importable after install"


CURATOR = "curator"
# distilabel imports requests but does not declare it.
DISTILABEL_PEER = Peer(
    DISTILABEL, "distilabel", ("distilabel==1.5.3", "openai", "requests"), "distilabel_job.py"
)
CURATOR_PEER = Peer(
    CURATOR, "bespokelabs-curator", ("bespokelabs-curator==0.1.31",), "curator_job.py"
)
PEERS = (DISTILABEL_PEER, CURATOR_PEER)


def distilabel_version() -> str | None:
    return DISTILABEL_PEER.version()


def curator_version() -> str | None:
    return CURATOR_PEER.version()


def run_peer(
    peer: Peer,
    server: Server,
    workload: Workload,
    *,
    cap: int,
    label: str = "",
    timeout_s: float = 1800,
) -> Result:
    """One job of ``peer`` (a fresh process, its own cache folder) over ``workload``."""
    with RunFolder(peer.name) as folder:
        output = folder / "out.jsonl"
        cmd = [
            str(peer.python),
            str(ROOT / "bench" / peer.job),
            "--url",
            server.url,
            "--input",
            str(workload.path),
            "--output",
            str(output),
            "--cap",
            str(cap),
        ]
        if peer.name == DISTILABEL:
            mode = "single" if workload.kind == SINGLE else "multi"
            cmd += ["--mode", mode, "--cache-dir", str(folder / "cache")]
        result = measure(
            peer.name,
            label,
            cmd,
            folder,
            server,
            timeout_s=timeout_s,
            parse=parse_json_line,
            rows_out=output,
            env=peer.env(folder),
        )
        result.extra["expected_rows"] = workload.rows
        return result


def _systems(
    peers: list[Peer], mock: MockProcess, wl: Workload, cap: int, label: str
) -> dict[str, Callable[[], Result]]:
    runs: dict[str, Callable[[], Result]] = {
        peer.name: lambda peer=peer: run_peer(peer, mock, wl, cap=cap, label=label)
        for peer in peers
    }
    runs[TURNSTILE] = lambda: run_turnstile(mock, wl, cap=cap, label=label, params=PARAMS)
    runs[BARE] = lambda: run_bare(mock, wl, cap=cap, label=label, params=PARAMS)
    return runs


def _rows(results: dict[str, list[Result]]) -> list[list[str]]:
    ts, bare = results[TURNSTILE], results[BARE]
    out = []
    for name, runs in results.items():
        out.append(
            [
                name,
                spread([r.rate_steady for r in runs]),
                spread([r.rate_wall for r in runs]),
                spread([r.cpu_ms_per_1k for r in runs]),
                spread([max(r.maxrss_mb, r.tree_rss_mb) for r in runs]),
                pct([a.rate_steady / b.rate_steady for a, b in zip(runs, ts, strict=False)]),
                pct([a.rate_steady / b.rate_steady for a, b in zip(runs, bare, strict=False)]),
                pct([a.rate_wall / b.rate_wall for a, b in zip(runs, ts, strict=False)]),
            ]
        )
    return out


HEADERS = [
    "system",
    "turns/s steady",
    "turns/s wall",
    "client CPU ms / 1k turns",
    "peak RSS MB (all processes)",
    "steady vs Turnstile",
    "steady vs bare",
    "wall vs Turnstile",
]

CONFIG_NOTES = {
    DISTILABEL: [
        "**Distilabel 1.5.3** (`bench/distilabel_job.py`, its venv "
        "`bench/_work/venv-distilabel`, installed with `pip install distilabel==1.5.3 openai "
        "requests`; distilabel imports `requests` without declaring it):",
        "",
        "- `OpenAILLM(model='mock', base_url=<mock>/v1, api_key='dummy', max_retries=0, "
        "timeout=120, generation_kwargs={'max_new_tokens': 128, 'temperature': 0.0})` "
        "(openai's `AsyncOpenAI` underneath);",
        "- concurrency: an async LLM sends a whole input batch at once (`asyncio.gather`), so "
        "`input_batch_size=cap` on the task and `batch_size=cap` on `LoadDataFromDicts` give "
        "`cap` requests in flight at most, moving in lockstep batch by batch;",
        "- single-turn: `LoadDataFromDicts >> TextGeneration(input_mappings={'instruction': "
        "'prompt'})`;",
        "- multi-turn: one pipeline per turn index, `LoadDataFromDicts >> ChatGeneration`, "
        "fed the rows that still have a turn with their whole history; each reply is "
        "appended before the next pass (ChatGeneration writes only the next turn);",
        "- `pipeline.run(use_cache=False)`, a cache folder per run, other settings default "
        "(one replica per step, raw input/output kept in `distilabel_metadata`). Its "
        "citation lookup (`Untracked error: No module named 'bs4'`) fails harmlessly "
        "offline.",
    ],
    CURATOR: [
        "**Curator** (`bench/curator_job.py`, its venv `bench/_work/venv-curator`, "
        "`pip install bespokelabs-curator==0.1.31`):",
        "",
        "- a `curator.LLM` subclass whose `prompt(row)` returns the row's messages; "
        "`backend='openai'`, `backend_params={'base_url': <mock>/v1, 'api_key': 'dummy', "
        "'max_concurrent_requests': cap, 'max_requests_per_minute': 10**7, "
        "'max_tokens_per_minute': 10**10, 'max_retries': 0}` (rate limits out of the way: "
        "the cap is the only limit), `generation_params={'temperature': 0.0, "
        "'max_tokens': 128}`;",
        "- offline it needs three settings, all through the environment: tiktoken (used "
        "to count tokens for its rate limiter) downloads its BPE file on first use, so "
        "`TIKTOKEN_CACHE_DIR` points at the copy litellm ships; `TELEMETRY_ENABLED=false`; "
        "`LITELLM_LOCAL_MODEL_COST_MAP=True`. Without the first it fails at start with "
        "`ConnectionError ... openaipublic.blob.core.windows.net`;",
        "- a fresh `CURATOR_CACHE_DIR` per run (it would answer a repeated run from its "
        "cache); multi-turn is one `llm(dataset)` pass per turn index, as for Distilabel "
        "(Curator has no multi-turn mode).",
    ],
}


def peers(plan: Plan) -> Section:
    section = Section("peers", "6. Peers: Distilabel and Curator on the same workloads")
    ready: list[Peer] = []
    for peer in PEERS:
        why = peer.ensure(plan.install_peers)
        if why is None:
            ready.append(peer)
            section.lines += [*CONFIG_NOTES[peer.name], ""]
        else:
            section.lines += [f"{peer.name} skipped: {why}.", ""]
    if not ready:
        return section
    cap = 64
    section.lines += [
        f"Turnstile and the bare loop send the same `{PARAMS}` with the same cap. All "
        "systems talk to the same mock server process. *wall* includes each system's "
        "start-up; *steady* is measured by the mock server from the first request to the "
        "last reply, which for the peers' multi-turn includes the set-up of each per-turn "
        "pass (part of the idiom).",
        "",
    ]
    all_runs: list[Result] = []
    points = []
    summary = []
    with MockProcess(0, LOGS) as mock:
        for wl in (
            workloads.make(SINGLE, plan.peer_single, INPUTS),
            workloads.make(MULTI, plan.peer_multi, INPUTS),
        ):
            results: dict[str, list[Result]] = {}
            interleave(plan.peer_repeats, _systems(ready, mock, wl, cap, f"{wl.kind} 0ms"), results)
            all_runs += flat(results)
            section.lines += [
                f"**{wl.label}, mock latency 0 ms, cap {cap}** ({plan.peer_repeats} "
                "interleaved repeats)",
                "",
                *table(HEADERS, _rows(results)),
                "",
            ]
            for peer in ready:
                vs_ts = [
                    a.rate_steady / b.rate_steady
                    for a, b in zip(results[peer.name], results[TURNSTILE], strict=False)
                ]
                summary.append(f"{peer.name} {wl.kind}-turn {pct(vs_ts)}")
    with MockProcess(50, LOGS) as mock:
        wl = workloads.make(SINGLE, plan.peer_latency_rows, INPUTS)
        rows = []
        for cap_ in plan.peer_caps:
            results = {}
            label = f"single 50ms cap {cap_}"
            interleave(plan.peer_latency_repeats, _systems(ready, mock, wl, cap_, label), results)
            all_runs += flat(results)
            ideal = cap_ / 0.05
            for name, runs in results.items():
                rate = median([r.rate_steady for r in runs])
                points.append(
                    {"system": name, "latency_ms": 50.0, "shape": SINGLE, "cap": cap_, "rate": rate}
                )
                rows.append(
                    [
                        cap_,
                        name,
                        f"{spread([r.rate_steady for r in runs])} "
                        f"({pct([r.rate_steady / ideal for r in runs])})",
                        spread([r.rate_wall for r in runs]),
                        spread([r.cpu_ms_per_1k for r in runs]),
                    ]
                )
        section.lines += [
            f"**{wl.label}, mock latency 50 ms** (ideal = cap / 50 ms; "
            f"{plan.peer_latency_repeats} interleaved repeat(s))",
            "",
            *table(
                ["cap", "system", "turns/s steady (of ideal)", "turns/s wall", "CPU ms / 1k"],
                rows,
            ),
            "",
        ]
    section.lines += [
        f"Other processes on the machine used {other_load(all_runs)} on average meanwhile.",
        *failed_runs(all_runs),
    ]
    section.targets.append(
        Target("6. peers: steady turns/s vs Turnstile (0 ms)", "reported", "; ".join(summary), None)
    )
    section.data["points"] = points
    return section
