"""What a report draws, derived from a run's samples: rates, gauges, restarts, outages.

Pure functions of the samples. Counters restart from zero with every process run
(only the ``rows_*`` span the whole job), so a rate is the difference of two
consecutive samples of the same run over the time between them, and never spans a
restart: the point where a run begins has none (None), which also breaks the line.
Plain lists, no array library: a report is written at the end of every run, and
importing one would cost more than the arithmetic.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from engine.report.samples import ModelSample, ReplicaSample, Sample

Value = Callable[[Sample], float | None]


@dataclass(frozen=True, slots=True)
class Curve:
    """Values over time; None where unknown, and between runs so a line breaks there."""

    t: list[float]  # unix time
    y: list[float | None]


@dataclass(frozen=True, slots=True)
class Run:
    """One process run of the job: its id and the times of its first and last sample."""

    run: str
    start: float
    end: float
    samples: int


@dataclass(frozen=True, slots=True)
class Restart:
    """Where a new run began: its first sample, and the time since the last one before."""

    t: float
    gap: float
    run: str
    previous: str


@dataclass(frozen=True, slots=True)
class Outage:
    """A replica out of service: first sample seen out to first seen live again.

    ``open_end`` when sampling stopped first (its run ended, or the history does), so
    ``end`` is only the last time it was seen, still out.
    """

    model: str
    url: str
    start: float
    end: float
    open_end: bool


def rate(samples: Sequence[Sample], value: Value) -> Curve:
    """Per second of a counter that is cumulative within a run, at each sample's time.

    A counter that went down within a run, or is missing at either end, gives None:
    no rate is better than a made-up one.
    """
    return Curve([s.t for s in samples], rates(samples, [value(s) for s in samples]))


def rates(samples: Sequence[Sample], counts: Sequence[float | None]) -> list[float | None]:
    """``rate`` of a counter already read, one count per sample."""
    return per_second(intervals(samples), counts)


def intervals(samples: Sequence[Sample]) -> list[float | None]:
    """Seconds since the sample before, per sample: None for the first of a run (and
    where the clock did not move forward), so no rate spans a restart."""
    return [None] * min(1, len(samples)) + [
        sample.t - previous.t if previous.run == sample.run and sample.t > previous.t else None
        for previous, sample in itertools.pairwise(samples)
    ]


def per_second(
    seconds: Sequence[float | None], counts: Sequence[float | None]
) -> list[float | None]:
    """The rate of a counter between samples ``seconds`` apart (``intervals``)."""
    return [None] * min(1, len(counts)) + [
        (now - before) / dt
        if dt is not None and now is not None and before is not None and now >= before
        else None
        for dt, (before, now) in zip(
            itertools.islice(seconds, 1, None), itertools.pairwise(counts), strict=True
        )
    ]


def gauge(samples: Sequence[Sample], value: Value) -> Curve:
    """A value as sampled (in flight, limit, latency), with a None between runs."""
    t: list[float] = []
    y: list[float | None] = []
    previous: Sample | None = None
    for sample in samples:
        if previous is not None and previous.run != sample.run:
            t.append(sample.t)
            y.append(None)
        t.append(sample.t)
        y.append(value(sample))
        previous = sample
    return Curve(t, y)


def runs(samples: Sequence[Sample]) -> list[Run]:
    """The process runs in the history, in order (a run is consecutive lines of one id)."""
    out: list[Run] = []
    first = 0
    for i in range(1, len(samples) + 1):
        if i == len(samples) or samples[i].run != samples[first].run:
            out.append(Run(samples[first].run, samples[first].t, samples[i - 1].t, i - first))
            first = i
    return out


def restarts(samples: Sequence[Sample]) -> list[Restart]:
    """Every place a new run took over from the one before."""
    found = runs(samples)
    return [
        Restart(t=new.start, gap=new.start - old.end, run=new.run, previous=old.run)
        for old, new in itertools.pairwise(found)
    ]


def outages(samples: Sequence[Sample]) -> list[Outage]:
    """Every interval a replica said it was not live, per model and replica, by start."""
    out: list[Outage] = []
    since: dict[tuple[str, str], float] = {}  # out of service since, by (model, url)
    previous: Sample | None = None
    for sample in samples:
        if previous is not None and previous.run != sample.run:
            # Nothing is known of the time between runs: the outage ends with its run.
            out.extend(_close(since, set(since), previous.t, open_end=True))
        seen: set[tuple[str, str]] = set()
        for model, body in sample.models.items():
            for replica in body.replicas:
                if replica.live and not since:  # the usual case: nothing out, nothing to do
                    continue
                key = (model, replica.url)
                seen.add(key)
                if not replica.live:
                    since.setdefault(key, sample.t)
                elif key in since:
                    out.extend(_close(since, {key}, sample.t, open_end=False))
        # A replica no longer listed is no longer out of service (nor in it).
        if since and not since.keys() <= seen:
            out.extend(_close(since, set(since) - seen, sample.t, open_end=False))
        previous = sample
    if previous is not None:
        out.extend(_close(since, set(since), previous.t, open_end=True))
    return sorted(out, key=lambda o: (o.start, o.model, o.url))


def _close(
    since: dict[tuple[str, str], float], keys: set[tuple[str, str]], end: float, *, open_end: bool
) -> list[Outage]:
    return [
        Outage(model, url, since.pop((model, url)), end, open_end) for model, url in sorted(keys)
    ]


def spans(outages: Sequence[Outage], *, merge_within: float) -> list[tuple[float, float]]:
    """The union of the outages' intervals, closing gaps up to ``merge_within`` seconds.

    For shading: thousands of spans of a flapping replica cost the plot more than they
    tell, and two replicas out at once read as one shaded stretch. Each span lasts at
    least ``merge_within`` so an outage seen at one sample only is still visible.
    """
    merged: list[tuple[float, float]] = []
    for start, end in sorted((o.start, max(o.end, o.start + merge_within)) for o in outages):
        if merged and start <= merged[-1][1] + merge_within:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def thin(samples: Sequence[Sample], most: int | None) -> list[Sample]:
    """About ``most`` of the samples, for plotting: evenly spread over each run, and its last.

    Differencing cumulative counters over the kept samples gives the exact mean rate
    between them, so thinning loses only detail, never a count; gauges and latency are
    those of the kept samples. Each run keeps its first and last sample, so restarts
    stay where they were. The stride is fractional: 1,060 samples thinned to 1,000 keep
    1,000, not every second one. ``most`` None keeps them all.
    """
    if most is None or len(samples) <= most:
        return list(samples)
    every = len(samples) / most
    kept: list[Sample] = []
    start = 0
    for i in range(1, len(samples) + 1):
        if i == len(samples) or samples[i].run != samples[start].run:
            picks = dict.fromkeys(
                start + int(j * every) for j in range(math.ceil((i - start) / every))
            )
            picks[i - 1] = None
            kept += [samples[k] for k in picks]
            start = i
    return kept


def whole_intervals(samples: Sequence[Sample]) -> list[Sample]:
    """The samples less any that would end a whole interval just before a partial one.

    A run's last sample is taken when it ends, often a fraction of a step after the
    one before: a few replies over a tenth of a second read as a spike of ten times
    the run's rate (issue 25 #13). Such a short last interval is merged into the one
    before it (the sample between them is dropped), so the last point is the mean
    rate over that whole stretch: the count is exact, the time it took too. Short
    means under the sample's own step, or under half the interval before it (after
    thinning, where the kept samples are further apart than a step).
    """
    drop: set[int] = set()
    for i in range(2, len(samples)):
        last, previous, before = samples[i], samples[i - 1], samples[i - 2]
        ends_run = i + 1 == len(samples) or samples[i + 1].run != last.run
        if not ends_run or not last.run == previous.run == before.run:
            continue
        short = max(previous.step or 0.0, (previous.t - before.t) / 2)
        if last.t - previous.t < short:
            drop.add(i - 1)
    if not drop:
        return list(samples)
    return [s for i, s in enumerate(samples) if i not in drop]


def model_names(samples: Sequence[Sample]) -> list[str]:
    """Every model in the history, in the order they first appear."""
    return list(dict.fromkeys(name for sample in samples for name in sample.models))


def replica_urls(samples: Sequence[Sample], model: str) -> list[str]:
    """Every replica of ``model`` in the history, in the order they first appear."""
    bodies = (sample.models.get(model) for sample in samples)
    return list(dict.fromkeys(r.url for body in bodies if body is not None for r in body.replicas))


def of_model(model: str, read: Callable[[ModelSample], float | None]) -> Value:
    """A value of one model's sample (None where the model is absent)."""

    def value(sample: Sample) -> float | None:
        body = sample.models.get(model)
        return None if body is None else read(body)

    return value


def of_replica(model: str, url: str, read: Callable[[ReplicaSample], float | None]) -> Value:
    """A value of one replica's sample (None where the replica is absent)."""

    def value(sample: Sample) -> float | None:
        body = sample.models.get(model)
        for replica in body.replicas if body is not None else ():
            if replica.url == url:
                return read(replica)
        return None

    return value


def tokens(read: Callable[[ModelSample], float | None]) -> Value:
    """A token counter summed over every model of the sample."""

    def value(sample: Sample) -> float | None:
        counts = [read(m) for m in sample.models.values()]
        known = [c for c in counts if c is not None]
        return sum(known) if known else None

    return value
