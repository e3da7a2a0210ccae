"""The input as the rest of the engine sees it: detect the format, open its source.

Each format is one :class:`~engine.input.base.Source` class (``jsonl.py``,
``parquet.py``, ``hf_dataset.py``) that knows its files, checks, counts, plans
shards (:class:`~engine.input.slices.Slice`) and reads. :func:`open_source` picks
the class for a path; the functions below it keep the engine's older calls, which
pass the format string along, as thin wrappers over the same objects.

Row numbers are 0-based over the whole input (line numbers for JSONL, rows across
files in order for the others): the journal, the resume skip-set, the failed file
and shard plans all use them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Container, Mapping
from pathlib import Path
from typing import Any

from engine.errors import InputError
from engine.input.base import Item, Source
from engine.input.columnar import CHUNK_ROWS, ColumnarSource
from engine.input.columns import parse_input_columns, rename_columns
from engine.input.hf_dataset import HfDatasetSource
from engine.input.jsonl import JsonlSource
from engine.input.parquet import PARQUET_MAGIC, PARQUET_SUFFIXES, ParquetSource, parquet_files
from engine.input.reader import ID_TYPES, Marks, decode_line, loads_or_none, raw_id
from engine.input.slices import Slice

SOURCES: dict[str, type[Source]] = {
    cls.fmt: cls for cls in (JsonlSource, ParquetSource, HfDatasetSource)
}
FORMATS = tuple(SOURCES)
EXTRAS = {fmt: cls.extra for fmt, cls in SOURCES.items() if cls.extra}

__all__ = [
    "CHUNK_ROWS",
    "EXTRAS",
    "FORMATS",
    "PARQUET_SUFFIXES",
    "SOURCES",
    "ColumnarSource",
    "HfDatasetSource",
    "Item",
    "JsonlSource",
    "ParquetSource",
    "Slice",
    "Source",
    "check_input",
    "count_input",
    "decode_record",
    "detect_format",
    "fingerprint_paths",
    "input_id",
    "open_source",
    "parse_input_columns",
    "read_input",
    "rename_columns",
    "source_for",
]


def open_source(path: Path) -> Source:
    """The source for ``path``, its format found by :func:`detect_format`. Blocking."""
    return SOURCES[detect_format(path)](path)


def source_for(path: Path, fmt: str) -> Source:
    """The source for ``path`` read as ``fmt`` (one of :data:`FORMATS`)."""
    try:
        return SOURCES[fmt](path)
    except KeyError:
        raise ValueError(f"unknown input format {fmt!r}") from None


def detect_format(path: Path) -> str:
    """``jsonl``, ``parquet`` or ``hf``: by folder contents, suffix, then magic bytes.

    A folder with ``dataset_info.json`` and ``state.json`` is a saved dataset
    (``hf``); a folder holding ``*.parquet`` files is Parquet; a file named
    ``*.parquet`` (or starting with Parquet's magic bytes) is Parquet; any other
    file is JSONL. Raises InputError for a folder that is neither, naming the fix.
    """
    if path.is_dir():
        if (path / "dataset_info.json").is_file() and (path / "state.json").is_file():
            return HfDatasetSource.fmt
        if (path / "dataset_dict.json").is_file():
            splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
            example = path / (splits[0] if splits else "train")
            raise InputError(
                f"input {path} is a DatasetDict (splits: {', '.join(splits) or 'none'}); "
                f"point input: at one split's folder, e.g. {example}"
            )
        if parquet_files(path):
            return ParquetSource.fmt
        raise InputError(
            f"input {path} is a folder with no *.parquet files and no saved dataset "
            "(dataset_info.json + state.json); point input: at a JSONL or Parquet file, "
            "a folder of Parquet files, or a folder written by Dataset.save_to_disk"
        )
    if path.suffix.lower() in PARQUET_SUFFIXES:
        return ParquetSource.fmt
    try:
        with path.open("rb") as f:
            if f.read(len(PARQUET_MAGIC)) == PARQUET_MAGIC:
                return ParquetSource.fmt
    except OSError:
        pass  # a missing file is reported by whoever reads it
    return JsonlSource.fmt


# -- the engine's calls by format string (blocking unless they read) ----------------------


def fingerprint_paths(path: Path, fmt: str) -> list[Path]:
    """The files whose bytes define the input, in row order (for the resume fingerprint)."""
    return source_for(path, fmt).files()


def count_input(path: Path, fmt: str) -> int:
    """Rows in the input, for the progress total: non-blank lines for JSONL."""
    return source_for(path, fmt).count()


def check_input(path: Path, fmt: str, columns: Mapping[str, str]) -> None:
    """Before the run: the input can be read and every mapped column exists.

    Raises InputError naming the fix: pyarrow missing, no files, a mapped column
    missing from a file. Reads only schemas (Parquet footers, Arrow stream headers).
    """
    source_for(path, fmt).check(columns)


def read_input(
    path: Path,
    fmt: str,
    columns: Mapping[str, str],
    skip: Container[int] = (),
    *,
    start: tuple[int, int] = (0, 0),
    marks: Marks | None = None,
    piece: Slice | None = None,
) -> AsyncIterator[tuple[int, Item]]:
    """Any input: JSONL lines as bytes (decoded by the workers), other formats as rows.

    ``start`` is (row, byte offset) of a snapshot's seek: every row before it is
    finished. ``piece`` restricts reading to one slice of a shard plan. See
    :meth:`Source.read`; the source's iterator is returned as it is, adding no
    step per row.
    """
    return source_for(path, fmt).read(columns, skip, piece=piece, start=start, marks=marks)


# -- one item as a task gets it -----------------------------------------------------------


def decode_record(
    line: int, item: Item, columns: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """One item of :func:`read_input` as the record a task gets; InputError names what is
    wrong with it. ``columns`` applies to JSONL lines here (columnar rows are mapped
    when read)."""
    if isinstance(item, dict):
        return item
    record = decode_line(item)
    return rename_columns(record, columns) if columns else record


def input_id(line: int, item: Item, columns: Mapping[str, str] | None = None) -> object:
    """The row's id for the failed file, when it has one, else its row number.

    ``columns`` applies to JSONL lines, as in :func:`decode_record`.
    """
    if isinstance(item, bytes):
        id_column = (columns or {}).get("id")
        if id_column is None:
            return raw_id(line, item)
        obj = loads_or_none(item)
        value = obj.get(id_column) if isinstance(obj, dict) else None
    else:
        value = item.get("id")
    return value if isinstance(value, ID_TYPES) else line
