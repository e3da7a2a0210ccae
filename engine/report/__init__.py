"""The report of a run: ``<checkpoint_dir>/report.html``, how the run went, as one file.

Drawn from the run's history (``metrics.jsonl``, a sample a second, every resume
included): throughput, requests in flight against limit and cap, latency, failures
and retries, each over time with restarts and replica outages marked. The page is
self-contained (the series as JSON, drawn in the browser by the uPlot vendored in
engine/report/vendor, inlined: nothing to load) and shows the config with its
secrets masked::

    from engine.report import write_report

    write_report(Path("checkpoints/run"), title="distill run", config=raw, totals=numbers)

The parts, to build other views: ``read_series`` / ``parse_series`` (the samples),
engine.report.series (rates, gauges, restarts, outages, all pure),
engine.report.charts (the charts as data) and ``render_report`` (samples in, HTML
out).
"""

from engine.redact import redact
from engine.report.page import render_report
from engine.report.samples import ModelSample, ReplicaSample, Sample, parse_series, read_series
from engine.report.series import Outage, Restart, Run, outages, restarts, runs
from engine.report.write import REPORT_NAME, config_text, write_report

__all__ = [
    "REPORT_NAME",
    "ModelSample",
    "Outage",
    "ReplicaSample",
    "Restart",
    "Run",
    "Sample",
    "config_text",
    "outages",
    "parse_series",
    "read_series",
    "redact",
    "render_report",
    "restarts",
    "runs",
    "write_report",
]
