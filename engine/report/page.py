"""The report page: one self-contained HTML file (inline CSS and SVG, no address to load).

``render_report`` is pure: samples, config text and totals in, HTML out. Every piece
of text that reaches the page goes through ``html.escape``: run ids, URLs, model
names and config values come from users and servers.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from html import escape

from engine.report import plots
from engine.report.plots import duration
from engine.report.samples import Sample
from engine.report.series import Outage, Restart, outages, restarts, runs, spans, thin

# Points per line: more than the ~1,000 pixels a plot is wide tells nothing more and
# costs the page megabytes and the renderer seconds.
PLOT_POINTS = 1500
# Rows of a table of restarts or outages: a flapping replica can have thousands.
TABLE_ROWS = 100
PLOTS = (
    ("throughput", "Throughput", plots.throughput),
    ("in_flight", "Requests in flight, against limit and cap", plots.in_flight),
    ("latency", "Latency", plots.latency),
    ("failures", "Failures and retries", plots.failures),
)

_STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: #222; margin: 0 auto; padding: 16px 24px; max-width: 1200px; }
h1 { font-size: 22px; margin: 4px 0; }
h2 { font-size: 17px; margin: 22px 0 6px; }
.lead { color: #555; margin: 0 0 10px; }
table { border-collapse: collapse; margin: 6px 0; }
th, td { text-align: left; padding: 2px 14px 2px 0; border-bottom: 1px solid #eee;
         vertical-align: top; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.plot svg { width: 100%; height: auto; display: block; }
pre { background: #f6f6f6; padding: 10px; overflow-x: auto; font-size: 12px; }
.empty { background: #fff6e0; padding: 10px; border-left: 4px solid #e0a000; }
"""


def render_report(
    series: Sequence[Sample],
    *,
    title: str,
    config_text: str,
    totals: Mapping[str, object],
) -> str:
    """The report page of a run with history ``series`` (its samples, in file order).

    ``config_text`` is shown as given (mask it first: engine.redact);
    ``totals`` are labelled numbers, nested mappings flattened (``requests / teacher``).
    """
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f'<p class="lead">{escape(_lead(series))}</p>',
    ]
    parts += _totals(series, totals)
    if series:
        found_restarts = restarts(series)
        found_outages = outages(series)
        span = series[-1].t - series[0].t
        marks = plots.Marks(found_restarts, spans(found_outages, merge_within=span / 1000))
        drawn = thin(series, PLOT_POINTS)
        for name, heading, plot in PLOTS:
            parts.append(f'<section class="plot" data-plot="{name}">')
            parts.append(f"<h2>{escape(heading)}</h2>{plots.draw(plot, drawn, marks)}</section>")
        parts += _restarts(found_restarts)
        parts += _outages(found_outages)
    else:
        parts.append(
            '<p class="empty">No samples: this run recorded no history (metrics.jsonl is '
            "missing or empty), so there is nothing to plot. A run samples once a second "
            "while it runs.</p>"
        )
    parts.append("<h2>Config</h2>")
    parts.append(f"<pre>{escape(config_text) or '(none given)'}</pre>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _lead(series: Sequence[Sample]) -> str:
    if not series:
        return "No history recorded."
    found = runs(series)
    running = sum(r.end - r.start for r in found)
    return (
        f"{_clock(series[0].t)} to {_clock(series[-1].t)} UTC "
        f"({duration(series[-1].t - series[0].t)}); "
        f"{len(found)} run{'s' if len(found) != 1 else ''}, running {duration(running)}; "
        f"{len(series):,} samples."
    )


def _totals(series: Sequence[Sample], totals: Mapping[str, object]) -> list[str]:
    rows = list(_flat(totals))
    if series:
        last = series[-1]
        done = [last.rows_ok, last.rows_failed, last.rows_filtered]
        rows.append(
            ("rows ok / failed / filtered (last sample)", " / ".join(_number(n) for n in done))
        )
        if last.rows_total is not None:
            rows.append(("rows in the input", _number(last.rows_total)))
        if last.shards:
            rows.append(("shards", last.shards))
    if not rows:
        return []
    cells = "".join(f'<tr><th>{escape(k)}</th><td class="n">{escape(v)}</td></tr>' for k, v in rows)
    return ["<h2>Totals</h2>", f"<table>{cells}</table>"]


def _flat(totals: Mapping[str, object], prefix: str = "") -> Iterator[tuple[str, str]]:
    for key, value in totals.items():
        label = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _flat(value, f"{label} / ")
        else:
            yield label, _number(value)


def _restarts(found: Sequence[Restart]) -> list[str]:
    rows = [(_clock(r.t), duration(r.gap), r.previous, r.run) for r in found[:TABLE_ROWS]]
    header = ("resumed at (UTC)", "stopped for", "run before", "run after")
    return _table("Restarts", header, rows, len(found))


def _outages(found: Sequence[Outage]) -> list[str]:
    rows = [
        (
            o.model,
            o.url,
            _clock(o.start),
            _clock(o.end),
            duration(o.end - o.start),
            "still out when sampling stopped" if o.open_end else "",
        )
        for o in found[:TABLE_ROWS]
    ]
    header = ("model", "replica", "from (UTC)", "to (UTC)", "for", "")
    return _table("Replica outages", header, rows, len(found))


def _table(
    heading: str, header: Sequence[str], rows: Sequence[Sequence[str]], total: int
) -> list[str]:
    if not total:
        return []
    head = "".join(f"<th>{escape(cell)}</th>" for cell in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>" for row in rows
    )
    more = f"<p>... and {total - len(rows):,} more.</p>" if total > len(rows) else ""
    return [
        f"<h2>{escape(heading)} ({total:,})</h2>",
        f"<table><tr>{head}</tr>{body}</table>{more}",
    ]


def _number(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if value.is_integer() else f"{value:,.2f}"
    return str(value)


def _clock(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))
