"""What watching a run costs: ``turnstile run`` at 0 ms with metrics off and on, side by side.

0 ms latency, cap 64, single-turn: the client's CPU is the only limit, so any cost of
metrics shows in full. *Metrics on* serves them on a port (``metrics.port``) and a
scraper fetches ``/metrics`` every second for the whole run, as Prometheus would;
both runs keep the history (metrics.jsonl, always on). Interleaved repeats.
"""

from __future__ import annotations

import socket
import threading
import urllib.request
from typing import Any

import orjson

from bench import workloads
from bench.mockserver import MockProcess
from bench.plan import Plan
from bench.report import Section, Target, median, pct, systems_table
from bench.runners import (
    Result,
    RunFolder,
    measure,
    parse_turnstile,
    turnstile_cmd,
    turnstile_config,
)
from bench.throughput import INPUTS, LOGS, interleave
from bench.workloads import SINGLE

OFF, ON = "metrics off", "metrics on, scraped every 1 s"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Scraper(threading.Thread):
    """GET /metrics every second until stopped; counts the scrapes that answered."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.stop = threading.Event()
        self.scrapes = 0

    def run(self) -> None:
        while not self.stop.wait(1.0):
            try:
                with urllib.request.urlopen(self.url, timeout=2) as response:
                    response.read()
                self.scrapes += 1
            except OSError:
                pass  # not serving yet, or already gone


def _run(mock: MockProcess, wl: workloads.Workload, cap: int, metrics: bool) -> Result:
    with RunFolder("metrics") as folder:
        path = turnstile_config(folder, mock.url, wl, cap=cap)
        scraper = None
        if metrics:
            port = _free_port()
            config: dict[str, Any] = orjson.loads(path.read_bytes())
            config["metrics"] = {"port": port}
            path.write_bytes(orjson.dumps(config))
            scraper = _Scraper(f"http://127.0.0.1:{port}/metrics")
            scraper.start()
        try:
            result = measure(
                ON if metrics else OFF,
                f"single 0ms cap {cap}",
                turnstile_cmd(path),
                folder,
                mock,
                timeout_s=900,
                parse=parse_turnstile,
                rows_out=folder / "out" / "distilled.jsonl",
            )
        finally:
            if scraper is not None:
                scraper.stop.set()
                scraper.join()
        if scraper is not None:
            result.extra["scrapes"] = scraper.scrapes
        return result


def metrics_cost(plan: Plan) -> Section:
    results: dict[str, list[Result]] = {}
    with MockProcess(0, LOGS) as mock:
        wl = workloads.make(SINGLE, plan.caps_zero_turns, INPUTS)
        runs = {OFF: lambda: _run(mock, wl, 64, False), ON: lambda: _run(mock, wl, 64, True)}
        interleave(plan.caps_repeats + 2, runs, results)
    ratios = [
        on.rate_steady / off.rate_steady
        for off, on in zip(results[OFF], results[ON], strict=False)
        if off.rate_steady
    ]
    section = Section("metrics_cost", "13. Watching a run: the cost of metrics at 0 ms")
    section.lines += [
        f"{plan.caps_zero_turns:,} single-turn rows, mock at 0 ms, cap 64, "
        f"{plan.caps_repeats + 2} interleaved repeats; the history (metrics.jsonl) is written "
        "in both. *Metrics on*: `metrics.port` set and `/metrics` fetched every second.",
        "",
        *systems_table(
            results,
            "steady turns/s",
            [("scrapes", lambda rs: ", ".join(str(r.extra.get("scrapes", "-")) for r in rs))],
        ),
    ]
    section.targets.append(
        Target(
            "15.1 metrics on: steady requests/s against metrics off (0 ms, cap 64)",
            ">= 98%",
            pct(ratios),
            median(ratios) >= 0.98 if ratios else None,
        )
    )
    section.data = {s: [r.as_dict() for r in rs] for s, rs in results.items()}
    return section
