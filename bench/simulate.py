"""Simulated users (``distill.user``): how many dialogues reach ``turns``, and at what speed.

The mock (``turnstile mock-server --user-repeat-rate 0.05``, otherwise its defaults: 0 ms,
no other fault) plays both sides: ``mock`` the teacher, ``user-asker`` the simulated user,
5% of whose messages repeat the conversation's first one. Each input row holds one
question; ``distill.user`` asks for 4 user messages a conversation with the default
settings (``end_marker: [END]``, ``max_similar: 0.9``, a repeat asked again up to twice).

Then the same number of turns without a simulator: plain distillation of rows of 4 user
messages, 7/4 as many rows, so both runs write the same number of replies (a simulated
dialogue: 4 teacher turns and 3 simulated user messages) and the teacher sees the same
history lengths. turns/s is replies written over the run's in-process seconds (the
summary line ``turns: N written in Xs``); interleaved repeats
(``BENCH_SIMULATE_REPEATS``, default 3, 1 with ``--quick``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson

from bench.plan import Plan
from bench.report import Section, Target, median, pct, spread, table
from bench.runners import ROOT, RunFolder, parse_turnstile, spawn_measured, turnstile_cmd
from bench.throughput import log

CAP = 64
TURNS = 4
REPEAT_RATE = 0.05
SIMULATED, PLAIN = "simulated user", "plain distillation"


class _Mock:
    """``turnstile mock-server`` in a process of its own (the CLI, with its user flags)."""

    def __init__(self, *flags: str) -> None:
        self.flags = flags
        self.url = ""
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> _Mock:
        cmd = [sys.executable, "-m", "engine", "mock-server", "--port", "0", *self.flags]
        self._proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE)
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline().decode()
        if "listening on" not in line:
            raise RuntimeError(f"the mock server did not start: {line!r}")
        self.url = line.split()[-1]
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=30)


def _config(folder: Path, url: str, rows: list[dict[str, Any]], *, simulate: bool) -> Path:
    (folder / "in.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    models: dict[str, Any] = {
        "teacher": {"base_url": url, "model": "mock", "max_concurrency": CAP},
    }
    distill: dict[str, Any] = {"model": "teacher"}
    if simulate:
        models["asker"] = {"base_url": url, "model": "user-asker", "max_concurrency": CAP}
        distill["user"] = {
            "model": "asker",
            "turns": TURNS,
            "system_prompt": "You are a curious student. Ask one short follow-up question.",
        }
    config = {
        "task": "distill",
        "input": "in.jsonl",
        "output": "out/distilled.jsonl",
        "checkpoint_dir": "ck",
        "models": models,
        "distill": distill,
        "progress_interval_s": 3600,
    }
    path = folder / "run.yaml"
    path.write_bytes(orjson.dumps(config))
    return path


def _run(url: str, rows: list[dict[str, Any]], *, simulate: bool) -> dict[str, Any]:
    with RunFolder("simulate" if simulate else "simulate-plain") as folder:
        config = _config(folder, url, rows, simulate=simulate)
        done = spawn_measured(
            turnstile_cmd(config),
            cwd=folder,
            stdout=folder / "stdout.txt",
            stderr=folder / "stderr.txt",
            timeout_s=3600,
        )
        err = (folder / "stderr.txt").read_text(errors="replace")
        turns, extra = parse_turnstile("", err)
        out = [
            orjson.loads(line)
            for line in (folder / "out" / "distilled.jsonl").read_bytes().splitlines()
        ]
    seconds = float(extra.get("inproc_s") or 0.0)
    reasons: dict[str, int] = {}
    for row in out:
        reason = str(row.get("end_reason", "-"))
        reasons[reason] = reasons.get(reason, 0) + 1
    assistant = sum(1 for row in out for m in row["messages"] if m["role"] == "assistant")
    result = {
        "rc": done.rc,
        "cpu_us_per_turn": 1e6 * done.cpu_s / turns if turns else 0.0,
        "rows": len(out),
        "turns": turns,
        "assistant_turns": assistant,
        "seconds": seconds,
        "rate": turns / seconds if seconds else 0.0,
        "reasons": reasons,
    }
    log(f"{SIMULATED if simulate else PLAIN}: {result}")
    return result


def simulate(plan: Plan) -> Section:
    n = 500 if plan.quick else 4_000
    repeats = int(os.environ.get("BENCH_SIMULATE_REPEATS", 1 if plan.quick else 3))
    questions = [
        {
            "id": f"s{i}",
            "messages": [{"role": "user", "content": f"question {i} on topic {i % 17}"}],
        }
        for i in range(n)
    ]
    # A simulated dialogue writes 4 teacher turns and 3 user messages: plain rows of 4
    # user messages, 7/4 as many, write as many replies over the same histories.
    replies = 2 * TURNS - 1
    plain = [
        {
            "id": f"p{i}",
            "messages": [
                {"role": "user", "content": f"question {i} part {t} on topic {i % 17}"}
                for t in range(TURNS)
            ],
        }
        for i in range(-(-n * replies // TURNS))
    ]
    runs: dict[str, list[dict[str, Any]]] = {SIMULATED: [], PLAIN: []}
    with _Mock("--user-repeat-rate", str(REPEAT_RATE)) as mock:
        for r in range(repeats):
            order = [True, False] if r % 2 == 0 else [False, True]
            for sim in order:
                runs[SIMULATED if sim else PLAIN].append(
                    _run(mock.url, questions if sim else plain, simulate=sim)
                )
    reached = [
        run["reasons"].get("turns", 0) / run["rows"] for run in runs[SIMULATED] if run["rows"]
    ]
    ratios = [
        s["rate"] / p["rate"]
        for s, p in zip(runs[SIMULATED], runs[PLAIN], strict=True)
        if p["rate"]
    ]
    section = Section("simulate", "18. Simulated users: a second model writes the user turns")
    section.lines += [
        f"{n:,} one-question rows; `distill.user` asks for {TURNS} user messages a "
        "conversation with the default settings (`end_marker: [END]`, `max_similar: 0.9`, a "
        "repeat asked again up to twice); the mock plays both sides at 0 ms "
        f"(`turnstile mock-server --user-repeat-rate {REPEAT_RATE}`: {REPEAT_RATE:.0%} of the "
        "simulated messages repeat the conversation's first one); cap "
        f"{CAP} for each model; {repeats} interleaved repeat(s). Plain distillation runs "
        f"{len(plain):,} rows of {TURNS} user messages: the same number of replies over the "
        "same teacher histories, no simulator. turns/s: replies written (teacher's and "
        "simulator's) over the run's in-process seconds.",
        "",
        *table(
            ["run", "rows", "replies", "assistant turns", "turns/s", "CPU us/turn", "end reasons"],
            [
                [
                    name,
                    f"{run['rows']:,}",
                    f"{run['turns']:,}",
                    f"{run['assistant_turns']:,}",
                    f"{run['rate']:,.0f}",
                    f"{run['cpu_us_per_turn']:,.0f}",
                    ", ".join(f"{k} {v:,}" for k, v in sorted(run["reasons"].items())),
                ]
                for name, rs in runs.items()
                for run in rs
            ],
        ),
        "",
        f"turns/s, simulated against plain: {spread([s['rate'] for s in runs[SIMULATED]])} "
        f"against {spread([p['rate'] for p in runs[PLAIN]])}; client CPU per turn (whole "
        f"process, start-up included, less sensitive to other load on the machine): "
        f"{spread([s['cpu_us_per_turn'] for s in runs[SIMULATED]])} us against "
        f"{spread([p['cpu_us_per_turn'] for p in runs[PLAIN]])} us.",
    ]
    section.targets.append(
        Target(
            f"18.1 dialogues that reach turns with {REPEAT_RATE:.0%} repetition faults",
            ">= 95%",
            pct(reached),
            median(reached) >= 0.95 if reached else None,
        )
    )
    section.targets.append(
        Target(
            "18.2 turns/s against plain distillation of the same number of turns",
            ">= 90%",
            pct(ratios),
            median(ratios) >= 0.90 if ratios else None,
        )
    )
    section.data = {"runs": runs}
    return section
