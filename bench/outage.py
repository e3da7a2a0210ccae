"""An outage of every replica in the middle of a run, seen from the servers' side.

Two mock processes serve one model; once a third of the expected requests have
arrived both are SIGKILLed, and ``outage_s`` later started again on the same ports.
The run is left to finish on its own; the bench driver samples the mocks' counters
every 0.5 s for turns/s over time (plotted by ``report.plot_outage``), and checks
every output row against the mock's deterministic replies.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import orjson

from bench import workloads
from bench.mockserver import MockGroup, MockProcess
from bench.plan import Plan
from bench.replicas import MODEL, mock_processes, run_on, summary_facts
from bench.report import Section, Target, table
from bench.runners import Result, count_lines
from bench.throughput import INPUTS, log
from bench.workloads import MULTI, Workload
from engine.testing.mock_server import reply_for


class _Sampler(threading.Thread):
    """Replies served by every replica so far, every ``every_s``, as (time, total).

    A restarted mock counts from 0 again: its earlier count is carried over. The
    lock is the outage driver's, so no sample straddles a kill or a restart; the
    driver takes one itself just before the kill, so nothing served is missed.
    """

    def __init__(self, mocks: list[MockProcess], lock: threading.RLock, every_s: float) -> None:
        super().__init__(daemon=True)
        self.mocks = mocks
        self.lock = lock
        self.every_s = every_s
        self.t0 = time.time()
        self.points: list[tuple[float, int]] = []
        self.stop = threading.Event()
        self._last: dict[int, tuple[int, int]] = {}  # mock -> (pid, completed)
        self._carried = [0] * len(mocks)

    def sample(self) -> None:
        with self.lock:
            now = time.time()
            for i, mock in enumerate(self.mocks):
                if not mock.running:
                    continue
                try:
                    done = int(mock.stats()["completed"])
                except OSError:
                    continue
                pid, before = self._last.get(i, (mock.pid, 0))
                if pid != mock.pid:
                    self._carried[i] += before
                self._last[i] = (mock.pid, done)
            total = sum(self._carried) + sum(done for _, done in self._last.values())
            self.points.append((now - self.t0, total))

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.every_s)


def _check_rows(wl: Workload, output: Path) -> dict[str, int]:
    """Rows whose every reply is the mock's deterministic one for the history before it,
    with the input's user messages, each followed by its reply (the every_user rule)."""
    users: dict[str, list[str]] = {}
    with wl.path.open("rb") as f:
        for line in f:
            row = orjson.loads(line)
            users[row["id"]] = [m["content"] for m in row["messages"] if m["role"] == "user"]
    rows = exact = 0
    ids: set[str] = set()
    if not output.exists():  # the run failed: failed_runs says so
        output = Path("/dev/null")
    with output.open("rb") as f:
        for line in f:
            row = orjson.loads(line)
            rows += 1
            ids.add(row["id"])
            messages = row["messages"]
            ok = [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
            ok = ok and [m["content"] for m in messages[::2]] == users.get(row["id"])
            ok = ok and all(
                messages[j]["content"] == reply_for(MODEL, messages[:j])
                for j in range(1, len(messages), 2)
            )
            exact += ok
    return {"rows": rows, "exact": exact, "distinct": len(ids), "expected": len(users)}


def outage(plan: Plan, section: Section) -> list[Result]:
    cap, latency, n = plan.replica_cap, plan.replica_latency_ms, 2
    wl = workloads.make(MULTI, workloads.rows_for_turns(MULTI, plan.outage_turns), INPUTS)
    lock = threading.RLock()
    marks: dict[str, float] = {}
    with mock_processes(n, latency) as mocks:
        group = MockGroup(mocks)
        sampler = _Sampler(mocks, lock, 0.5)

        def drive(proc: Any) -> None:
            # A third of the expected requests, half of them at each replica.
            for mock in mocks:
                while proc.returncode is None:
                    try:
                        mock.wait_requests(wl.turns // (3 * n), timeout_s=1.0)
                        break
                    except OSError:
                        continue
            if proc.returncode is not None:
                return
            with lock:
                sampler.sample()
                marks["first"] = group.stats()["first_arrival"]
                marks["kill"] = time.time()
                for mock in mocks:
                    mock.kill()
            log(f"outage: both replicas SIGKILLed, back in {plan.outage_s:g} s")
            time.sleep(plan.outage_s)
            with lock:
                for mock in mocks:
                    mock.restart()
                marks["back"] = time.time()

        def inspect(folder: Path) -> dict[str, Any]:
            facts = summary_facts(folder)
            facts.update(_check_rows(wl, folder / "out" / "distilled.jsonl"))
            facts["failed_rows"] = count_lines(folder / "out" / "distilled.failed.jsonl")
            return facts

        sampler.start()
        try:
            result = run_on(group, wl, cap=cap, label="outage", watch=drive, inspect=inspect)
        finally:
            sampler.stop.set()
            sampler.join()
        sampler.sample()
        after = group.stats()  # the restarted processes: their first arrival is the resumption
    log(
        f"outage run: rc={result.rc} wall {result.wall_s:.1f}s rows "
        f"{result.extra.get('exact')}/{wl.rows} exact"
    )
    t0 = sampler.t0
    kill = marks.get("kill", float("nan")) - t0
    back = marks.get("back", float("nan")) - t0
    resumed = (after["first_arrival"] or float("nan")) - t0
    points = sampler.points
    # Replies served up to the kill (the driver's own sample just before it), and those
    # served by the restarted processes, over their serving windows.
    at_kill = max((n for t, n in points if t <= kill), default=0)
    first = marks.get("first") or float("nan")
    rate_before = at_kill / (marks.get("kill", float("nan")) - first)
    served_after = points[-1][1] - at_kill if points else 0
    rate_after = served_after / ((after["last_done"] or float("nan")) - t0 - resumed)
    x = result.extra
    facts = [
        ["exit code", result.rc],
        [
            "rows written / expected",
            f"{x.get('rows', 0):,} / {wl.rows:,} ({x.get('distinct', 0):,} distinct ids)",
        ],
        [
            "rows exact (every reply = `reply_for` of its history, user turns as input)",
            f"{x.get('exact', 0):,}",
        ],
        ["failed rows", x.get("failed_rows")],
        ["both mocks SIGKILLed at", f"{kill:.1f} s (after a third of the requests)"],
        ["restarted on the same ports at", f"{back:.1f} s"],
        ["first request after the restart", f"{resumed:.1f} s ({resumed - back:.2f} s after)"],
        ["turns/s before the outage / after it", f"{rate_before:,.0f} / {rate_after:,.0f}"],
        ["run wall time", f"{result.wall_s:.1f} s"],
        ["summary, per replica", "<br>".join(f"`{line}`" for line in x.get("replica_lines", []))],
        ["summary, outages", "<br>".join(f"`{line.strip()}`" for line in x.get("outages", []))],
    ]
    section.lines += [
        f"**Outage.** {wl.label}, 2 replicas at {latency:g} ms, cap {cap} each. After a third "
        f"of the expected requests (`GET /wait?requests={wl.turns // (3 * n)}` at each mock) "
        f"both mock processes are SIGKILLed, and {plan.outage_s:g} s later started again on "
        "the same ports; the run is left to finish on its own. Turns/s over time is sampled "
        "from the bench driver: each mock's `/stats` `completed` every 0.5 s (a restarted "
        "mock's count carried over), so it counts replies as the servers sent them; replies "
        "lost at the kill are not in it.",
        "",
        *table(["measure", "value"], facts),
        "",
        "![turns/s over time, both replicas killed and restarted](outage.png)",
        "",
    ]
    rows_ok = (
        x.get("exact") == wl.rows and x.get("rows") == wl.rows and x.get("distinct") == wl.rows
    )
    section.targets += [
        Target(
            f"8. replicas, {plan.outage_s:g} s outage of both replicas: exit code, rows, failures",
            "exit 0, every row exact, 0 failed",
            f"exit {result.rc}, {x.get('exact', 0):,}/{wl.rows:,} rows exact, "
            f"{x.get('failed_rows')} failed",
            result.rc == 0 and rows_ok and x.get("failed_rows") == 0,
        ),
        Target(
            "8. replicas, outage: as the summary printed it",
            "every replica's outage listed",
            "; ".join(line.strip() for line in x.get("outages", [])) or "none",
            len(x.get("outages", [])) == n,
        ),
        Target(
            "8. replicas, outage: first request after the servers are back",
            "<= 2.5 s (probes every <= 2 s)",
            f"{resumed - back:.2f} s",
            resumed - back <= 2.5,
        ),
    ]
    section.data["outage"] = {
        "run": result.as_dict(),
        "points": points,
        "kill_s": kill,
        "back_s": back,
        "resumed_s": resumed,
        "outage_s": plan.outage_s,
        "label": wl.label,
    }
    return [result]
