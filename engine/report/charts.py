"""The report's charts as data: what each one draws, for the page's script to plot.

Four charts (throughput; in flight against limit and cap, per model and per replica;
latency; failures and retries), each of one or more panels of lines over the same
time axis. ``payload`` is what the page embeds as JSON: the times, every line's
values aligned with them, and the marks every time axis shows (restarts as lines,
replica outages as shaded spans). The browser draws it (engine/report/report.js,
with uPlot); nothing here draws, so writing a report needs no plotting library.

Between two runs the time axis has a point of its own where every line is null: no
line joins the last sample of one run to the first of the next.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from engine.report.samples import ModelSample, ReplicaSample, Sample
from engine.report.series import Restart, intervals, model_names, per_second, replica_urls

Values = list[float | None]

# matplotlib's "tab10", the colours the report has always used.
PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
RESTART = "#6a3d9a"
OUTAGE = "#e31a1c"
DASHED = (6.0, 4.0)
DOTTED = (1.5, 3.0)
LABELLED_RESTARTS = 12  # more than this and the labels would cover each other


@dataclass(frozen=True, slots=True)
class Line:
    """One line of a panel: its legend label, style, and a value per point of the axis."""

    label: str
    color: str
    values: Values
    dash: tuple[float, ...] = ()
    width: float = 1.5


@dataclass(frozen=True, slots=True)
class Panel:
    """One plot: a title, the unit of its y axis and its lines (none: nothing recorded)."""

    title: str
    unit: str
    lines: list[Line]


@dataclass(frozen=True, slots=True)
class Chart:
    """One section of the page: its name (``data-plot``), heading and panels."""

    name: str
    heading: str
    panels: list[Panel]


HEADINGS = {
    "throughput": "Throughput",
    "in_flight": "Requests in flight, against limit and cap",
    "latency": "Latency",
    "failures": "Failures and retries",
}


def payload(
    samples: Sequence[Sample], restarts: Sequence[Restart], outages: Sequence[tuple[float, float]]
) -> dict[str, Any]:
    """What the page's script draws: ``t`` (unix seconds), the charts, and the marks."""
    axis = Axis(samples)
    labelled = len(restarts) <= LABELLED_RESTARTS
    return {
        "t": axis.times(),
        "charts": [_chart(chart) for chart in charts(samples, axis)],
        "restarts": [
            {"t": r.t, "label": f"resumed after {duration(r.gap)}" if labelled else ""}
            for r in restarts
        ],
        "outages": [list(span) for span in outages],
        "colors": {"restart": RESTART, "outage": OUTAGE},
    }


def _chart(chart: Chart) -> dict[str, Any]:
    return {
        "name": chart.name,
        "panels": [
            {
                "title": panel.title,
                "unit": panel.unit,
                "lines": [
                    {
                        "label": line.label,
                        "color": line.color,
                        "dash": list(line.dash),
                        "width": line.width,
                        "values": line.values,
                    }
                    for line in panel.lines
                ],
            }
            for panel in chart.panels
        ],
    }


class Axis:
    """The samples' times, with a point between runs where every line breaks."""

    def __init__(self, samples: Sequence[Sample]) -> None:
        self.samples = samples
        self.breaks = [i for i in range(1, len(samples)) if samples[i].run != samples[i - 1].run]
        self.intervals = intervals(samples)  # what every rate divides by

    def times(self) -> list[float]:
        t = [s.t for s in self.samples]
        for i in reversed(self.breaks):
            t.insert(i, (t[i - 1] + t[i]) / 2)
        return t

    def align(self, values: Values) -> Values:
        """A value per sample as a value per point of the axis (None at the breaks)."""
        if not self.breaks:
            return values
        out: Values = []
        start = 0
        for i in self.breaks:
            out += values[start:i]
            out.append(None)
            start = i
        out += values[start:]
        return out


