"""The report's plots, drawn with matplotlib into inline SVG strings.

Each plot takes the (thinned) samples and the marks that go on every time axis:
restarts as labelled vertical lines, replica outages as shaded spans. SVG keeps the
page one self-contained file: glyphs are drawn as paths (no font to fetch), the
XML prolog, comments and namespace URLs are cut, and every id is prefixed with the
plot's name so four SVGs can share one HTML document without clashing ids.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

import matplotlib

# Never a display: a report is drawn on servers, and matplotlib picks a GUI backend
# wherever it finds a DISPLAY. The figures below are plain Figure objects (no pyplot
# state); savefig(format="svg") uses the SVG renderer whatever the backend.
matplotlib.use("Agg")

import matplotlib.dates as mdates
import numpy as np
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.layout_engine import ConstrainedLayoutEngine
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from engine.report.samples import ModelSample, ReplicaSample, Sample
from engine.report.series import (
    Curve,
    Floats,
    Restart,
    gauge,
    model_names,
    of_model,
    of_replica,
    rate,
    replica_urls,
    tokens,
)

_WIDTH_IN = 11.0
_AXES_SHARE = 0.83  # of the width; the rest is the legends'
_PANEL_IN = 2.4
_LABELLED_RESTARTS = 12  # more than this and the labels would cover each other
_RESTART = "#6a3d9a"
_OUTAGE = "#e31a1c"
# The date number of the unix epoch (0 unless rcParams["date.epoch"] was changed).
_T = TypeVar("_T", float, Floats)
_EPOCH = float(mdates.date2num(np.datetime64(0, "s")))  # type: ignore[no-untyped-call]


@dataclass(frozen=True, slots=True)
class Marks:
    """What every time axis shows besides its data."""

    restarts: Sequence[Restart]
    outages: Sequence[tuple[float, float]]  # shaded spans, unix time


def draw(
    plot: Callable[[Sequence[Sample], Marks], str], samples: Sequence[Sample], marks: Marks
) -> str:
    """One of the plots below, drawn in the report's style: glyphs as paths, stable ids."""
    with matplotlib.rc_context(
        {"svg.fonttype": "path", "svg.hashsalt": "turnstile", "font.size": 9.0}
    ):
        return plot(samples, marks)


def throughput(samples: Sequence[Sample], marks: Marks) -> str:
    """Turns/s (top) and completion and prompt tokens/s (bottom), every model summed."""
    fig, (top, bottom) = _figure(2)
    _line(top, rate(samples, lambda s: s.turns), "turns/s", color="C0")
    top.set_ylabel("turns/s")
    _line(bottom, rate(samples, tokens(lambda m: m.completion_tokens)), "completion tokens/s")
    _line(bottom, rate(samples, tokens(lambda m: m.prompt_tokens)), "prompt tokens/s")
    bottom.set_ylabel("tokens/s")
    return _finish(fig, [top, bottom], marks, "throughput")


def in_flight(samples: Sequence[Sample], marks: Marks) -> str:
    """Per model, requests in flight against its limit and cap; then per replica.

    In flight is solid, the limit dashed, the cap dotted; on a replica panel the colour
    is the replica, so the legend needs one entry per replica, not three.
    """
    panels: list[tuple[str, bool]] = []  # (model, whether the panel is per replica)
    for name in model_names(samples):
        panels.append((name, False))
        if len(replica_urls(samples, name)) > 1:
            panels.append((name, True))
    fig, axes = _figure(max(1, len(panels)))
    for ax, (name, per_replica) in zip(axes, panels, strict=False):
        if per_replica:
            urls = replica_urls(samples, name)
            for i, (url, label) in enumerate(zip(urls, short_names(urls), strict=True)):
                _in_flight_lines(ax, samples, name, url, f"C{i % 10}", label)
            title = f"{name}: in flight per replica (limit dashed, cap dotted)"
        else:
            _in_flight_lines(ax, samples, name, None, "C0", None)
            title = f"{name}: in flight (all replicas)"
        ax.set_title(title, loc="left")
        ax.set_ylabel("requests")
    return _finish(fig, axes, marks, "in_flight")


def _in_flight_lines(
    ax: Axes,
    samples: Sequence[Sample],
    model: str,
    url: str | None,
    color: str,
    replica: str | None,
) -> None:
    """The model's (``url`` None) or a replica's lines, labelled by kind or by ``replica``."""
    for field, style, width in (("in_flight", "-", 1.4), ("limit", "--", 1.1), ("cap", ":", 1.6)):

        def get(body: ModelSample | ReplicaSample, field: str = field) -> float | None:
            value: float | None = getattr(body, field)
            return value

        read = of_model(model, get) if url is None else of_replica(model, url, get)
        kind = field.replace("_", " ")
        label = kind if replica is None else (replica if field == "in_flight" else "_nolegend_")
        _line(ax, gauge(samples, read), label, color=color, style=style, width=width)


def short_names(urls: Sequence[str]) -> list[str]:
    """Legend names of replicas: host and port, unless two share them (then the URL)."""
    hosts = [urlsplit(url).netloc or url for url in urls]
    return hosts if len(set(hosts)) == len(hosts) else list(urls)


def latency(samples: Sequence[Sample], marks: Marks) -> str:
    """Per model, p50 (solid) and p95 (dashed) of the requests finished in each step."""
    fig, (ax,) = _figure(1, height=3.2)
    for i, name in enumerate(model_names(samples)):
        color = f"C{i % 10}"
        _line(ax, gauge(samples, of_model(name, lambda m: m.p50)), f"{name} p50", color=color)
        p95 = gauge(samples, of_model(name, lambda m: m.p95))
        _line(ax, p95, f"{name} p95", color=color, style="--")
    ax.set_ylabel("seconds")
    return _finish(fig, [ax], marks, "latency")


