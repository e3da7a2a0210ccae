"""The samples of a run's history, parsed from ``<checkpoint_dir>/metrics.jsonl``.

One line per sample, as engine.history writes them. Reading is tolerant because the
file is a journal of a process that may have been killed: a torn last line, a line
that is not a sample and keys this version does not know are skipped, not errors,
so a report can always be drawn from what is there.

A day-long run's history is about 18,000 lines (12 MB); decoding them all takes
longer than the report may cost at the end of a run, and a page 1,000 pixels wide
shows no more than a few thousand points. So a reader may ask for about ``most``
samples: lines spread evenly over the file, the first and last line of every run,
and every line where a replica goes out of service or comes back, which keeps rates
exact, restarts and outages where they were. Both are found by bisection between the
lines read: a run's lines are consecutive, and each replica's ``out`` counter (how
many of its run's samples so far found it out) says whether the lines between two
read were all live, all out, or some of each. A history written before the counters
is searched for its out lines instead (each decoded, and the line after it).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
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
    out: float | None = None  # of this run's samples so far, those it was out (older: absent)


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


# A replica out of service, as orjson writes it (no spaces): in a history written before
# the replicas' ``out`` counters, found with bytes.find, so only those lines are decoded.
_OUT = b'"live":false'

# Per replica of a sample: (model, url, samples out so far this run, live).
_Outs = list[tuple[str, str, float | None, bool]]


class _Spread:
    """Some of the lines of one history file, decoded on demand by their offset."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.decoded: dict[int, Sample | None] = {}  # by the offset the line starts at

    def samples(self, most: int) -> list[Sample]:
        data = self.data
        size = len(data)
        for i in range(most):
            self.sample(self.start_of(size * i // most))
        # The first and the last line that decode (the last one may be torn).
        next((s for s in self.forward(0, size) if self.sample(s) is not None), 0)
        next((s for s in self.backward(size) if self.sample(s) is not None), 0)
        for a, b in itertools.pairwise(self.known()):
            if self.run(a) != self.run(b):
                self.find_runs(a, b)
        known = self.known()
        counts = [self.counts(start) for start in known]
        for (a, before), (b, after) in itertools.pairwise(zip(known, counts, strict=True)):
            if not _all_live_between(before, after):
                self.find_outages(a, b)
        return [sample for _, sample in sorted(self.decoded.items()) if sample is not None]

    def known(self) -> list[int]:
        """The starts of the lines decoded so far that are samples, in file order."""
        return [start for start, sample in sorted(self.decoded.items()) if sample is not None]

    def find_outages(self, a: int, b: int) -> None:
        """Decode every line between the samples at ``a`` and ``b`` where a replica
        goes out of service or comes back: each first line seen out, and each first
        seen live again (so an outage is drawn from its first to its last second)."""
        todo = [(a, b)]
        while todo:
            lo, hi = todo.pop()
            split = self.outage_split(lo, hi)
            if split is not None:
                todo += [(lo, split), (split, hi)]

    def outage_split(self, lo: int, hi: int) -> int | None:
        """A sample's line between those at ``lo`` and ``hi`` that tells more of the
        outages there, or None when every replica's state between them is known.

        The replicas' ``out`` counters say how many lines between were out: none or
        all of them (a state known throughout: what is left to find is where it
        began, the line after ``lo``), or some (look in the middle). A history
        without the counters is searched for its out lines instead."""
        first = self.end_of(lo) + 1
        if first >= hi or self.run(lo) != self.run(hi):
            return None  # adjacent, or runs apart with nothing readable between
        if _all_live_between(self.counts(lo), self.counts(hi)):
            return None
        before, after = self.outs(lo), self.outs(hi)
        if any(out is None for _, _, out, _ in before + after):
            self.search_outages(first, hi)
            return None
        if [key[:2] for key in before] != [key[:2] for key in after]:
            return self.between(lo, hi)  # the replicas changed in between: look closer
        lines = None
        changes_after_lo = False
        for (_, _, count_lo, live_lo), (_, _, count_hi, live_hi) in zip(before, after, strict=True):
            assert count_lo is not None and count_hi is not None
            out_between = count_hi - count_lo - (not live_hi)
            if out_between == 0 and live_lo:
                continue  # live throughout
            if lines is None:
                lines = self.data.count(b"\n", first, hi)
            if out_between not in (0, lines):
                return self.between(lo, hi)  # some out, some not (or the counts disagree)
            changes_after_lo |= (out_between == 0) != live_lo
        if not changes_after_lo:
            return None
        return first if self.sample(first) is not None else self.between(lo, hi)

    def search_outages(self, first: int, hi: int) -> None:
        """Decode each line from ``first`` to before ``hi`` with a replica out, and the
        line after it."""
        data = self.data
        position = data.find(_OUT, first, hi)
        while position >= 0:
            start = self.start_of(position)
            end = self.end_of(start)
            self.sample(start)
            if end + 1 < len(data):
                self.sample(end + 1)
            position = data.find(_OUT, end, hi)

    def counts(self, start: int) -> tuple[float | None, ...]:
        """The out counter of each replica of the sample at ``start``; None for one out
        of service (or without a counter)."""
        sample = self.decoded[start]
        assert sample is not None
        return tuple(
            r.out if r.live else None for body in sample.models.values() for r in body.replicas
        )

    def outs(self, start: int) -> _Outs:
        """The replicas of the sample at ``start``: (model, url, out counter, live)."""
        sample = self.decoded[start]
        assert sample is not None
        return [
            (model, r.url, r.out, r.live)
            for model, body in sample.models.items()
            for r in body.replicas
        ]

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


def _all_live_between(before: tuple[float | None, ...], after: tuple[float | None, ...]) -> bool:
    """Whether two samples' ``_Spread.counts`` show every replica live at both and none
    out between them (the same counters, all known): the usual case, nothing to look for."""
    return before == after and None not in before


# By exact type, not isinstance: a bool (an int to isinstance) where a count belongs is
# not a count. Inline as ``v if type(v) in _NUMBER else None`` below, not a function: it
# runs for every field of every replica of every line read, the hot loop of a report.
_NUMBER = frozenset((int, float))
# Read by the names of the fields: a field added to a sample is read with no change here
# (a number; the few that are not are set apart below).
_MODELS, _SHARDS = Sample._fields.index("models"), Sample._fields.index("shards")
_REPLICAS = ModelSample._fields.index("replicas")
# Each tuple made with tuple.__new__ from values in field order: what a named tuple's own
# constructor and _make call, less a Python frame and a length check per tuple (the
# values are built from the fields, so the length is right).
_new = tuple.__new__


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
    return _new(Sample, values)


def _model(body: dict[str, Any]) -> ModelSample:
    get = body.get
    values: list[Any] = [v if type(v) in _NUMBER else None for v in map(get, ModelSample._fields)]
    replicas = get("replicas")
    values[_REPLICAS] = _replicas(replicas) if type(replicas) is list else ()
    return _new(ModelSample, values)


def _replicas(items: list[Any]) -> tuple[ReplicaSample, ...]:
    number = _NUMBER
    found = []
    for item in items:
        if type(item) is not dict or type(url := item.get("url")) is not str:
            continue
        get = item.get
        in_flight, limit, cap = get("in_flight"), get("limit"), get("cap")
        requests, ok, failures, out = get("requests"), get("ok"), get("failures"), get("out")
        replica = (
            url,
            in_flight if type(in_flight) in number else None,
            limit if type(limit) in number else None,
            cap if type(cap) in number else None,
            get("live") is not False,  # a replica is out only when it says so
            requests if type(requests) in number else None,
            ok if type(ok) in number else None,
            failures if type(failures) in number else None,
            out if type(out) in number else None,
        )
        found.append(_new(ReplicaSample, replica))
    return tuple(found)
