"""The report page: one self-contained HTML file that draws its charts in the browser.

``render_report`` is pure: samples, config text and totals in, HTML out. The page
holds the run's series as JSON (engine.report.charts) and draws them with uPlot,
vendored in engine/report/vendor and inlined with the page's own script
(engine/report/report.js): interactive (drag to zoom, every chart follows; hover
for values; click a legend entry to hide its line), and nothing to fetch, so it
works offline and as an attachment. Every piece of text that reaches the page goes
through ``html.escape``, and the JSON cannot end its script element: run ids, URLs,
model names and config values come from users and servers.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator, Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

import orjson

from engine.redact import scrub
from engine.report.charts import HEADINGS, OUTAGE, RESTART, duration, payload
from engine.report.samples import Sample
from engine.report.series import (
    Outage,
    Restart,
    outages,
    restarts,
    runs,
    spans,
    thin,
    whole_intervals,
)

# Points per line. uPlot draws 10^5 a line at ease, but a chart 1,000 pixels wide shows
# no more than this, and reading the history is most of what the report costs: the
# reader decodes only about these lines (engine.report.samples), so the report of a
# day-long run is written in well under 50 ms (bench/report_write.py).
PLOT_POINTS = 1000
# Rows of a table of restarts or outages: a flapping replica can have thousands.
TABLE_ROWS = 100
_HERE = Path(__file__).parent

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
pre { background: #f6f6f6; padding: 10px; overflow-x: auto; font-size: 12px; }
.empty { background: #fff6e0; padding: 10px; border-left: 4px solid #e0a000; }
.help { color: #555; font-size: 13px; margin: 4px 0 8px; }
.key { display: inline-block; width: 18px; height: 10px; margin: 0 4px 0 10px;
       vertical-align: middle; }
.panel { margin: 4px 0 14px; min-height: 40px; }
.panel .u-title { font-size: 13px; font-weight: 600; text-align: left; padding-left: 60px; }
.panel .u-legend { font-size: 12px; text-align: left; padding-left: 52px; }
.panel .nothing { color: #777; font-style: italic; padding-left: 60px; }
"""


@functools.cache
def _assets() -> tuple[str, str, str]:
    """uPlot's script and stylesheet and the page's script, as text (read once)."""
    script = (_HERE / "vendor" / "uPlot.iife.min.js").read_text(encoding="utf-8")
    style = (_HERE / "vendor" / "uPlot.min.css").read_text(encoding="utf-8")
    ours = (_HERE / "report.js").read_text(encoding="utf-8")
    for name, text in (("uPlot", script), ("report.js", ours)):
        if "</script" in text.lower() or "<!--" in text:
            raise ValueError(f"{name} cannot be inlined in a <script> element")
    return script, style, ours


def render_report(
    series: Sequence[Sample],
    *,
    title: str,
    config_text: str,
    totals: Mapping[str, object],
    points: int | None = PLOT_POINTS,
    secrets: Sequence[str] = (),
) -> str:
    """The report page of a run with history ``series`` (its samples, in file order).

    ``config_text`` is shown as given (mask it first: engine.redact);
    ``totals`` are labelled numbers, nested mappings flattened (``requests / teacher``);
    ``points``: at most about this many per line (None: every sample); ``secrets``:
    values masked wherever the run's data shows them (engine.redact.scrub), in the
    text and the charts' labels, never in the vendored script (a short key such as
    ``none`` would break its code).
    """
    script, uplot_style, ours = _assets()
    parts: list[str | _Asset] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title><style>",
        _Asset(uplot_style),
        f"{_STYLE}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f'<p class="lead">{escape(_lead(series))}</p>',
    ]
    parts += _totals(series, totals)
    if series:
        found_restarts = restarts(series)
        found_outages = outages(series)
        span = series[-1].t - series[0].t
        shaded = spans(found_outages, merge_within=span / 1000)
        drawn = whole_intervals(thin(series, points))
        parts += _help(found_restarts, shaded)
        for name, heading in HEADINGS.items():
            parts.append(
                f'<section class="plot" data-plot="{name}"><h2>{escape(heading)}</h2></section>'
            )
        data = _scrub_labels(payload(drawn, found_restarts, shaded), secrets)
        # "<" as its JSON escape: no text from the history can close the script element.
        json = orjson.dumps(data).decode("utf-8").replace("<", "\\u003c")
        parts.append('<script type="application/json" id="report-data">')
        parts.append(_Asset(json))  # numbers, and labels scrubbed above
        parts.append("</script><script>")
        parts.append(_Asset(script))
        parts.append("</script><script>")
        parts.append(_Asset(ours))
        parts.append("</script>")
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
    return "".join(
        part.text if isinstance(part, _Asset) else scrub(part, secrets) + "\n" for part in parts
    )


class _Asset:
    """Text put in the page as it is, never scrubbed: code, and JSON built safe."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def _scrub_labels(data: dict[str, Any], secrets: Sequence[str]) -> dict[str, Any]:
    """The payload with its text (titles, labels) scrubbed; numbers cannot hold a key."""
    if not secrets:
        return data
    for chart in data["charts"]:
        for panel in chart["panels"]:
            panel["title"] = scrub(panel["title"], secrets)
            for line in panel["lines"]:
                line["label"] = scrub(line["label"], secrets)
    return data


def _help(found: Sequence[Restart], shaded: Sequence[tuple[float, float]]) -> list[str]:
    marks = ""
    if found:
        marks += f'<span class="key" style="border-top: 2px dashed {RESTART}"></span>restart'
    if shaded:
        marks += f'<span class="key" style="background: {OUTAGE}26"></span>a replica out'
    return [
        '<p class="help">Drag across a chart to zoom in (every chart follows), double-click '
        "to zoom out; hover for the values at a time; click a legend entry to hide its line."
        f"{marks}</p>",
        '<noscript><p class="empty">The charts are drawn by the page\'s script: allow '
        "JavaScript for this file to see them. The tables need none.</p></noscript>",
    ]


def _lead(series: Sequence[Sample]) -> str:
    if not series:
        return "No history recorded."
    found = runs(series)
    running = sum(r.end - r.start for r in found)
    return (
        f"{_clock(series[0].t)} to {_clock(series[-1].t)} UTC "
        f"({duration(series[-1].t - series[0].t)}); "
        f"{len(found)} run{'s' if len(found) != 1 else ''}, running {duration(running)}."
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