def failures(samples: Sequence[Sample], marks: Marks) -> str:
    """Per model, failed requests/s (solid) and retried requests/s (dashed)."""
    fig, (ax,) = _figure(1, height=3.2)
    for i, name in enumerate(model_names(samples)):
        color = f"C{i % 10}"
        _line(ax, rate(samples, of_model(name, lambda m: m.failures)), f"{name} failures/s", color)
        retries = rate(samples, of_model(name, lambda m: m.retries))
        _line(ax, retries, f"{name} retries/s", color=color, style="--")
    ax.set_ylabel("requests/s")
    return _finish(fig, [ax], marks, "failures")


def _figure(panels: int, height: float | None = None) -> tuple[Figure, list[Axes]]:
    # The axes get the same share of every figure, the legends the strip on the right:
    # the four plots' time axes line up on the page.
    layout = ConstrainedLayoutEngine(rect=(0.0, 0.0, _AXES_SHARE, 1.0))
    fig = Figure(figsize=(_WIDTH_IN, height or _PANEL_IN * panels), layout=layout)
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)
    return fig, [ax for (ax,) in axes]


def _line(
    ax: Axes,
    curve: Curve,
    label: str,
    color: str | None = None,
    style: str = "-",
    width: float = 1.1,
) -> None:
    if np.isnan(curve.y).all():
        return
    ax.plot(_dates(curve.t), curve.y, style, label=label, color=color, linewidth=width)


def _finish(fig: Figure, axes: Sequence[Axes], marks: Marks, name: str) -> str:
    for ax in axes:
        _mark(ax, marks)
        if not ax.lines:
            ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
        ax.set_ylim(bottom=0)
        ax.grid(True, color="#dddddd", linewidth=0.6)
        handles, _ = ax.get_legend_handles_labels()
        handles += _mark_handles(marks)
        if handles:
            legend = ax.legend(
                handles=handles,
                loc="upper left",
                bbox_to_anchor=(1.005, 1.0),
                fontsize=8,
                frameon=False,
                ncols=1 if len(handles) <= 10 else 2,
            )
            legend.set_in_layout(False)
    # Minutes to weeks alike: ticks at round times, labels only as long as they must be.
    locator = mdates.AutoDateLocator()  # type: ignore[no-untyped-call]
    axes[-1].xaxis.set_major_locator(locator)
    formatter = mdates.ConciseDateFormatter(locator)  # type: ignore[no-untyped-call]
    axes[-1].xaxis.set_major_formatter(formatter)
    axes[-1].set_xlabel("time (UTC)")
    return _svg(fig, name)


def _mark(ax: Axes, marks: Marks) -> None:
    for start, end in marks.outages:
        ax.axvspan(_dates(start), _dates(end), color=_OUTAGE, alpha=0.15, linewidth=0)
    labelled = len(marks.restarts) <= _LABELLED_RESTARTS
    for restart in marks.restarts:
        x = _dates(restart.t)
        ax.axvline(x, color=_RESTART, linestyle="--", linewidth=1.0)
        if labelled:
            note = ax.annotate(
                f"resumed after {duration(restart.gap)}",
                (x, 1.0),
                xycoords=ax.get_xaxis_transform(),
                xytext=(3, -3),
                textcoords="offset points",
                va="top",
                fontsize=7,
                color=_RESTART,
                bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none"},
            )
            # Placed by data x: left in the layout, it makes matplotlib give up laying out.
            note.set_in_layout(False)


def _mark_handles(marks: Marks) -> list[Artist]:
    handles: list[Artist] = []
    if marks.restarts:
        handles.append(Line2D([], [], color=_RESTART, linestyle="--", label="restart"))
    if marks.outages:
        handles.append(Patch(color=_OUTAGE, alpha=0.15, label="replica out"))
    return handles


def _dates(t: _T) -> _T:
    """Unix times as matplotlib's date numbers: plain floats, which every artist takes
    (an annotation placed in axis coordinates does not convert datetime64)."""
    return t / 86400.0 + _EPOCH


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


def _svg(fig: Figure, name: str) -> str:
    buf = io.StringIO()
    # No metadata block: it names the RDF and Dublin Core vocabularies by URL.
    no_metadata = {"Date": None, "Creator": None, "Format": None, "Type": None}
    fig.savefig(buf, format="svg", metadata=no_metadata)
    return inline(buf.getvalue(), name)


_ID = re.compile(r'\bid="([^"]+)"')
_REF = re.compile(r'(href="#|url\(#)([^")]+)')
_NAMESPACES = re.compile(r'\s+xmlns(:\w+)?="[^"]*"')


def inline(svg: str, prefix: str) -> str:
    """An SVG document as an element to put in HTML, its ids made unique by ``prefix``.

    HTML parsers know the SVG and xlink namespaces without their URLs, so those go
    with the prolog: the page then names no network address of its own.
    """
    svg = svg[svg.index("<svg") :]
    root = svg.index(">")
    svg = _NAMESPACES.sub("", svg[:root]) + re.sub(r"<!--.*?-->", "", svg[root:], flags=re.DOTALL)
    ids = set(_ID.findall(svg))
    svg = _ID.sub(lambda m: f'id="{prefix}-{m[1]}"', svg)
    return _REF.sub(lambda m: f"{m[1]}{prefix}-{m[2]}" if m[2] in ids else m[0], svg)
