"""Input sources besides JSONL: Parquet files and folders, and Hugging Face saved datasets.

Streamed like the JSONL reader: record batches are read one at a time in a worker
thread (``ParquetFile.iter_batches`` for Parquet; the Arrow stream files that
``datasets.Dataset.save_to_disk`` writes, memory-mapped, for ``hf``), converted to
Python rows in slices of :data:`CHUNK_ROWS`, and handed to the loop. Memory holds one
slice plus the rows in flight, whatever the dataset's size.

Row numbers are 0-based over the whole input (files in sorted order, or in the
order ``state.json`` lists them), so they play the part of the JSONL line number:
the journal, the resume skip-set and the failed file use them unchanged.

Columnar values become JSON values: binary values become base64 strings
(standard alphabet, padded), decimals strings (exact), durations seconds (float),
maps objects (arrays of ``[key, value]`` when a key is not a string). A null
``messages``, ``conversations``, ``prompt`` or ``id`` counts as absent, as a
missing key does in JSONL: format detection moves on and ``id`` falls back to the
row number. Other columns are carried to the output like JSONL's other fields.

``pyarrow`` is needed for Parquet and ``hf`` input (``pip install 'turnstile[parquet]'``);
reading a saved dataset needs no ``datasets`` install, only its files.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import importlib
import math
from collections.abc import AsyncIterator, Container, Generator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import orjson

from engine.errors import InputError
from engine.input.reader import Marks, count_rows, decode_line, raw_id, read_lines
from engine.input.rows import FORMAT_KEYS
from engine.problems import Problems

FORMATS = ("jsonl", "parquet", "hf")
CHUNK_ROWS = 1024  # rows converted per thread hop
PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")
_PARQUET_MAGIC = b"PAR1"
_ABSENT_WHEN_NULL = (*FORMAT_KEYS, "id")
EXTRAS = {"parquet": "parquet", "hf": "hf"}

# A row as the run loop sees it: a JSONL line's bytes, or a columnar row already a dict.
Item = bytes | dict[str, Any]


# -- detection, counting, fingerprints (blocking: call from a thread or before the loop) --


def detect_format(path: Path) -> str:
    """``jsonl``, ``parquet`` or ``hf``: by folder contents, suffix, then magic bytes.

    A folder with ``dataset_info.json`` and ``state.json`` is a saved dataset
    (``hf``); a folder holding ``*.parquet`` files is Parquet; a file named
    ``*.parquet`` (or starting with Parquet's magic bytes) is Parquet; any other
    file is JSONL. Raises InputError for a folder that is neither, naming the fix.
    """
    if path.is_dir():
        if (path / "dataset_info.json").is_file() and (path / "state.json").is_file():
            return "hf"
        if (path / "dataset_dict.json").is_file():
            splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
            example = path / (splits[0] if splits else "train")
            raise InputError(
                f"input {path} is a DatasetDict (splits: {', '.join(splits) or 'none'}); "
                f"point input: at one split's folder, e.g. {example}"
            )
        if _parquet_files(path):
            return "parquet"
        raise InputError(
            f"input {path} is a folder with no *.parquet files and no saved dataset "
            "(dataset_info.json + state.json); point input: at a JSONL or Parquet file, "
            "a folder of Parquet files, or a folder written by Dataset.save_to_disk"
        )
    if path.suffix.lower() in PARQUET_SUFFIXES:
        return "parquet"
    try:
        with path.open("rb") as f:
            if f.read(4) == _PARQUET_MAGIC:
                return "parquet"
    except OSError:
        pass  # a missing file is reported by whoever reads it
    return "jsonl"


def fingerprint_paths(path: Path, fmt: str) -> list[Path]:
    """The files whose bytes define the input, in row order (for the resume fingerprint).

    For ``hf`` these are the Arrow files in ``state.json``'s order: the order is
    part of the fingerprint because it decides the row numbers.
    """
    if fmt == "jsonl":
        return [path]
    if fmt == "parquet":
        return _parquet_files(path) if path.is_dir() else [path]
    if fmt == "hf":
        return _arrow_files(path)
    raise ValueError(f"unknown input format {fmt!r}")


def count_records(path: Path, fmt: str) -> int:
    """Rows in a Parquet or ``hf`` input, from metadata: no row is decoded.

    Parquet: each file's footer. ``hf``: the Arrow stream files, memory-mapped,
    batch headers only (a stream file has no footer with a total).
    """
    if fmt == "jsonl":
        return count_rows(path)
    pa = _pyarrow(fmt)
    if fmt == "parquet":
        pq = _parquet(fmt)
        total = 0
        for file in fingerprint_paths(path, fmt):
            with pq.ParquetFile(file) as pf:
                total += int(pf.metadata.num_rows)
        return total
    total = 0
    for file in _arrow_files(path):
        with pa.memory_map(str(file)) as source:
            for batch in pa.ipc.open_stream(source):
                total += int(batch.num_rows)
    return total


def count_input(path: Path, fmt: str) -> int:
    """Rows in the input, for the progress total: non-blank lines for JSONL."""
    return count_rows(path) if fmt == "jsonl" else count_records(path, fmt)


def check_input(path: Path, fmt: str, columns: Mapping[str, str]) -> None:
    """Before the run: the input can be read and every mapped column exists.

    Raises InputError naming the fix: pyarrow missing, no files, a mapped column
    missing from a file. Reads only schemas (Parquet footers, Arrow stream headers).
    """
    if not path.exists():
        raise InputError(f"input {path} does not exist; check input: in the config")
    if fmt == "jsonl":
        if not path.is_file():
            raise InputError(f"input {path} is not a file; check input: in the config")
        return
    for file in fingerprint_paths(path, fmt):
        _check_columns(file, _schema_names(file, fmt), columns)


# -- reading ------------------------------------------------------------------------------


async def read_records(
    path: Path,
    fmt: str,
    columns: Mapping[str, str],
    skip: Container[int] = (),
    *,
    below: int = 0,
) -> AsyncIterator[tuple[int, dict[str, Any]]]:
    """Yield (0-based row number, row) for each row of a Parquet or ``hf`` input.

    ``columns`` maps row keys to the columns holding them (``{"messages": "chat"}``);
    rows numbered in ``skip`` (finished in an earlier run) are not converted, and a
    Parquet row group whose rows are all in ``skip`` is not even read. Rows numbered
    under ``below`` are taken as finished without a look at ``skip``. Every read
    and conversion runs in a worker thread, one slice of rows per hop.
    """
    if fmt not in ("parquet", "hf"):
        raise ValueError(f"read_records reads parquet or hf input, not {fmt!r}")
    chunks = _chunks(path, fmt, columns, skip, below)
    try:
        while True:
            chunk = await anyio.to_thread.run_sync(next, chunks, None)
            if chunk is None:
                return
            for item in chunk:
                yield item
    finally:
        # Close the files even when the reader is cancelled mid-way.
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(chunks.close)


async def read_input(
    path: Path,
    fmt: str,
    columns: Mapping[str, str],
    skip: Container[int] = (),
    *,
    start: tuple[int, int] = (0, 0),
    marks: Marks | None = None,
) -> AsyncIterator[tuple[int, Item]]:
    """Any input: JSONL lines as bytes (decoded by the workers), other formats as rows.

    ``start`` is (row, byte offset) of a snapshot's seek: every row before it is
    finished. The JSONL reader seeks to the offset and notes ``marks`` as it goes;
    columnar inputs pass over the rows before it (offsets mean nothing there).
    """
    if fmt == "jsonl":
        async for line, raw in read_lines(path, skip=skip, start=start, marks=marks):
            yield line, raw
        return
    async for index, row in read_records(path, fmt, columns, skip, below=start[0]):
        yield index, row


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
        try:
            obj = orjson.loads(item)
        except orjson.JSONDecodeError:
            return line
        item = obj if isinstance(obj, dict) else {}
        value = item.get(id_column)
    else:
        value = item.get("id")
    return value if isinstance(value, str | int | float) else line


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


# -- the blocking side ----------------------------------------------------------------


def _chunks(
    path: Path, fmt: str, columns: Mapping[str, str], skip: Container[int], below: int = 0
) -> Generator[list[tuple[int, dict[str, Any]]], None, None]:
    """Converted rows, a slice at a time. Runs in worker threads, one ``next`` per hop."""
    pa = _pyarrow(fmt)
    start = 0
    for file in fingerprint_paths(path, fmt):
        if fmt == "parquet":
            batches = _parquet_batches(file, start, skip, below)
        else:
            batches = _arrow_batches(file, start)
        for first, size, batch in batches:
            start = first + size
            if batch is None:
                continue
            _check_columns(file, batch.schema.names, columns)
            convert = _converters(batch.schema)
            for offset in range(0, size, CHUNK_ROWS):
                piece = batch.slice(offset, CHUNK_ROWS)
                base = first + offset
                if base + int(piece.num_rows) <= below:
                    continue
                keep = [i for i in range(int(piece.num_rows)) if base + i not in skip]
                if not keep:
                    continue
                if len(keep) < piece.num_rows:
                    piece = piece.take(pa.array(keep, type=pa.int64()))
                rows = piece.to_pylist()
                yield [
                    (base + i, _row(row, convert, columns))
                    for i, row in zip(keep, rows, strict=True)
                ]


Batches = Iterator[tuple[int, int, Any]]


def _parquet_batches(file: Path, start: int, skip: Container[int], below: int = 0) -> Batches:
    """(first row number, rows, batch) for one Parquet file; batch None for a row group
    whose rows are all under ``below`` or in ``skip``, which is not read at all."""
    pq = _parquet("parquet")
    with pq.ParquetFile(file) as pf:
        first = start
        for group in range(pf.metadata.num_row_groups):
            size = int(pf.metadata.row_group(group).num_rows)
            if first + size <= below or all(i in skip for i in range(first, first + size)):
                yield first, size, None
                first += size
                continue
            for batch in pf.iter_batches(batch_size=CHUNK_ROWS * 8, row_groups=[group]):
                yield first, int(batch.num_rows), batch
                first += int(batch.num_rows)


def _arrow_batches(file: Path, start: int) -> Batches:
    """(first row number, rows, batch) for one Arrow stream file, memory-mapped: a batch
    costs nothing until its rows are converted."""
    pa = _pyarrow("hf")
    first = start
    with pa.memory_map(str(file)) as source:
        for batch in pa.ipc.open_stream(source):
            yield first, int(batch.num_rows), batch
            first += int(batch.num_rows)


def _row(
    row: dict[str, Any], convert: Mapping[str, bool], columns: Mapping[str, str]
) -> dict[str, Any]:
    for name, needed in convert.items():
        if needed and row.get(name) is not None:
            row[name] = _jsonable(row[name])
    row = rename_columns(row, columns)
    for key in _ABSENT_WHEN_NULL:
        if key in row and row[key] is None:
            del row[key]
    return row


def _check_columns(file: Path, names: list[str], columns: Mapping[str, str]) -> None:
    missing = {key: col for key, col in columns.items() if col not in names}
    if missing:
        key, col = next(iter(missing.items()))
        raise InputError(
            f"input_columns.{key}: {file} has no column {col!r} (its columns: "
            f"{', '.join(names)}); fix the column name in input_columns"
        )


def _schema_names(file: Path, fmt: str) -> list[str]:
    pa = _pyarrow(fmt)
    if fmt == "parquet":
        return list(_parquet(fmt).read_schema(file).names)
    with pa.memory_map(str(file)) as source:
        return list(pa.ipc.open_stream(source).schema.names)


def _converters(schema: Any) -> dict[str, bool]:
    """Which columns hold values that ``to_pylist`` gives as non-JSON Python objects."""
    return {field.name: not _plain(field.type) for field in schema}


def _plain(t: Any) -> bool:
    """Whether every value of this Arrow type comes out of ``to_pylist`` JSON-ready."""
    pa = _pyarrow("parquet")
    types = pa.types
    if (
        types.is_null(t)
        or types.is_boolean(t)
        or types.is_integer(t)
        or types.is_float32(t)
        or types.is_float64(t)
        or types.is_string(t)
        or types.is_large_string(t)
        or types.is_date(t)
        or types.is_timestamp(t)
        or types.is_time(t)
    ):
        return True
    if types.is_dictionary(t):
        return bool(_plain(t.value_type))
    if types.is_list(t) or types.is_large_list(t) or types.is_fixed_size_list(t):
        return bool(_plain(t.value_type))
    if types.is_struct(t):
        return all(_plain(t.field(i).type) for i in range(t.num_fields))
    return False  # binary, decimal, duration, map, float16, intervals, views, extensions


def _jsonable(value: Any) -> Any:
    """A JSON-ready copy of a ``to_pylist`` value (see the module docstring)."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, datetime.date | datetime.time):
        return value  # orjson writes ISO 8601
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        if value and all(isinstance(x, tuple) and len(x) == 2 for x in value):
            # A map column: to_pylist gives (key, value) pairs.
            if all(isinstance(k, str) for k, _ in value):
                return {k: _jsonable(v) for k, v in value}
            return [[_jsonable(k), _jsonable(v)] for k, v in value]
        return [_jsonable(x) for x in value]
    item = getattr(value, "item", None)  # numpy scalars (float16 on older pyarrow)
    if callable(item):
        return _jsonable(item())
    return str(value)


def _parquet_files(folder: Path) -> list[Path]:
    """The folder's Parquet files, sorted by relative path, skipping hidden and ``_`` names
    (``_SUCCESS``, ``_common_metadata``), as ``pyarrow.dataset`` does."""
    found = []
    for file in folder.rglob("*"):
        rel = file.relative_to(folder)
        if any(part.startswith((".", "_")) for part in rel.parts):
            continue
        if file.suffix.lower() in PARQUET_SUFFIXES and file.is_file():
            found.append(file)
    return sorted(found, key=lambda f: f.relative_to(folder).as_posix())


def _arrow_files(folder: Path) -> list[Path]:
    state_path = folder / "state.json"
    try:
        state = orjson.loads(state_path.read_bytes())
        names = [str(entry["filename"]) for entry in state["_data_files"]]
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise InputError(
            f"{state_path}: cannot read the saved dataset's file list ({exc}); "
            "save the dataset again with Dataset.save_to_disk"
        ) from exc
    files = [folder / name for name in names]
    for file in files:
        if not file.is_file():
            raise InputError(
                f"{file}: listed in {state_path} but missing; save the dataset again "
                "with Dataset.save_to_disk"
            )
    return files


def _pyarrow(fmt: str) -> Any:
    """pyarrow, with its ``ipc`` submodule loaded, or InputError naming the extra to install.

    Imported by name: pyarrow is an optional extra and ships no type information.
    """
    try:
        importlib.import_module("pyarrow.ipc")
        return importlib.import_module("pyarrow")
    except ImportError as exc:
        raise InputError(_missing(fmt)) from exc


def _parquet(fmt: str) -> Any:
    try:
        return importlib.import_module("pyarrow.parquet")
    except ImportError as exc:
        raise InputError(_missing(fmt)) from exc


def _missing(fmt: str) -> str:
    what = "a saved Hugging Face dataset" if fmt == "hf" else "Parquet"
    return f"reading {what} needs pyarrow: pip install 'turnstile[{EXTRAS.get(fmt, fmt)}]'"
