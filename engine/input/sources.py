"""The input as the rest of the engine sees it: an ordered registry of sources.

Each format is one :class:`~engine.input.base.Source` class (``jsonl.py``,
``parquet.py``, ``hf_dataset.py``; see ``base.py`` for what one provides).
:func:`open_source` asks each registered class in order whether a path is its
format (``sniff``) and opens the first that says yes; a run opens its source once
and uses that object throughout (check, fingerprint, count, plan, read).

Row numbers are 0-based over the whole input (line numbers for JSONL, rows across
files in order for the others): the journal, the resume skip-set, the failed file
and shard plans all use them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from engine.errors import InputError
from engine.input.base import FRESH, Marks, Resume, Row, Source, row_id
from engine.input.columns import parse_input_columns, rename_columns
from engine.input.hf_dataset import HfDatasetSource
from engine.input.jsonl import JsonlSource
from engine.input.parquet import ParquetSource
from engine.input.slices import Slice

__all__ = [
    "FRESH",
    "Marks",
    "Resume",
    "Row",
    "Slice",
    "Source",
    "formats",
    "open_source",
    "parse_input_columns",
    "register",
    "rename_columns",
    "row_id",
    "unregister",
]

# First match wins: the specific formats before JSONL, which takes any file.
_SOURCES: list[type[Source]] = [HfDatasetSource, ParquetSource, JsonlSource]


def register(cls: type[Source]) -> type[Source]:
    """Add a source class ahead of the built-in ones (so it is sniffed first); returns
    it, to be usable as a class decorator. Registering a class again moves it first."""
    unregister(cls)
    _SOURCES.insert(0, cls)
    return cls


def unregister(cls: type[Source]) -> None:
    """Take a registered source class out of the registry (no error when absent)."""
    if cls in _SOURCES:
        _SOURCES.remove(cls)


def formats() -> tuple[str, ...]:
    """The registered formats' names, in the order they are sniffed."""
    return tuple(cls.fmt for cls in _SOURCES)


def open_source(path: Path, columns: Mapping[str, str] | None = None) -> Source:
    """The source for ``path``: the first registered class whose ``sniff`` takes it.

    ``columns`` is the run's ``input_columns:`` mapping. Blocking (sniffing looks at
    the folder or a file's first bytes). Raises InputError naming the path and the
    formats when none takes it.
    """
    for cls in _SOURCES:
        if cls.sniff(path):
            return cls(path, columns)
    found = "; no ".join(cls.what for cls in _SOURCES)
    raise InputError(
        f"input {path} is no input format this engine reads (formats: "
        f"{', '.join(formats())}): found no {found}; point input: at one of those"
    )
