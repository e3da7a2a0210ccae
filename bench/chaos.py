"""Chaos: a run against a faulty server, SIGKILLed again and again, must end exact.

The mock server injects 5% 429 (with Retry-After), 5% 500, 2% dropped
connections, 1% malformed bodies and 1% hangs past the client's timeout, while
the `turnstile run` process is SIGKILLed at random moments and restarted each
time. The final output must equal a fault-free run's, row for row: none lost,
none duplicated. Reports how many requests were sent again.

    python -m bench.chaos [--turns 10000] [--kills 10] [--seed 1]

The test suite runs a short version (tests/test_chaos.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import yaml

from engine.testing.mock_server import Faults, MockServer

CHAOS_FAULTS = {
    "rate_429": 0.05,
    "rate_500": 0.05,
    "rate_drop": 0.02,
    "rate_malformed": 0.01,
    "rate_hang": 0.01,
}


@dataclass
class ChaosReport:
    turns: int
    rows: int
    kills: int
    restarts: int
    requests: int
    re_sent: int
    faults: dict[str, int]
    lost: int
    duplicated: int
    mismatched: int
    seconds: float

    @property
    def exact(self) -> bool:
        return self.lost == 0 and self.duplicated == 0 and self.mismatched == 0


def workload(turns: int, seed: int) -> list[dict[str, Any]]:
    """Conversations of 1-6 user turns adding up to ``turns`` turns."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    left = turns
    while left > 0:
        n = min(left, rng.randint(1, 6))
        messages = []
        for t in range(n):
            messages.append({"role": "user", "content": f"row {len(rows)} question {t}"})
            messages.append({"role": "assistant", "content": "old"})
        rows.append({"id": f"r{len(rows)}", "messages": messages})
        left -= n
    return rows


def _config(folder: Path, base_url: str, cap: int, timeout_s: float) -> Path:
    config = {
        "task": "distill",
        "input": "in.jsonl",
        "output": "out.jsonl",
        "checkpoint_dir": "ck",
        "models": {
            "teacher": {
                "base_url": base_url,
                "model": "mock",
                "max_concurrency": cap,
                "timeout_s": timeout_s,
                "max_retries": 10,
            }
        },
        "distill": {"model": "teacher"},
    }
    path = folder / "chaos.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def _run(config: Path, kill_at: int | None, server: MockServer) -> int | None:
    """Run turnstile; SIGKILL it once the server has seen ``kill_at`` requests."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "engine",
        "run",
        str(config),
        "--quiet",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    exited = asyncio.ensure_future(proc.wait())
    if kill_at is not None:
        reached = asyncio.ensure_future(server.wait_for_requests(kill_at))
        done, _ = await asyncio.wait({reached, exited}, return_when=asyncio.FIRST_COMPLETED)
        if reached in done:
            proc.send_signal(signal.SIGKILL)
        else:
            reached.cancel()
    assert proc.stderr is not None
    err = await proc.stderr.read()
    code = await exited
    if code not in (0, -signal.SIGKILL):
        raise RuntimeError(f"turnstile exited {code}: {err.decode()[-2000:]}")
    return code


def _rows(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


async def chaos(
    workdir: Path,
    *,
    turns: int,
    kills: int,
    seed: int = 1,
    cap: int = 16,
    timeout_s: float = 1.0,
) -> ChaosReport:
    """Run the chaos experiment in ``workdir``; returns what happened."""
    rng = random.Random(seed)
    source = workload(turns, seed)
    started = time.monotonic()
    async with MockServer() as server:
        clean = workdir / "clean"
        chaotic = workdir / "chaotic"
        for folder in (clean, chaotic):
            folder.mkdir(parents=True, exist_ok=True)
            with (folder / "in.jsonl").open("wb") as f:
                for row in source:
                    f.write(orjson.dumps(row) + b"\n")
        await _run(_config(clean, server.base_url, cap, timeout_s), None, server)
        expected = _rows(clean / "out.jsonl")

        server.reset()
        server.faults = Faults(seed=seed, retry_after_s=0.05, **CHAOS_FAULTS)
        config = _config(chaotic, server.base_url, cap, timeout_s)
        # Kill moments: spread over the run, counted in requests the server has seen.
        expected_requests = int(turns * 1.2)
        moments = sorted(rng.sample(range(turns // 20, expected_requests), kills))
        restarts = 0
        killed = 0
        for moment in moments:
            if server.stats.total_requests >= moment:
                continue
            code = await _run(config, moment, server)
            restarts += 1
            if code == -signal.SIGKILL:
                killed += 1
            else:
                break
        while await _run(config, None, server) != 0:
            restarts += 1
        stats = server.stats
        got = _rows(chaotic / "out.jsonl")

    want = {row["id"]: row for row in expected}
    seen: dict[str, int] = {}
    mismatched = 0
    for row in got:
        seen[row["id"]] = seen.get(row["id"], 0) + 1
        if row != want.get(row["id"]):
            mismatched += 1
    return ChaosReport(
        turns=turns,
        rows=len(source),
        kills=killed,
        restarts=restarts,
        requests=stats.total_requests,
        re_sent=sum(count - 1 for count in stats.requests_by_key.values() if count > 1),
        faults=dict(stats.faults),
        lost=sum(1 for key in want if key not in seen),
        duplicated=sum(count - 1 for count in seen.values() if count > 1),
        mismatched=mismatched,
        seconds=time.monotonic() - started,
    )


def markdown(report: ChaosReport, command: str) -> str:
    faults = ", ".join(f"{k} {v}" for k, v in sorted(report.faults.items()))
    return "\n".join(
        [
            "## Chaos: faults and repeated SIGKILLs",
            "",
            f"`{command}` ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores): "
            f"{report.turns} turns in {report.rows} conversations against the mock server "
            "injecting 5% 429 with Retry-After, 5% 500, 2% dropped connections, 1% malformed "
            "bodies and 1% hangs past the 1 s timeout; `turnstile run` SIGKILLed "
            f"{report.kills} times and restarted each time.",
            "",
            "| result | value |",
            "|---|---|",
            f"| rows equal to a fault-free run | {'yes' if report.exact else 'NO'} |",
            f"| rows lost / duplicated / different | {report.lost} / {report.duplicated} / "
            f"{report.mismatched} |",
            f"| requests sent (incl. retries) | {report.requests} |",
            f"| requests re-sent after kills and faults (same history twice) | {report.re_sent} |",
            f"| of which after the kills (re-sent minus faulted requests) | "
            f"{max(0, report.re_sent - sum(report.faults.values()))} |",
            f"| faults injected | {faults} |",
            f"| wall time | {report.seconds:.0f} s |",
            "",
            "Re-sent requests are the retries of faulted requests plus the turns in flight at "
            "each kill; no turn that had been journaled was requested again.",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__)
    parser.add_argument("--turns", type=int, default=10_000)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="turnstile-chaos-") as tmp:
        report = asyncio.run(chaos(Path(tmp), turns=args.turns, kills=args.kills, seed=args.seed))
    command = f"python -m bench.chaos --turns {args.turns} --kills {args.kills} --seed {args.seed}"
    text = markdown(report, command)
    print(text)  # the full suite (python -m bench) puts it in RESULTS.md with the others
    return 0 if report.exact else 1


if __name__ == "__main__":
    raise SystemExit(main())
