"""Arrow rows as JSON rows: what a columnar value becomes when a task gets it.

Binary values become base64 strings (standard alphabet, padded), decimals strings
(exact), durations seconds (float), maps objects (arrays of ``[key, value]`` when a
key is not a string). A null ``messages``, ``conversations``, ``prompt`` or ``id``
counts as absent, as a missing key does in JSONL: format detection moves on and
``id`` falls back to the row number. Other columns are carried to the output like
JSONL's other fields.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import math
from collections.abc import Mapping
from typing import Any

from engine.input.columns import rename_columns
from engine.input.rows import FORMAT_KEYS

_ABSENT_WHEN_NULL = (*FORMAT_KEYS, "id")


def converters(schema: Any, pa: Any) -> dict[str, bool]:
    """Which columns hold values that ``to_pylist`` gives as non-JSON Python objects."""
    return {field.name: not _plain(field.type, pa.types) for field in schema}


def json_row(
    row: dict[str, Any], convert: Mapping[str, bool], columns: Mapping[str, str]
) -> dict[str, Any]:
    """One ``to_pylist`` row as the record a task gets, its columns mapped."""
    for name, needed in convert.items():
        if needed and row.get(name) is not None:
            row[name] = _jsonable(row[name])
    row = rename_columns(row, columns)
    for key in _ABSENT_WHEN_NULL:
        if key in row and row[key] is None:
            del row[key]
    return row


def _plain(t: Any, types: Any) -> bool:
    """Whether every value of this Arrow type comes out of ``to_pylist`` JSON-ready."""
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
        return _plain(t.value_type, types)
    if types.is_list(t) or types.is_large_list(t) or types.is_fixed_size_list(t):
        return _plain(t.value_type, types)
    if types.is_struct(t):
        return all(_plain(t.field(i).type, types) for i in range(t.num_fields))
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
