"""The samples of a run's history, parsed from ``<checkpoint_dir>/metrics.jsonl``.

One line per sample, as engine.history writes them. Reading is tolerant because the
file is a journal of a process that may have been killed: a torn last line, a line
that is not a sample and keys this version does not know are skipped, not errors,
so a report can always be drawn from what is there.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson


@dataclass(frozen=True, slots=True)
class ReplicaSample:
    """One replica (a server of a model) at one sample."""

    url: str
    in_flight: float | None
    limit: float | None
    cap: float | None
    live: bool
    requests: float | None
    ok: float | None
    failures: float | None


@dataclass(frozen=True, slots=True)
class ModelSample:
    """One model at one sample: counters cumulative within the run, gauges as of now."""

    requests: float | None
    ok: float | None
    retries: float | None
    resent: float | None
    failures: float | None
    prompt_tokens: float | None
    completion_tokens: float | None
    in_flight: float | None
    limit: float | None
    cap: float | None
    p50: float | None  # latency of the requests finished since the previous sample
    p95: float | None
    replicas: tuple[ReplicaSample, ...]


@dataclass(frozen=True, slots=True)
class Sample:
    """One line of the history: the whole job's rows, this run's turns and models."""

    t: float  # unix time
    run: str  # the process run; a resume starts a new one and its counters from zero
    step: float | None
    rows_ok: float | None  # rows_* cover the whole job, earlier runs included
    rows_failed: float | None
    rows_filtered: float | None
    rows_total: float | None
    turns: float | None  # replies journaled by this run
    models: Mapping[str, ModelSample]
    shards: str | None = None


def parse_series(data: bytes) -> list[Sample]:
    """The samples in the bytes of a history file, in file order.

    A line that does not parse (the torn last line of a killed run, above all) or is
    not a sample is skipped: one bad line must not cost the report of the rest.
    """
    samples = []
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            raw = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        sample = parse_sample(raw)
        if sample is not None:
            samples.append(sample)
    return samples


def read_series(path: Path) -> list[Sample]:
    """The samples of the history at ``path``; none when there is no such file. Blocking."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    return parse_series(data)


def parse_sample(raw: Any) -> Sample | None:
    """A sample from one decoded line, or None when it lacks its time or run id."""
    if not isinstance(raw, Mapping):
        return None
    t = _number(raw.get("t"))
    run = raw.get("run")
    if t is None or not isinstance(run, str):
        return None
    models = raw.get("models")
    shards = raw.get("shards")
    return Sample(
        t=t,
        run=run,
        step=_number(raw.get("step")),
        rows_ok=_number(raw.get("rows_ok")),
        rows_failed=_number(raw.get("rows_failed")),
        rows_filtered=_number(raw.get("rows_filtered")),
        rows_total=_number(raw.get("rows_total")),
        turns=_number(raw.get("turns")),
        models={
            str(name): _model(body)
            for name, body in (models.items() if isinstance(models, Mapping) else ())
            if isinstance(body, Mapping)
        },
        shards=shards if isinstance(shards, str) else None,
    )


def _model(body: Mapping[str, Any]) -> ModelSample:
    replicas = body.get("replicas")
    return ModelSample(
        requests=_number(body.get("requests")),
        ok=_number(body.get("ok")),
        retries=_number(body.get("retries")),
        resent=_number(body.get("resent")),
        failures=_number(body.get("failures")),
        prompt_tokens=_number(body.get("prompt_tokens")),
        completion_tokens=_number(body.get("completion_tokens")),
        in_flight=_number(body.get("in_flight")),
        limit=_number(body.get("limit")),
        cap=_number(body.get("cap")),
        p50=_number(body.get("p50")),
        p95=_number(body.get("p95")),
        replicas=tuple(_replicas(replicas if isinstance(replicas, list) else ())),
    )


def _replicas(items: Iterable[Any]) -> Iterable[ReplicaSample]:
    number = _number
    for item in items:
        if not isinstance(item, dict) or type(url := item.get("url")) is not str:
            continue
        get = item.get
        yield ReplicaSample(  # positional: the hot loop of a long history
            url,
            number(get("in_flight")),
            number(get("limit")),
            number(get("cap")),
            get("live") is not False,  # a replica is out only when it says so
            number(get("requests")),
            number(get("ok")),
            number(get("failures")),
        )


def _number(value: Any) -> float | None:
    # By exact type, not isinstance: this runs for every field of every replica of every
    # line, and a bool (an int to isinstance) where a count belongs is not a count.
    kind = type(value)
    if kind is float:
        return value  # type: ignore[no-any-return]
    if kind is int:
        return float(value)
    return None
