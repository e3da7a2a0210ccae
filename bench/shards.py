"""Past one machine: 1 against 2 shards on a local Ray cluster, and what Ray's start-up costs.

Single-turn rows at 0 ms and cap ``shards_cap`` (the client's CPU is the only
limit), three systems interleaved: ``turnstile run`` as one process (``executor:
local``), and ``executor: ray`` with 1 and with 2 shards, each run starting its own
local Ray cluster on 127.0.0.1 and stopping it. On two cores, two shards are how a
single big machine's cores are used too. *Start-up* is process start to the mock's
first request; the difference between a Ray run's and the local run's is Ray's cost
(cluster start, the actor, shipping the task). *Steady* is the mock's serving window.

Ray probes public addresses unless it runs in a loopback-only network namespace, so
when this process is not in one, the measuring half runs again under
``unshare --net`` (``python -m bench.shards OUT.json``) and its results come back as
JSON.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson

from bench import workloads
from bench.mockserver import MockProcess
from bench.plan import FULL, QUICK, Plan
from bench.report import Section, Target, median, spread, table
from bench.runners import (
    WORK,
    Result,
    RunFolder,
    measure,
    parse_turnstile,
    turnstile_cmd,
    turnstile_config,
)
from bench.throughput import INPUTS, LOGS, interleave
from bench.workloads import SINGLE

LOCAL, RAY1, RAY2 = "turnstile (local)", "ray, 1 shard", "ray, 2 shards"


def isolated() -> bool:
    """Whether this process's network namespace has only the loopback interface."""
    return [name for _, name in socket.if_nameindex()] == ["lo"]


def shards(plan: Plan) -> Section:
    if isolated():
        data = measure_all(plan)
    else:
        out = WORK / "shards.json"
        inner = f"ip link set lo up && exec {sys.executable} -m bench.shards {out}"
        args = ["--quick"] if plan.quick else []
        done = subprocess.run(
            ["unshare", "--net", "sh", "-c", " ".join([inner, *args])], check=False
        )
        if done.returncode != 0 or not out.exists():
            section = Section("shards", "12. Sharded runs on Ray: 1 against 2 shards")
            section.lines.append(f"Not measured: the run under unshare exited {done.returncode}.")
            return section
        data = orjson.loads(out.read_bytes())
    return render(plan, data)


def measure_all(plan: Plan) -> dict[str, Any]:
    if shutil.which("ray") is None and not (Path(sys.executable).parent / "ray").exists():
        raise SystemExit("Ray is not installed: pip install -e '.[ray]'")
    results: dict[str, list[Result]] = {}
    with MockProcess(0, LOGS) as mock:
        wl = workloads.make(SINGLE, plan.shard_rows, INPUTS)
        runs = {
            LOCAL: lambda: _run(mock, wl, plan.shard_cap, None),
            RAY1: lambda: _run(mock, wl, plan.shard_cap, 1),
            RAY2: lambda: _run(mock, wl, plan.shard_cap, 2),
        }
        interleave(plan.shard_repeats, runs, results)
    return {system: [r.as_dict() for r in rs] for system, rs in results.items()}


def _run(mock: MockProcess, wl: workloads.Workload, cap: int, shard_count: int | None) -> Result:
    system = LOCAL if shard_count is None else (RAY1 if shard_count == 1 else RAY2)
    with RunFolder("shards") as folder:
        config_path = turnstile_config(folder, mock.url, wl, cap=cap)
        if shard_count is not None:
            config = orjson.loads(config_path.read_bytes())
            config["executor"] = {"kind": "ray", "shards": shard_count}
            config_path.write_bytes(orjson.dumps(config))
        return measure(
            system,
            f"single 0ms cap {cap}",
            turnstile_cmd(config_path),
            folder,
            mock,
            timeout_s=900,
            parse=parse_turnstile,
            rows_out=folder / "out" / "distilled.jsonl",
        )


def render(plan: Plan, data: dict[str, Any]) -> Section:
    results = {system: [Result.from_dict(r) for r in rs] for system, rs in data.items()}
    section = Section("shards", "12. Sharded runs on Ray: 1 against 2 shards, and Ray's start-up")
    rows = []
    for system, rs in results.items():
        rows.append(
            [
                system,
                spread([r.rate_steady for r in rs]),
                spread([r.to_first_request_s or float("nan") for r in rs], "{:.2f}"),
                spread([r.wall_s for r in rs], "{:.1f}"),
                spread([r.server_busy for r in rs], "{:.0%}"),
                f"{sum(r.ok for r in rs)}/{len(rs)}",
            ]
        )
    local = results.get(LOCAL, [])
    one = results.get(RAY1, [])
    two = results.get(RAY2, [])
    speedup = [
        b.rate_steady / a.rate_steady for a, b in zip(one, two, strict=False) if a.rate_steady
    ]
    startup = [
        (r.to_first_request_s or 0) - (base.to_first_request_s or 0)
        for r, base in zip(one, local, strict=False)
    ]
    section.lines += [
        f"{plan.shard_rows:,} single-turn rows, mock at 0 ms, cap {plan.shard_cap} (the whole "
        f"run's, shared by its shards), {plan.shard_repeats} interleaved repeats; every Ray run "
        "starts its own local cluster on 127.0.0.1 and stops it. Inside a loopback-only "
        "network namespace.",
        "",
        *table(
            [
                "system",
                "steady turns/s",
                "start to first request s",
                "wall s",
                "mock server busy",
                "ok",
            ],
            rows,
        ),
        "",
        "Read with care: this machine has two cores, and at 0 ms the mock server takes two "
        "thirds of one (*mock server busy*) while one shard takes the rest: the machine is "
        "full with one shard, so a second has nothing to add here. What the table does show: "
        "the shards together hold the cap and the rate of a single process, and what Ray's "
        "start-up costs (cluster, quota actor, shipping the task) before the first request. "
        "With the servers on other machines, as in a real run, each shard is a process on a "
        "core of its own.",
    ]
    section.targets += [
        Target(
            "14.9 two shards against one, steady turns/s (2 cores)",
            "reported",
            f"x{median(speedup):.2f}" if speedup else "n/a",
            None,
        ),
        Target(
            "14.9 Ray's start-up cost (first request, ray 1 shard - local)",
            "reported",
            f"{median(startup):.1f} s" if startup else "n/a",
            None,
        ),
    ]
    section.data = data
    return section


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    plan = QUICK if "--quick" in argv else FULL
    out.write_bytes(orjson.dumps(measure_all(plan)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
