"""Writing ``<checkpoint_dir>/report.html``: the one part of the report that does I/O.

It reads the history and the environment, then replaces the page atomically (temp
file, fsync, rename, fsync the folder), so a reader never sees half a report and a
crash while writing leaves the previous one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from engine.checkpoint.files import atomic_write
from engine.config import JSON, YAML
from engine.history import HISTORY_NAME
from engine.redact import config_secrets, redact
from engine.report.page import PLOT_POINTS, render_report
from engine.report.samples import read_series

REPORT_NAME = "report.html"


def write_report(
    checkpoint_dir: Path,
    *,
    title: str,
    config: Mapping[str, Any],
    totals: Mapping[str, object],
    points: int | None = PLOT_POINTS,
    syntax: str = YAML,
) -> Path:
    """Write the report of the run checkpointed in ``checkpoint_dir``; its path. Blocking.

    ``config`` is the run's config as a plain mapping (shown masked, in ``syntax``:
    ``"yaml"`` or ``"json"``, the one its file was written in); ``totals`` are the
    labelled numbers of the run's summary; ``points``: about this many per line (None:
    every sample; engine.report.samples decodes only the lines it draws). With no
    history yet the page says so.
    """
    # A report is made to be passed around: besides the config shown masked, every
    # key and URL credential the models use is scrubbed from the page, in case one was
    # pasted where no key's name gives it away (a prompt, a param).
    page = render_report(
        read_series(checkpoint_dir / HISTORY_NAME, most=points),
        title=title,
        config_text=config_text(config, syntax),
        totals=totals,
        points=points,
        secrets=config_secrets(config, os.environ),
    )
    path = checkpoint_dir / REPORT_NAME
    replace_file(path, page.encode("utf-8"))
    return path


def config_text(config: Mapping[str, Any], syntax: str = YAML) -> str:
    """The config as YAML or as indented JSON (``syntax``), secrets masked
    (``engine.redact``), keys in their order.

    JSON is written without YAML's library: a run from a JSON config (what programs
    and the bench write) then imports no YAML parser at all, at its end as at its start.
    """
    if not config:
        return ""
    masked = redact(config)
    if syntax == JSON:
        return orjson.dumps(masked, default=str, option=orjson.OPT_INDENT_2).decode()
    import yaml

    dumped: str = yaml.safe_dump(
        masked, sort_keys=False, allow_unicode=True, default_flow_style=False, width=100
    )
    return dumped


def replace_file(path: Path, data: bytes) -> None:
    """Make ``data`` the content of ``path`` all at once, durably."""
    atomic_write(path, data)
