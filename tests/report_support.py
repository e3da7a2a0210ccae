"""History lines for the report tests: single samples by hand, and a realistic run.

The lines have the shape engine.history writes (tests/test_report.py checks the
reader against it); ``realistic_history`` is a job that was stopped and resumed,
lost one of its two replicas for a while and failed some requests meanwhile.
"""

from __future__ import annotations

import math
import random
from typing import Any

import orjson

T0 = 1_796_357_872.0  # 2026-12-03, a fixed time: no test reads the clock
GPU1 = "http://gpu1:8000/v1"
GPU2 = "http://gpu2:8000/v1"


def replica(url: str, *, live: bool = True, in_flight: int = 0, cap: int = 16) -> dict[str, Any]:
    return {
        "url": url,
        "in_flight": in_flight,
        "limit": None,
        "cap": cap,
        "live": live,
        "requests": 0,
        "ok": 0,
        "failures": 0,
    }


def model(
    *,
    requests: int = 0,
    retries: int = 0,
    failures: int = 0,
    prompt: int = 0,
    completion: int = 0,
    in_flight: int = 0,
    limit: int | None = None,
    cap: int = 32,
    p50: float | None = None,
    p95: float | None = None,
    replicas: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "requests": requests,
        "ok": requests - failures,
        "retries": retries,
        "resent": 0,
        "failures": failures,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "in_flight": in_flight,
        "limit": limit,
        "cap": cap,
        "p50": p50,
        "p95": p95,
        "replicas": replicas or [],
    }


def line(
    t: float, run: str, *, turns: int = 0, rows_ok: int = 0, **models: dict[str, Any]
) -> dict[str, Any]:
    return {
        "v": 1,
        "t": t,
        "run": run,
        "step": 1.0,
        "rows_ok": rows_ok,
        "rows_failed": 0,
        "rows_filtered": 0,
        "rows_total": 1000,
        "turns": turns,
        "models": models,
    }


def encode(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(item) + b"\n" for item in lines)


def realistic_history(samples: int = 400, *, seed: int = 7) -> list[dict[str, Any]]:
    """Two runs (stopped at 55%, resumed two minutes later) of a 2-replica teacher, with
    gpu2 out for a stretch of the first run; one sample a second."""
    rng = random.Random(seed)
    stop = int(samples * 0.55)
    out_from, out_to = int(samples * 0.2), int(samples * 0.3)
    lines: list[dict[str, Any]] = []
    rows = 0
    runs = (("20261203T000000Z-100", 0, stop, 0.0), ("20261203T001100Z-200", stop, samples, 120.0))
    for run, first, last, pause in runs:
        turns = requests = retries = failures = prompt = completion = 0
        for i in range(first, last):
            t = T0 + i + pause
            gpu2_live = not out_from <= i < out_to
            live = 2 if gpu2_live else 1
            finished = rng.randint(8, 12) * live // 2
            turns += finished
            rows += finished // 3
            requests += finished + (0 if gpu2_live else rng.randint(2, 5))
            retries += 0 if gpu2_live else rng.randint(2, 5)
            failures += rng.random() < (0.05 if gpu2_live else 0.4)
            prompt += finished * rng.randint(70, 90)
            completion += finished * rng.randint(140, 170)
            wave = 1 + 0.3 * math.sin(i / 25)
            gpu2_flight = rng.randint(12, 16) if gpu2_live else 0
            lines.append(
                line(
                    t,
                    run,
                    turns=turns,
                    rows_ok=rows,
                    teacher=model(
                        requests=requests,
                        retries=retries,
                        failures=failures,
                        prompt=prompt,
                        completion=completion,
                        in_flight=min(16 * live, rng.randint(12, 16) * live),
                        limit=None if gpu2_live else 16,
                        cap=32,
                        p50=round(0.8 * wave + rng.random() * 0.1, 3),
                        p95=round(2.6 * wave + rng.random() * 0.6, 3),
                        replicas=[
                            replica(GPU1, in_flight=rng.randint(12, 16)),
                            replica(GPU2, live=gpu2_live, in_flight=gpu2_flight),
                        ],
                    ),
                )
            )
    return lines
