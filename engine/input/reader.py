"""Streaming the input: big reads in a worker thread, split into lines on the loop.

Nothing reads the whole file: memory holds one chunk plus the rows in flight,
whatever the file size.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Container
from pathlib import Path
from typing import Any

import anyio
import orjson

from engine.errors import InputError

CHUNK = 1 << 20
_BOM = b"\xef\xbb\xbf"


async def read_lines(
    path: Path, skip: Container[int] = (), chunk: int = CHUNK
) -> AsyncIterator[tuple[int, bytes]]:
    """Yield (0-based line number, line bytes) for each non-blank line not in ``skip``.

    CRLF endings and a UTF-8 byte-order mark are accepted.
    """
    line = 0
    rest = b""
    f = await anyio.to_thread.run_sync(path.open, "rb")
    try:
        first = True
        while True:
            data = await anyio.to_thread.run_sync(f.read, chunk)
            if not data:
                break
            if first:
                first = False
                if data.startswith(_BOM):
                    data = data[len(_BOM) :]
            if rest:
                data = rest + data
            parts = data.split(b"\n")
            rest = parts.pop()
            for part in parts:
                if line not in skip and part.strip():
                    yield line, part
                line += 1
        if rest.strip() and line not in skip:
            yield line, rest
    finally:
        await anyio.to_thread.run_sync(f.close)


def count_rows(path: Path, chunk: int = CHUNK) -> int:
    """Non-blank lines in the file (for the progress total). Blocking: run in a thread."""
    rows = 0
    with path.open("rb") as f:
        rest = b""
        while data := f.read(chunk):
            parts = (rest + data).split(b"\n")
            rest = parts.pop()
            rows += sum(1 for part in parts if part.strip())
        if rest.strip():
            rows += 1
    return rows


def decode_line(raw: bytes) -> dict[str, Any]:
    """One input line as a JSON object; InputError names what is wrong with it."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if _bad_utf8(raw):
            raise InputError("is not valid UTF-8; re-encode the file as UTF-8") from exc
        raise InputError(f"is not valid JSON ({exc}); each line must be one JSON object") from exc
    if not isinstance(obj, dict):
        raise InputError(f"must be a JSON object, got {type(obj).__name__}")
    return obj


def raw_id(line: int, raw: bytes) -> object:
    """The row's id for the failed file, when the line has one, else its line number."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return line
    if isinstance(obj, dict) and isinstance(obj.get("id"), str | int | float):
        return obj["id"]
    return line


def _bad_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False
