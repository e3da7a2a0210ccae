"""The samples of a run's history, parsed from ``<checkpoint_dir>/metrics.jsonl``.

One line per sample, as engine.history writes them. Reading is tolerant because the
file is a journal of a process that may have been killed: a torn last line, a line
that is not a sample and keys this version does not know are skipped, not errors,
so a report can always be drawn from what is there.

A day-long run's history is about 18,000 lines (10 MB); decoding them all takes
longer than the report may cost at the end of a run, and a page 1,000 pixels wide
shows no more than a few thousand points. So a reader may ask for about ``most``
samples: lines spread evenly over the file, every line that shows a replica out of
service (and the one after it), and the first and last line of every run (found by
bisection), which keeps rates exact, restarts and outages where they were.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import orjson

# Named tuples, not frozen dataclasses: as immutable and as readable, and made four times
# faster (a frozen dataclass sets each field through object.__setattr__), which is most
# of what reading a long history costs.


class ReplicaSample(NamedTuple):
    """One replica (a server of a model) at one sample."""

    url: str
    in_flight: float | None
    limit: float | None
    cap: float | None
    live: bool
    requests: float | None
    ok: float | None
    failures: float | None


class ModelSample(NamedTuple):
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
    reasoning_tokens: float | None = None  # part of completion_tokens (histories before: absent)
    cost_usd: float | None = None  # at the model's price, this run (None: no price, or older)
    cached: float | None = None  # answered from the reply cache, this run
    saved_usd: float | None = None  # what those would have cost


class Sample(NamedTuple):
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


def parse_series(data: bytes, most: int | None = None) -> list[Sample]:
    """The samples in the bytes of a history file, in file order.

    A line that does not parse (the torn last line of a killed run, above all) or is
    not a sample is skipped: one bad line must not cost the report of the rest. With
    ``most``, a file of more lines than that gives about ``most`` samples (the
    module's docstring says which).
    """
    if most is not None and _more_lines(data, most):
        return _Spread(data).samples(most)
    samples = []
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        sample = _parse_line(line)
        if sample is not None:
            samples.append(sample)
    return samples


def read_series(path: Path, most: int | None = None) -> list[Sample]:
    """The samples of the history at ``path``; none when there is no such file. Blocking."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    return parse_series(data, most)


def _more_lines(data: bytes, most: int) -> bool:
    """Whether ``data`` has more than ``most`` lines, looking no further than that."""
    position = -1
    for _ in range(most):
        position = data.find(b"\n", position + 1)
        if position < 0:
            return False
    return position + 1 < len(data)


def _parse_line(line: bytes) -> Sample | None:
    try:
        raw = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return parse_sample(raw)


# A replica out of service, as orjson writes it (no spaces): found with bytes.find over
# the whole file, so only those lines are decoded.
_OUT = b'"live":false'


class _Spread:
    """Some of the lines of one history file, decoded on demand by their offset."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.decoded: dict[int, Sample | None] = {}  # by the offset the line starts at

    def samples(self, most: int) -> list[Sample]:
        data = self.data
        size = len(data)
        starts = {self.start_of(size * i // most) for i in range(most)}
        # The first and the last line that decode (the last one may be torn).
        starts.add(next((s for s in self.forward(0, size) if self.sample(s) is not None), 0))
        starts.add(next((s for s in self.backward(size) if self.sample(s) is not None), 0))
        position = data.find(_OUT)
        while position >= 0:  # each line with a replica out, and the line after it
            start = self.start_of(position)
            end = self.end_of(start)
            starts.add(start)
            if end + 1 < len(data):
                starts.add(end + 1)
            position = data.find(_OUT, end)
        known = [start for start in sorted(starts) if self.sample(start) is not None]
        for a, b in itertools.pairwise(known):
            if self.run(a) != self.run(b):
                self.find_runs(a, b)
        return [sample for _, sample in sorted(self.decoded.items()) if sample is not None]

    def find_runs(self, a: int, b: int) -> None:
        """Decode the first and last line of every run between the lines at ``a`` and
        ``b`` (which belong to different runs): a run's lines are consecutive."""
        todo = [(a, b)]
        while todo:
            lo, hi = todo.pop()
            middle = self.between(lo, hi)
            if middle is None:
                continue  # adjacent: here one run ends and the next begins
            if self.run(middle) != self.run(lo):
                todo.append((lo, middle))
            if self.run(middle) != self.run(hi):
                todo.append((middle, hi))

    def between(self, lo: int, hi: int) -> int | None:
        """A sample's line strictly between the lines at ``lo`` and ``hi``, near the middle."""
        first = self.end_of(lo) + 1
        if first >= hi:
            return None
        middle = self.start_of((first + hi) // 2)
        if self.sample(middle) is not None:
            return middle
        # Not a sample (rare: only a killed run tears a line): any other line will do.
        return next((s for s in self.forward(first, hi) if self.sample(s) is not None), None)

    def forward(self, first: int, hi: int) -> Iterator[int]:
        """The starts of the lines from the one at ``first`` to before ``hi``."""
        while first < hi:
            yield first
            first = self.end_of(first) + 1

    def backward(self, end: int) -> Iterator[int]:
        """The starts of the lines before ``end``, last first."""
        while end > 0:
            start = self.start_of(end - 1)  # of the line that ends at (or holds) end - 1
            yield start
            end = start

    def start_of(self, position: int) -> int:
        return self.data.rfind(b"\n", 0, position) + 1

    def end_of(self, start: int) -> int:
        end = self.data.find(b"\n", start)
        return len(self.data) if end < 0 else end

    def sample(self, start: int) -> Sample | None:
        if start not in self.decoded:
            line = self.data[start : self.end_of(start)]
            self.decoded[start] = _parse_line(line) if line.strip() else None
        return self.decoded[start]

    def run(self, start: int) -> str:
        sample = self.decoded[start]
        assert sample is not None
        return sample.run


# By exact type, not isinstance: a bool (an int to isinstance) where a count belongs is
# not a count. Inline as ``v if type(v) in _NUMBER else None`` below, not a function: it
# runs for every field of every replica of every line read, the hot loop of a report.
_NUMBER = frozenset((int, float))
# Read by the names of the fields: a field added to a sample is read with no change here
# (a number; the few that are not are set apart below).
_MODELS, _SHARDS = Sample._fields.index("models"), Sample._fields.index("shards")
_REPLICAS = ModelSample._fields.index("replicas")


def parse_sample(raw: Any) -> Sample | None:
    """A sample from one decoded line, or None when it lacks its time or run id."""
    if type(raw) is not dict:
        return None
    get = raw.get
    t, run = get("t"), get("run")
    if type(t) not in _NUMBER or type(run) is not str:
        return None
    values: list[Any] = [v if type(v) in _NUMBER else None for v in map(get, Sample._fields)]
    models, shards = get("models"), get("shards")
    values[0] = float(values[0])  # t, a number by the check above
    values[1] = run
    values[_MODELS] = {
        str(name): _model(body)
        for name, body in (models.items() if type(models) is dict else ())
        if type(body) is dict
    }
    values[_SHARDS] = shards if type(shards) is str else None
    return Sample._make(values)  # in one step from a list: the fastest way to make one


def _model(body: dict[str, Any]) -> ModelSample:
    get = body.get
    values: list[Any] = [v if type(v) in _NUMBER else None for v in map(get, ModelSample._fields)]
    replicas = get("replicas")
    values[_REPLICAS] = tuple(_replicas(replicas if type(replicas) is list else ()))
    return ModelSample._make(values)


def _replicas(items: Iterable[Any]) -> Iterator[ReplicaSample]:
    number = _NUMBER
    for item in items:
        if type(item) is not dict or type(url := item.get("url")) is not str:
            continue
        get = item.get
        in_flight, limit, cap = get("in_flight"), get("limit"), get("cap")
        requests, ok, failures = get("requests"), get("ok"), get("failures")
        yield ReplicaSample(  # positional: the hot loop of a long history
            url,
            in_flight if type(in_flight) in number else None,
            limit if type(limit) in number else None,
            cap if type(cap) in number else None,
            get("live") is not False,  # a replica is out only when it says so
            requests if type(requests) in number else None,
            ok if type(ok) in number else None,
            failures if type(failures) in number else None,
        )
