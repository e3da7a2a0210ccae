"""``input_columns:``: which column holds each row key, validated, applied, checked.

A dataset keeps its own column names (``chat`` rather than ``messages``); the config
maps row keys onto them. The same mapping renames columnar rows as they are read and
JSONL records as they are decoded, and is checked against every file's schema before
the run starts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from engine.errors import InputError
from engine.problems import Problems


def parse_input_columns(raw: Any, problems: Problems, keys: Sequence[str]) -> dict[str, str]:
    """Validate ``input_columns:`` (row key -> column name); ``keys`` are the row keys the
    task reads. Problems name the key."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        problems.add(
            "input_columns",
            f"must be a mapping of row keys to column names, e.g. {{messages: chat}}, "
            f"got {type(raw).__name__}",
        )
        return {}
    out: dict[str, str] = {}
    for key, column in raw.items():
        name = f"input_columns.{key}"
        if key not in keys:
            problems.add(name, f"unknown key; allowed keys here: {', '.join(keys)}")
        elif not isinstance(column, str) or not column.strip():
            problems.add(name, "must be the name of a column of the input, e.g. chat")
        else:
            out[str(key)] = column
    taken: dict[str, str] = {}
    for key, column in out.items():
        if column in taken:
            problems.add(
                f"input_columns.{key}",
                f"column {column!r} is already mapped to {taken[column]}; map it once",
            )
        taken[column] = key
    return out


def rename_columns(row: dict[str, Any], columns: Mapping[str, str]) -> dict[str, Any]:
    """The row with each mapped column under its row key, in place of the column.

    A column the row lacks is left alone (a JSONL row may use another format);
    a row key the mapping fills replaces the row's own field of that name.
    """
    if not columns:
        return row
    moved = {key: row[col] for key, col in columns.items() if col in row}
    out = {k: v for k, v in row.items() if k not in moved and k not in columns.values()}
    out.update(moved)
    return out


def check_columns(file: Path, names: Sequence[str], columns: Mapping[str, str]) -> None:
    """InputError naming the first mapped column that ``file``'s schema (``names``) lacks."""
    missing = {key: col for key, col in columns.items() if col not in names}
    if missing:
        key, col = next(iter(missing.items()))
        raise InputError(
            f"input_columns.{key}: {file} has no column {col!r} (its columns: "
            f"{', '.join(names)}); fix the column name in input_columns"
        )
