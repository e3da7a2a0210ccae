"""JSONL input: one JSON object a line, streamed by :mod:`engine.input.reader`.

Row numbers are 0-based line numbers, blank lines included (a blank line is passed
over but keeps its number), so they stay the same whichever part of the file a shard
or a resume starts reading from. Shards are byte ranges cut Hadoop's way: near
``size * k / shards``, moved forward to the next line start, a line belonging to the
shard that holds its first byte. Byte offsets stay in here: a resume's seek is
(line, byte offset of its start), noted by the reader and handed back unread by the
rest of the engine.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing
from pathlib import Path

from engine.errors import InputError
from engine.input.base import FRESH, START, Resume, Row, Source, row_id
from engine.input.columns import rename_columns
from engine.input.reader import count_rows, decode_line, line_starts, raw_id, read_lines
from engine.input.slices import Slice, even_cuts, slices_between

log = logging.getLogger("turnstile")


class JsonlSource(Source):
    """A JSONL file: any file that no other format claims. Lines are decoded (and their
    columns mapped) as they are read; a line that cannot be is a failed row."""

    __slots__ = ()

    fmt = "jsonl"
    what = "JSONL file"

    @classmethod
    def sniff(cls, path: Path) -> bool:
        # The catch-all, last in the registry: a missing path is reported by check().
        return not path.is_dir()

    def files(self) -> list[Path]:
        return [self.path]

    def _check(self) -> None:
        if not self.path.is_file():
            raise InputError(f"input {self.path} is not a file; check input: in the config")

    def count(self) -> int:
        return count_rows(self.path)

    def _plan(self, shards: int) -> list[Slice]:
        size = self.path.stat().st_size
        return slices_between(line_starts(self.path, even_cuts(size, shards)))

    async def read(self, piece: Slice | None = None, resume: Resume = FRESH) -> AsyncIterator[Row]:
        start = resume.seek if resume.seek[0] else START  # else the file's (or piece's) start
        end = None
        if piece is not None:
            # A resume's seek moves the beginning forward inside the slice, never back.
            start = max(start, (piece.first_row, piece.start), key=lambda mark: mark[1])
            end = piece.end
        columns = self.columns
        lines = read_lines(self.path, skip=resume.done, start=start, end=end, marks=resume.marks)
        async with aclosing(lines):  # the file is closed even when the run stops mid-way
            async for line, raw in lines:
                try:
                    record = decode_line(raw)
                    if columns:
                        record = rename_columns(record, columns)
                except InputError as exc:
                    yield Row(line, raw_id(line, raw, columns), {}, str(exc))
                except Exception as exc:  # a row the engine cannot handle never stops a run
                    yield _unreadable(line, raw, columns, exc)
                else:
                    yield Row(line, row_id(record, line), record)


def _unreadable(line: int, raw: bytes, columns: Mapping[str, str], exc: Exception) -> Row:
    log.warning(f"input line {line}: cannot be read ({type(exc).__name__}: {exc}); it fails")
    try:
        found = raw_id(line, raw, columns)
    except Exception:
        found = line
    return Row(line, found, {}, f"cannot be read ({type(exc).__name__}: {exc})")
