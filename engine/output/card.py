"""The dataset card (``README.md``) of an exported Hugging Face dataset. Pure: values in, text out.

The card says what made the data: the task, the models (names, served names and
request params), the counts (rows exported, failed, filtered, not finished), the
most common errors, and the config. Secrets are never in it: a config holds only
the *names* of the environment variables with the keys, and the rest goes through
``engine.redact`` (params whose names look like credentials masked, a ``base_url``
shown without its user, password or secret query values).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from engine.config import RunConfig
from engine.redact import redact, redact_url


@dataclass(frozen=True, slots=True)
class Counts:
    """What the export found, for the card."""

    exported: int
    rows_ok: int
    rows_failed: int
    rows_filtered: int = 0
    unpaired: int | None = None  # preference: rows with no chosen/rejected pair, exported or not
    input_rows: int | None = None
    top_errors: Sequence[tuple[str, int]] = ()
    filter_rules: Sequence[tuple[str, int]] = ()
    json_columns: Sequence[str] = ()
    columns: Sequence[str] = ()
    pairs_only: bool = False
    dropped_columns: Sequence[str] = ()  # input fields left out (names TRL reserves)
    extra_config: Mapping[str, Any] = field(default_factory=dict)


def card_text(config: RunConfig, counts: Counts) -> str:
    """The whole card: YAML front matter, then Markdown."""
    tags = ["turnstile", "synthetic", *config.kind.tags]
    front = yaml.safe_dump({"tags": tags, "task_categories": ["text-generation"]}, sort_keys=False)
    parts = [
        f"---\n{front}---\n",
        f"# {config.output.stem}\n",
        config.kind.card_text(config) + "\n",
        "## Models\n\n" + _models_table(config),
        "## Rows\n\n" + _counts_table(counts),
        "## Columns\n\n" + _columns_text(config, counts),
    ]
    if counts.top_errors:
        parts.append(
            "## Failures\n\nThe most common errors of the rows that failed "
            f"(`{config.failed_output.name}`):\n\n"
            + _table(("rows", "error"), [(n, error) for error, n in counts.top_errors])
        )
    if counts.filter_rules:
        parts.append(
            "## Filtered rows\n\nRows left out by the quality filters, by rule:\n\n"
            + _table(("rows", "rule"), [(n, rule) for rule, n in counts.filter_rules])
        )
    config_yaml = yaml.safe_dump(
        public_config(config, counts.extra_config), sort_keys=False, allow_unicode=True
    )
    parts.append("## Config\n\nSecrets removed.\n\n```yaml\n" + config_yaml + "```\n")
    return "\n".join(parts)


def public_config(config: RunConfig, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The config as plain values with no secret in it (see the module docstring)."""
    out: dict[str, Any] = {
        "task": config.task,
        "input": config.input.name,
        "output": config.output.name,
        "models": {name: _public_model(config, name) for name in sorted(config.models_used())},
    }
    out.update(config.task_fields())
    out.update(extra or {})
    return out


def _public_model(config: RunConfig, name: str) -> dict[str, Any]:
    model = config.models[name]
    urls = [redact_url(url) for url in model.base_urls]
    out: dict[str, Any] = {"base_url": urls[0] if len(urls) == 1 else urls, "model": model.model}
    if model.api_key_env:
        out["api_key_env"] = model.api_key_env  # the variable's name, never its value
    out["params"] = redact(dict(model.params))
    return out


def _models_table(config: RunConfig) -> str:
    rows = []
    for name in sorted(config.models_used()):
        model = _public_model(config, name)
        params = ", ".join(f"{k}={v}" for k, v in model["params"].items()) or "-"
        rows.append((name, f"`{model['model']}`", params))
    return _table(("name", "model", "params"), rows)


def _counts_table(c: Counts) -> str:
    rows: list[tuple[str, Any]] = [
        ("in this dataset", c.exported),
        ("finished (in the run's output)", c.rows_ok),
        ("failed (not in this dataset)", c.rows_failed),
    ]
    if c.rows_filtered:
        rows.append(("filtered out by quality rules", c.rows_filtered))
    if c.unpaired is not None:
        rows.append(("with no chosen/rejected pair", c.unpaired))
    if c.input_rows is not None:
        done = c.rows_ok + c.rows_failed + c.rows_filtered
        rows.append(("input rows", c.input_rows))
        if c.input_rows > done:
            rows.append(("not finished yet (the run was stopped)", c.input_rows - done))
    return _table(("rows", "count"), rows)


def _columns_text(config: RunConfig, c: Counts) -> str:
    lines = [f"Columns: {', '.join(f'`{name}`' for name in c.columns)}.", ""]
    lines.append(config.kind.card_usage(config, pairs_only=c.pairs_only))
    if c.dropped_columns:
        names = ", ".join(f"`{name}`" for name in c.dropped_columns)
        lines.append(
            f"\nLeft out: {names}, input fields under names TRL reserves (its chat-template "
            "step fails on every row that has them). Export with `--keep-columns` to keep them."
        )
    if c.json_columns:
        names = ", ".join(f"`{name}`" for name in c.json_columns)
        lines.append(
            f"\n{names}: values of differing types across rows, stored as text: strings as "
            "they are, other values as JSON."
        )
    return "\n".join(lines) + "\n"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        out.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(out) + "\n"


def _cell(value: Any) -> str:
    text = str(value).replace("\r", " ").replace("\n", " ").replace("|", "\\|")
    return text if len(text) <= 200 else text[:199] + "…"
