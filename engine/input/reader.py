"""Streaming the input: big reads in a worker thread (aiofiles), split into lines on the loop.

Nothing reads the whole file: memory holds one chunk plus the rows in flight,
whatever the file size. A resume does not read the finished part either: the
reader notes where lines start as it goes (:class:`Marks`), a snapshot keeps
the last one before which every line is done, and the next run seeks there.
A shard reads one byte range (``end``) whose bounds :func:`line_starts` finds
without splitting the file into lines.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Container, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiofiles
import orjson

from engine.errors import InputError
from engine.input.base import Marks as Marks  # noted by the reader, read by the writer
from engine.input.base import row_id
from engine.input.columns import rename_columns

CHUNK = 1 << 20
SCAN_CHUNK = 1 << 24  # planning only counts newlines: bigger reads, fewer hops
_BOM = b"\xef\xbb\xbf"


async def read_lines(
    path: Path,
    skip: Container[int] = (),
    chunk: int = CHUNK,
    *,
    start: tuple[int, int] = (0, 0),
    end: int | None = None,
    marks: Marks | None = None,
) -> AsyncGenerator[tuple[int, bytes], None]:
    """Yield (0-based line number, line bytes) for each non-blank line not in ``skip``.

    ``start`` is (line, byte offset where it starts): reading begins there, the
    lines before it taken as done. ``end`` bounds a shard's byte range: only lines
    whose first byte lies before it are read, the last one to its newline even
    past ``end`` (so a line straddling a cut belongs to the shard it starts in).
    ``marks`` gets where lines start as chunks go by. CRLF endings and a UTF-8
    byte-order mark are accepted.
    """
    line, offset = start
    if end is not None and offset >= end:
        return  # an empty shard, or a resume past the end of its shard
    rest = b""
    # aiofiles (the design card's file I/O): one worker-thread hop per call, as many as
    # anyio.to_thread would make; calls are 1 MiB reads, never a line at a time.
    async with aiofiles.open(path, "rb") as f:
        if offset:
            await f.seek(offset)
        first = not offset
        while True:
            size = max(chunk, len(_BOM)) if first else chunk
            data = await f.read(size)
            if not data:
                break
            offset += len(data)
            if first:
                first = False
                if data.startswith(_BOM):
                    data = data[len(_BOM) :]
            if rest:
                data = rest + data
            at = offset - len(data)  # where data starts in the file
            done = False
            if end is not None and offset >= end:
                # The line holding byte end - 1 is the shard's last: cut after its newline.
                stop = data.find(b"\n", max(end - 1 - at, 0))
                if stop >= 0:
                    data = data[: stop + 1]
                    done = True
            parts = data.split(b"\n")
            rest = parts.pop()
            for part in parts:
                if line not in skip and part.strip():
                    yield line, part
                line += 1
            if marks is not None:
                marks.note(line, at + len(data) - len(rest))
            if done:
                return
        if rest.strip() and line not in skip:
            yield line, rest


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


def line_starts(
    path: Path, offsets: Sequence[int], chunk: int = SCAN_CHUNK
) -> list[tuple[int, int]]:
    """For each of the nondecreasing byte ``offsets``, the first line start at or after
    it, as (line number, byte offset); (lines in the file, file size) past the last one.

    One pass in big chunks, counting newlines with ``bytes.count`` and ``find`` (no
    per-line Python work), for planning shards of files of any size. Line numbers
    count blank lines, as :func:`read_lines` does. Blocking: run in a thread.
    """
    found: list[tuple[int, int]] = []
    lines = 0  # newlines before the chunk
    base = 0  # the chunk's offset in the file
    last = b""
    with path.open("rb") as f:
        while len(found) < len(offsets) and offsets[len(found)] <= 0:
            found.append((0, 0))
        while data := f.read(chunk):
            seen, counted = lines, 0  # newlines before base + counted
            while len(found) < len(offsets):
                # A line starts at the offset itself when the byte before it is a newline.
                at = data.find(b"\n", max(offsets[len(found)] - 1 - base, 0))
                if at < 0:
                    break
                seen += data.count(b"\n", counted, at + 1)
                counted = at + 1
                found.append((seen, base + at + 1))
            lines += data.count(b"\n")
            base += len(data)
            last = data[-1:]
    total = lines + int(last not in (b"", b"\n"))  # a last line without a newline
    found += [(total, base)] * (len(offsets) - len(found))
    return found


def decode_line(raw: bytes) -> dict[str, Any]:
    """One input line as a JSON object; InputError names what is wrong with it.

    Integers beyond 64 bits come back exact (see :func:`_exact_ints`); a line nested
    deeper than the output can hold fails here, not when its row is written.
    """
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if _bad_utf8(raw):
            raise InputError("is not valid UTF-8; re-encode the file as UTF-8") from exc
        raise InputError(f"is not valid JSON ({exc}); each line must be one JSON object") from exc
    if not isinstance(obj, dict):
        raise InputError(f"must be a JSON object, got {type(obj).__name__}")
    # One C pass marks digits and openings; the slow paths below run only for lines
    # that might need them (an integer of 19+ digits, 250+ brackets).
    marked = raw.translate(_MARKS)
    if marked.count(b"[") >= MAX_DEPTH:
        check_writable(obj)
    if _LONG_DIGITS in marked:
        obj = _exact_ints(raw)
    return obj  # type: ignore[no-any-return]


# orjson reads integers up to 64 bits; past them it silently returns a float (2**70
# becomes 1.1805916207174113e+21). No integer that wide has fewer than 19 digits.
_MARKS = bytes(
    ord("0") if 0x30 <= b <= 0x39 else ord("[") if b in b"[{" else ord(" ") for b in range(256)
)
_LONG_DIGITS = b"0" * 19
_INT_RANGE = (-(1 << 63), (1 << 64) - 1)
# orjson writes nothing nested deeper than 254 levels (it reads up to 1024); a row goes
# out inside a level or two of the engine's own (a filtered or failed record): headroom.
MAX_DEPTH = 250
_HEADROOM = 254 - MAX_DEPTH


def loads_exact(raw: bytes) -> Any:
    """``orjson.loads``, with integers past 64 bits kept exact (as :func:`decode_line` does):
    for reading back rows the engine wrote. Raises orjson.JSONDecodeError."""
    obj = orjson.loads(raw)
    return _exact_ints(raw) if has_long_digits(raw) else obj


def has_long_digits(raw: bytes) -> bool:
    """Whether ``raw`` may hold an integer past 64 bits (a run of 19 digits or more)."""
    return _LONG_DIGITS in raw.translate(_MARKS)


def fragments_as_text(obj: Any) -> Any:
    """``obj`` with each exact integer (an ``orjson.Fragment``) as its digits in a string:
    for formats that hold no integer past 64 bits (Arrow, Parquet)."""
    if isinstance(obj, orjson.Fragment):
        return orjson.dumps(obj).decode()
    if isinstance(obj, dict):
        return {k: fragments_as_text(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [fragments_as_text(v) for v in obj]
    return obj


def _exact_ints(raw: bytes) -> Any:
    """The line read again by the standard library, every integer kept exact: one past
    64 bits as an ``orjson.Fragment`` of its own digits, written back out byte for byte."""
    return json.loads(raw, parse_int=_exact_int)


def _exact_int(text: str) -> int | orjson.Fragment:
    digits = text.lstrip("-")
    if len(digits) < 19:
        return int(text)
    try:
        value = int(text)
    except ValueError:  # past Python's int-from-text limit (4300 digits)
        return orjson.Fragment(text)
    return value if _INT_RANGE[0] <= value <= _INT_RANGE[1] else orjson.Fragment(text)


def check_writable(obj: Any) -> None:
    """Raise InputError when ``obj`` cannot be written back out as JSON (nested too deep)."""
    wrapped = obj
    for _ in range(_HEADROOM):
        wrapped = [wrapped]
    try:
        orjson.dumps(wrapped)
    except orjson.JSONEncodeError as exc:
        raise InputError(
            f"cannot be written back out ({exc}): JSON nested deeper than {MAX_DEPTH} "
            "levels is not carried; flatten it or drop the field"
        ) from exc


def raw_id(line: int, raw: bytes, columns: Mapping[str, str] | None = None) -> object:
    """The id of a line that could not be used: :func:`~engine.input.base.row_id` of
    whatever JSON it holds (its columns mapped), its line number when none."""
    obj = loads_or_none(raw)
    if columns and isinstance(obj, dict):
        obj = rename_columns(obj, columns)
    return row_id(obj, line)


def loads_or_none(raw: bytes) -> Any:
    """A line's JSON value, integers exact, however deep it is; None when it is not JSON."""
    try:
        obj = orjson.loads(raw)
        return _exact_ints(raw) if _LONG_DIGITS in raw.translate(_MARKS) else obj
    except (ValueError, RecursionError):  # orjson.JSONDecodeError is a ValueError
        return None


def _bad_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False
