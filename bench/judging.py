"""Judging: what a pairwise judge in both orders costs, against the UltraFeedback judge.

The same rows (a prompt and two answers each, brought by the input: the judge alone
runs) are judged three ways on the mock server: ``judge_format: ultrafeedback`` (one
request rates both answers), ``pairwise`` with ``swap: true`` (each pair in both
orders) and ``pairwise`` with ``swap: false``. Reported: judge requests per pair,
counted by the server (with swap it must be exactly 2), and rows judged per second
in the server's window, interleaved repeats. The mock answers after ``LATENCY_MS``
with judge cap ``CAP``, so a judge's rate is its requests per row against the cap,
as against a real server; at 0 ms it would be the client's CPU per request instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from bench.mockserver import MockProcess
from bench.plan import Plan
from bench.report import Section, Target, median, pct, spread, table
from bench.runners import Result, RunFolder, measure, parse_turnstile, turnstile_cmd
from bench.throughput import INPUTS, LOGS, interleave

LATENCY_MS = 20.0
CAP = 32
FORMATS: dict[str, dict[str, Any]] = {
    "ultrafeedback (1 request rates both)": {"judge_format": "ultrafeedback"},
    "pairwise, swap: true": {"judge_format": "pairwise", "pairwise": {"swap": True}},
    "pairwise, swap: false": {"judge_format": "pairwise", "pairwise": {"swap": False}},
}
REFERENCE = "ultrafeedback (1 request rates both)"
SWAPPED = "pairwise, swap: true"


def _input(rows: int) -> Path:
    path = INPUTS / f"judging-{rows}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            for i in range(rows):
                row = {
                    "id": f"j{i}",
                    "prompt": f"Explain idea number {i} in two sentences.",
                    "generations": [
                        f"A first answer to idea {i}: it is about this and that.",
                        f"A second answer to idea {i}, worded differently, a little longer.",
                    ],
                }
                f.write(orjson.dumps(row) + b"\n")
    return path


def _run(mock: MockProcess, data: Path, name: str, fields: dict[str, Any]) -> Result:
    with RunFolder("judging") as folder:
        config = {
            "task": "preference",
            "input": str(data),
            "output": "out/prefs.jsonl",
            "checkpoint_dir": "ck",
            "models": {
                "judge": {
                    "base_url": mock.url,
                    "model": "judge",
                    "max_concurrency": CAP,
                    "timeout_s": 120,
                }
            },
            "preference": {"generators": [], "judge": "judge", **fields},
            "progress_interval_s": 3600,
        }
        path = folder / "run.yaml"
        path.write_bytes(orjson.dumps(config))
        output = folder / "out" / "prefs.jsonl"
        result = measure(
            name,
            f"{LATENCY_MS:g} ms cap {CAP}",
            turnstile_cmd(path),
            folder,
            mock,
            timeout_s=1800,
            parse=parse_turnstile,
            rows_out=output,
        )
        paired = 0
        if output.exists():
            for line in output.read_bytes().splitlines():
                paired += orjson.loads(line).get("chosen") is not None
        result.extra["paired"] = paired
        return result


def _rows_per_s(r: Result) -> float:
    return r.rows_out / r.window_s if r.window_s else float("nan")


def judging(plan: Plan) -> Section:
    rows = 1_000 if plan.quick else 5_000
    repeats = 2 if plan.quick else 3
    data = _input(rows)
    results: dict[str, list[Result]] = {}
    with MockProcess(LATENCY_MS, LOGS, name="-judging") as mock:
        runs = {
            name: (lambda name=name, fields=fields: _run(mock, data, name, fields))
            for name, fields in FORMATS.items()
        }
        interleave(repeats, runs, results)
    per_pair = {
        name: [r.served / r.rows_out for r in rs if r.rows_out] for name, rs in results.items()
    }
    ratio = [
        _rows_per_s(s) / _rows_per_s(u)
        for s, u in zip(results[SWAPPED], results[REFERENCE], strict=False)
        if _rows_per_s(u)
    ]
    section = Section("judging", "Judging: pairwise in both orders against UltraFeedback")
    section.lines += [
        f"{rows:,} rows, each a prompt and two answers the input brings (the judge alone "
        f"runs); the mock answers after {LATENCY_MS:g} ms, judge cap {CAP}; "
        f"{repeats} interleaved repeats. Requests per pair are the server's count of "
        "replies over rows written.",
        "",
        *table(
            [
                "judge",
                "judge requests / pair",
                "rows judged / s",
                "requests / s",
                "rows paired",
                "client CPU us / request",
            ],
            [
                [
                    name,
                    spread(per_pair[name], "{:.3f}"),
                    spread([_rows_per_s(r) for r in rs]),
                    spread([r.rate_steady for r in rs]),
                    spread([r.extra.get("paired", 0) for r in rs]),
                    spread([r.cpu_us_per_request for r in rs]),
                ]
                for name, rs in results.items()
            ],
        ),
        "",
        "With swap every pair costs two requests against UltraFeedback's one, so at the "
        "same cap it judges rows at about half the rate; the mock's judge has no position "
        "bias here, so every pair is kept (tests/test_pairwise_run.py measures the "
        "correction with a biased one).",
    ]
    swapped = per_pair[SWAPPED]
    section.targets.append(
        Target(
            "pairwise with swap: judge requests per pair",
            "exactly 2",
            spread(swapped, "{:.3f}"),
            bool(swapped) and all(v == 2.0 for v in swapped),
        )
    )
    section.targets.append(
        Target(
            "pairwise with swap: rows judged/s against ultrafeedback on the same rows",
            "reported (about 50%: twice the requests)",
            pct(ratio),
            None if not ratio else median(ratio) > 0,
        )
    )
    return section