class Columns:
    """Every model's fields as columns, a value per sample (None where the model is
    absent): each model's samples transposed once, not a pass over them per line."""

    def __init__(self, samples: Sequence[Sample], names: Sequence[str]) -> None:
        self.names = list(names)
        self.size = len(samples)
        self._columns = {
            name: dict(
                zip(
                    ModelSample._fields,
                    zip(*[s.models.get(name, _ABSENT) for s in samples], strict=True)
                    if samples
                    else [()] * len(ModelSample._fields),
                    strict=True,
                )
            )
            for name in names
        }

    def model(self, name: str, field: str) -> Values:
        """One model's ``field`` at every sample."""
        return list(self._columns[name][field])

    def replicas(self, name: str) -> list[tuple[ReplicaSample, ...]]:
        """One model's replicas at every sample (none where it is absent)."""
        return list(self._columns[name]["replicas"])

    def summed(self, field: str) -> Values:
        """``field`` summed over every model at each sample (None where none has it)."""
        columns = [self._columns[name][field] for name in self.names]
        if len(columns) < 2:
            return list(columns[0]) if columns else [None] * self.size
        return [
            sum(known) if (known := [v for v in values if v is not None]) else None
            for values in zip(*columns, strict=True)
        ]


_ABSENT = ModelSample._make([None] * len(ModelSample._fields))._replace(replicas=())


def charts(samples: Sequence[Sample], axis: Axis | None = None) -> list[Chart]:
    """The four charts of the report, over ``samples`` (already thinned for drawing)."""
    axis = axis or Axis(samples)
    names = model_names(samples)
    columns = Columns(samples, names)
    return [
        Chart("throughput", HEADINGS["throughput"], _throughput(samples, axis, columns)),
        Chart("in_flight", HEADINGS["in_flight"], _in_flight(samples, axis, columns)),
        Chart("latency", HEADINGS["latency"], [_latency(axis, columns)]),
        Chart("failures", HEADINGS["failures"], [_failures(axis, columns)]),
    ]


def _throughput(samples: Sequence[Sample], axis: Axis, columns: Columns) -> list[Panel]:
    turns = _rate(axis, [s.turns for s in samples])
    completion = _rate(axis, columns.summed("completion_tokens"))
    prompt = _rate(axis, columns.summed("prompt_tokens"))
    tokens = [
        Line("completion tokens/s", PALETTE[0], completion),
        Line("prompt tokens/s", PALETTE[1], prompt),
    ]
    # Part of the completion tokens, where a server reports any (none: no line).
    reasoning = _rate(axis, columns.summed("reasoning_tokens"))
    if any(reasoning):
        tokens.append(Line("reasoning tokens/s", PALETTE[2], reasoning, DASHED))
    panels = [
        Panel("Turns per second", "turns/s", _drawn([Line("turns/s", PALETTE[0], turns)])),
        Panel("Tokens per second, every model", "tokens/s", _drawn(tokens)),
    ]
    # What the run spent at the models' prices, and what the reply cache saved (both
    # cumulative within a run); no panel for a run without prices or a cache.
    spend = _drawn(
        [
            Line("cost, USD", PALETTE[0], axis.align(columns.summed("cost_usd"))),
            Line(
                "saved by the cache, USD",
                PALETTE[1],
                axis.align(columns.summed("saved_usd")),
                DASHED,
            ),
        ]
    )
    if spend:
        panels.append(Panel("Spend so far, every model (this run)", "USD", spend))
    return panels


