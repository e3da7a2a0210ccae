"""JSONL input: one JSON object a line, streamed by :mod:`engine.input.reader`.

Row numbers are 0-based line numbers, blank lines included (a blank line is passed
over but keeps its number), so they stay the same whichever part of the file a shard
or a resume starts reading from. Shards are byte ranges cut Hadoop's way: near
``size * k / shards``, moved forward to the next line start, a line belonging to the
shard that holds its first byte.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Container, Mapping
from pathlib import Path

from engine.errors import InputError
from engine.input.base import Source
from engine.input.reader import Marks, count_rows, line_starts, read_lines
from engine.input.slices import Slice, even_cuts, slices_between


class JsonlSource(Source):
    """A JSONL file. Lines reach the workers as bytes, decoded (and their columns
    mapped) there, off the reader's path."""

    __slots__ = ()

    fmt = "jsonl"

    def files(self) -> list[Path]:
        return [self.path]

    def _check(self, columns: Mapping[str, str]) -> None:
        if not self.path.is_file():
            raise InputError(f"input {self.path} is not a file; check input: in the config")

    def count(self) -> int:
        return count_rows(self.path)

    def _plan(self, shards: int) -> list[Slice]:
        size = self.path.stat().st_size
        return slices_between(line_starts(self.path, even_cuts(size, shards)))

    def read(
        self,
        columns: Mapping[str, str],
        skip: Container[int] = (),
        *,
        piece: Slice | None = None,
        start: tuple[int, int] = (0, 0),
        marks: Marks | None = None,
    ) -> AsyncIterator[tuple[int, bytes]]:
        if piece is None:
            return read_lines(self.path, skip=skip, start=start, marks=marks)
        # A resume's seek moves the beginning forward inside the slice, never back.
        begin = max(start, (piece.first_row, piece.start), key=lambda mark: mark[1])
        return read_lines(self.path, skip=skip, start=begin, end=piece.end, marks=marks)
