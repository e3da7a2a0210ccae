"""A real model: Turnstile and the bare loop against the built-in llama.cpp server.

One ``turnstile serve-local`` process (llama-server with SmolLM2-135M-Instruct) serves
both sides in turn, so they meet the same server; a last run lets Turnstile start its
own server (``base_url: local``) to show what that costs end to end. Skipped, with a
note, when llama-server or the weights are not installed.
"""

from __future__ import annotations

import itertools
import signal
import subprocess
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson
import psutil

from bench.plan import Plan
from bench.report import Section, Target, failed_runs, other_load, pct, spread, table
from bench.runners import (
    BARE,
    ROOT,
    TURNSTILE,
    Result,
    RunFolder,
    measure,
    parse_turnstile,
    process_cpu_s,
    run_bare,
    run_turnstile,
    turnstile_cmd,
    turnstile_config,
)
from bench.throughput import INPUTS, LOGS, interleave, log
from bench.workloads import SINGLE, Workload

CAP = 8  # llama-server slots (serve-local's default --parallel) and the clients' cap
# One llama.cpp thread: on a 2-core machine the client needs the other core, and
# llama.cpp's spinning thread barriers collapse (seconds per token) as soon as
# anything else wants a core, which on a shared machine made results meaningless.
THREADS = 1
PARAMS = {"max_tokens": 64, "temperature": 0.0}
_TOPICS = (
    "the sea, bread, a bicycle, winter, a library, coffee, the moon, a garden, trains, rain, "
    "music, a mountain, paper, a bridge, honey, a lighthouse, snow, a market, clocks, a river, "
    "tea, a forest, a kite, the desert"
).split(", ")


def prompts(n: int) -> Workload:
    path = INPUTS / f"real-{n}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        for i in range(n):
            topic = _TOPICS[i % len(_TOPICS)]
            row = {"id": f"r{i}", "prompt": f"Write two short sentences about {topic}."}
            f.write(orjson.dumps(row) + b"\n")
    return Workload(SINGLE, path, n, n)


class LlamaProcess:
    """``turnstile serve-local`` in the background; the benchmark's view of it."""

    def __init__(self, log_dir: Path) -> None:
        self.url = ""
        self.model = ""
        self.log_path = log_dir / "serve-local.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> LlamaProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as err:
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "engine",
                    "serve-local",
                    "--parallel",
                    str(CAP),
                    "--threads",
                    str(THREADS),
                ],
                stdout=subprocess.PIPE,
                stderr=err,
                cwd=ROOT,
            )
        assert self._proc.stdout is not None
        # serve-local prints "base_url: URL" and "model: NAME" once the server is ready
        # (on one line or two, depending on the version).
        seen = ""
        while not (self.url and self.model):
            line = self._proc.stdout.readline().decode()
            if not line:
                self.__exit__(None, None, None)
                raise RuntimeError(f"serve-local did not start ({seen!r}); see {self.log_path}")
            seen += line
            words = line.split()
            for key, value in itertools.pairwise(words):
                if key == "base_url:":
                    self.url = value
                elif key == "model:":
                    self.model = value
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            children = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            children = []
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for child in children:  # llama-server, should serve-local not have stopped it
            try:
                child.wait(timeout=5)
            except psutil.TimeoutExpired:
                child.kill()
            except psutil.Error:
                pass

    def reset(self, *, window_only: bool = False) -> None:
        pass

    def cpu_s(self) -> float:
        """CPU of llama-server (serve-local's child) and serve-local itself."""
        assert self._proc is not None
        total = process_cpu_s(self._proc.pid)
        try:
            for child in psutil.Process(self._proc.pid).children(recursive=True):
                total += process_cpu_s(child.pid)
        except (psutil.Error, OSError):
            pass
        return total

    def stats(self) -> dict[str, Any]:
        return {}


class _NoServer:
    """For the run that starts its own llama-server: nothing to watch from outside."""

    url = "local"

    def reset(self, *, window_only: bool = False) -> None:
        pass

    def cpu_s(self) -> float:
        return 0.0

    def stats(self) -> dict[str, Any]:
        return {}


def missing() -> str | None:
    """Why the real-model comparison cannot run here, or None."""
    try:
        from engine.local.server import default_model_path, find_llama_server
    except ImportError as exc:
        return f"engine.local.server cannot be imported ({exc})"
    try:
        find_llama_server()
        default_model_path()
    except Exception as exc:
        return str(exc)
    return None