def _in_flight(samples: Sequence[Sample], axis: Axis, columns: Columns) -> list[Panel]:
    """Per model, in flight (solid) against its limit (dashed) and cap (dotted); then
    the same per replica where it has several, a colour per replica."""
    panels = []
    for name in columns.names:
        lines = [
            Line(kind, PALETTE[0], axis.align(columns.model(name, field)), dash, width)
            for kind, field, dash, width in _GAUGES
        ]
        panels.append(Panel(f"{name}: in flight (all replicas)", "requests", _drawn(lines)))
        urls = replica_urls(samples, name)
        if len(urls) < 2:
            continue
        per_replica = _replica_columns(columns.replicas(name), urls)
        lines = []
        for i, (url, short) in enumerate(zip(urls, short_names(urls), strict=True)):
            color = PALETTE[i % len(PALETTE)]
            for kind, field, dash, width in _GAUGES:
                values = axis.align(per_replica[url][field])
                lines.append(Line(f"{short} {kind}", color, values, dash, width))
        title = f"{name}: in flight per replica (limit dashed, cap dotted)"
        panels.append(Panel(title, "requests", _drawn(lines)))
    return panels or [Panel("In flight", "requests", [])]


_GAUGES: tuple[tuple[str, str, tuple[float, ...], float], ...] = (
    ("in flight", "in_flight", (), 1.5),
    ("limit", "limit", DASHED, 1.2),
    ("cap", "cap", DOTTED, 1.6),
)


def _latency(axis: Axis, columns: Columns) -> Panel:
    """Per model, p50 (solid) and p95 (dashed) of the requests finished in each step."""
    lines = []
    for i, name in enumerate(columns.names):
        color = PALETTE[i % len(PALETTE)]
        p50 = axis.align(columns.model(name, "p50"))
        p95 = axis.align(columns.model(name, "p95"))
        lines += [Line(f"{name} p50", color, p50), Line(f"{name} p95", color, p95, DASHED)]
    return Panel("Latency of the requests answered in each step", "seconds", _drawn(lines))


def _failures(axis: Axis, columns: Columns) -> Panel:
    """Per model, failed requests/s (solid), retried requests/s (dashed: charged to
    their rows) and re-sent requests/s (dotted: after a server failure, charged to none)."""
    lines = []
    for i, name in enumerate(columns.names):
        color = PALETTE[i % len(PALETTE)]
        failed = _rate(axis, columns.model(name, "failures"))
        retried = _rate(axis, columns.model(name, "retries"))
        resent = _rate(axis, columns.model(name, "resent"))
        lines += [
            Line(f"{name} failures/s", color, failed),
            Line(f"{name} retries/s", color, retried, DASHED),
            Line(f"{name} re-sent/s", color, resent, DOTTED, 1.8),
        ]
    return Panel("Failed, retried and re-sent requests per second", "requests/s", _drawn(lines))


def _rate(axis: Axis, counts: Values) -> Values:
    # Three decimals are more than a plot shows, and keep the page small.
    return axis.align(
        [None if v is None else round(v, 3) for v in per_second(axis.intervals, counts)]
    )


def _drawn(lines: list[Line]) -> list[Line]:
    """The lines with something to draw (a limit never set has no line)."""
    return [line for line in lines if any(v is not None for v in line.values)]


def _replica_columns(
    replicas: Sequence[tuple[ReplicaSample, ...]], urls: list[str]
) -> dict[str, dict[str, Values]]:
    """Per replica URL, its in flight, limit and cap at every sample (``replicas``: a
    model's replicas at each sample), in one pass."""
    n = len(replicas)
    columns: dict[str, dict[str, Values]] = {
        url: {field: [None] * n for _, field, _, _ in _GAUGES} for url in urls
    }
    for i, listed in enumerate(replicas):
        for replica in listed:
            column = columns[replica.url]
            column["in_flight"][i] = replica.in_flight
            column["limit"][i] = replica.limit
            column["cap"][i] = replica.cap
    return columns


def short_names(urls: Sequence[str]) -> list[str]:
    """Legend names of replicas: host and port, unless two share them (then the URL)."""
    hosts = [urlsplit(url).netloc or url for url in urls]
    return hosts if len(set(hosts)) == len(hosts) else list(urls)


def duration(seconds: float) -> str:
    """Readable from seconds to weeks: ``42 s``, ``3 min 20 s``, ``5 h 02 min``, ``2 d 4 h``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"