def _tokens_per_s(r: Result) -> float:
    seconds = r.extra.get("inproc_s") or r.wall_s
    return (r.extra.get("completion_tokens") or 0) / seconds if seconds else 0.0


def _tokens_per_wall_s(r: Result) -> float:
    return (r.extra.get("completion_tokens") or 0) / r.wall_s if r.wall_s else 0.0


def real_model(plan: Plan) -> Section:
    section = Section("real", "7. Real model: llama.cpp server with SmolLM2-135M-Instruct")
    why = missing()
    if why is not None:
        section.lines.append(f"Skipped: {why}")
        return section
    wl = prompts(plan.real_prompts)
    results: dict[str, list[Result]] = {}
    with LlamaProcess(LOGS) as llama:
        log(f"llama-server ready at {llama.url} ({llama.model}); warming it up")
        run_bare(llama, prompts(CAP), cap=CAP, params=PARAMS, model=llama.model)
        interleave(
            plan.real_repeats,
            {
                TURNSTILE: lambda: run_turnstile(
                    llama, wl, cap=CAP, label="llama", params=PARAMS, model=llama.model
                ),
                BARE: lambda: run_bare(
                    llama, wl, cap=CAP, label="llama", params=PARAMS, model=llama.model
                ),
            },
            results,
        )
    with RunFolder("turnstile-local") as folder:
        # No model name: with base_url local it is the built-in model's.
        config = turnstile_config(
            folder,
            "local",
            wl,
            cap=CAP,
            params=PARAMS,
            model=None,
            model_extra={"local": {"threads": THREADS}},
        )
        local = measure(
            TURNSTILE,
            "base_url: local",
            turnstile_cmd(config),
            folder,
            _NoServer(),
            timeout_s=900,
            parse=parse_turnstile,
            rows_out=folder / "out" / "distilled.jsonl",
        )
        local.extra["expected_rows"] = wl.rows
    log(f"base_url: local run: {local.wall_s:.1f}s, exit {local.rc}")
    ts, bare = results[TURNSTILE], results[BARE]
    ratio = [_tokens_per_s(a) / _tokens_per_s(b) for a, b in zip(ts, bare, strict=False)]
    wall_ratio = [
        _tokens_per_wall_s(a) / _tokens_per_wall_s(b) for a, b in zip(ts, bare, strict=False)
    ]
    rows = []
    for name, runs in results.items():
        rows.append(
            [
                name,
                spread([r.extra.get("completion_tokens") or 0 for r in runs]),
                spread([_tokens_per_s(r) for r in runs], "{:.1f}"),
                spread([_tokens_per_wall_s(r) for r in runs], "{:.1f}"),
                spread([r.wall_s for r in runs], "{:.1f}"),
                spread([r.server_cpu_s for r in runs], "{:.1f}"),
            ]
        )
    rows.append(
        [
            "Turnstile, `base_url: local` (starts its own server)",
            local.extra.get("completion_tokens", "n/a"),
            f"{_tokens_per_s(local):.1f}",
            f"{_tokens_per_wall_s(local):.1f}",
            f"{local.wall_s:.1f}",
            "(in the client's CPU)",
        ]
    )
    section.lines += [
        f"{wl.rows} short prompts (`Write two short sentences about <topic>.`), `{PARAMS}`, "
        f"cap {CAP} on both sides, llama-server with `--parallel {CAP}` slots and "
        f"`--threads {THREADS}` (so the client keeps a core of its own), "
        f"{plan.real_repeats} interleaved repeat(s) against one `turnstile serve-local` "
        "process, after one unmeasured warm-up batch. *tokens/s* is completion tokens over "
        "the client's own time from its first request to its end; *wall* includes process "
        "start-up. The last row is one run with `base_url: local`, which includes starting "
        "and stopping llama-server.",
        "",
        *table(
            [
                "system",
                "completion tokens",
                "tokens/s",
                "tokens/s wall",
                "wall s",
                "server CPU s",
            ],
            rows,
        ),
        "",
        f"Turnstile / bare, tokens/s: {pct(ratio)}; on wall time: {pct(wall_ratio)}. "
        f"Other processes used {other_load([*ts, *bare])} on average meanwhile.",
        *failed_runs([*ts, *bare, local]),
    ]
    section.targets.append(
        Target(
            "7. real model: tokens/s vs bare loop",
            "reported (>= 80% expected)",
            f"{pct(ratio)} (wall {pct(wall_ratio)})",
            None,
        )
    )
    section.data = {k: [r.as_dict() for r in v] for k, v in results.items()}
    section.data["local"] = local.as_dict()
    return section
