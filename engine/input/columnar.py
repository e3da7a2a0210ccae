"""What the columnar formats share: reading record batches as JSON rows, off the loop.

Record batches are read one at a time in a worker thread (each format says how, in
:meth:`ColumnarSource._batches`), converted to Python rows in slices of
:data:`CHUNK_ROWS`, and handed to the loop. Memory holds one slice plus the rows in
flight, whatever the dataset's size.

Row numbers are 0-based over the whole input (files in the format's order), so they
play the part of the JSONL line number: the journal, the resume skip-set, the failed
file and the shard plan use them unchanged. A shard or a resume restricts reading to
a range of row numbers; batches outside it are passed over unconverted, and a format
that can (Parquet) does not even read them.

``pyarrow`` is needed (``pip install 'turnstile[parquet]'``); it is imported by name,
being an optional extra that ships no type information.
"""

from __future__ import annotations

import importlib
import sys
from abc import abstractmethod
from collections.abc import AsyncIterator, Container, Generator, Mapping
from contextlib import closing
from pathlib import Path
from typing import Any, ClassVar

import anyio

from engine.errors import InputError
from engine.input.arrow_json import converters, json_row
from engine.input.base import FRESH, Resume, Row, Source, row_id
from engine.input.columns import check_columns
from engine.input.slices import Slice

CHUNK_ROWS = 1024  # rows converted per thread hop
_NO_END = sys.maxsize  # the row bound of a read that is not restricted to a slice

# (first row number, rows, batch or None for one that is passed over unread)
Batches = Generator[tuple[int, int, Any], None, None]
Chunk = list[Row]


class ColumnarSource(Source):
    """A Parquet or Arrow input: rows reach the workers as dicts, converted and with
    their columns mapped in the reader's thread."""

    __slots__ = ()

    needs: ClassVar[str]  # what is being read, for the message when pyarrow is missing
    unreadable: ClassVar[str]  # the fix for a file that is not what its name says

    @abstractmethod
    def _schema_names(self, file: Path) -> list[str]:
        """The file's column names, from its schema alone."""

    @abstractmethod
    def _rows_in(self, file: Path) -> int:
        """The file's row count, from metadata: no row is decoded."""

    @abstractmethod
    def _batches(self, file: Path, first: int, skip: Container[int], lo: int, hi: int) -> Batches:
        """The file's batches, its first row numbered ``first``. None stands in for a
        batch with no row in [lo, hi) (or, where the format checks, every such row in
        ``skip``): it is passed over without being read or converted."""

    def _check(self) -> None:
        for file in self.files():
            try:
                names = self._schema_names(file)
            except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
                raise InputError(
                    f"input {file} cannot be read as {self.needs} ({exc}); {self.unreadable}"
                ) from exc
            check_columns(file, names, self.columns)

    def count(self) -> int:
        return sum(self._rows_in(file) for file in self.files())

    async def read(self, piece: Slice | None = None, resume: Resume = FRESH) -> AsyncIterator[Row]:
        """Rows numbered in [lo, hi) (the piece's, from the seek's row on) and not done.

        Finished rows are not converted. Every read and conversion runs in a worker
        thread, one slice of rows per hop.
        """
        # No positions are noted: a resume's seek is its row, the rows before it done.
        lo, hi = resume.seek[0], _NO_END
        if piece is not None:
            lo, hi = max(lo, piece.first_row), piece.next_row
        chunks = self._chunks(self.columns, resume.done, lo, hi)
        try:
            while True:
                chunk = await anyio.to_thread.run_sync(next, chunks, None)
                if chunk is None:
                    return
                for row in chunk:
                    yield row
        finally:
            # Close the files even when the reader is cancelled mid-way.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(chunks.close)

    def _chunks(
        self, columns: Mapping[str, str], skip: Container[int], lo: int, hi: int
    ) -> Generator[Chunk, None, None]:
        """Converted rows, a slice at a time. Runs in worker threads, one ``next`` per hop."""
        pa = self._arrow()
        first = 0
        for file in self.files():
            with closing(self._batches(file, first, skip, lo, hi)) as batches:
                for start, size, batch in batches:
                    if start >= hi:
                        return
                    first = start + size
                    if batch is None:
                        continue
                    check_columns(file, batch.schema.names, columns)
                    convert = converters(batch.schema, pa)
                    stop = min(size, hi - start)
                    for offset in range(max(lo - start, 0), stop, CHUNK_ROWS):
                        base = start + offset
                        count = min(CHUNK_ROWS, stop - offset)
                        keep = [i for i in range(count) if base + i not in skip]
                        if not keep:
                            continue
                        part = batch.slice(offset, count)
                        if len(keep) < count:
                            part = part.take(pa.array(keep, type=pa.int64()))
                        yield [
                            _row(base + i, json_row(row, convert, columns))
                            for i, row in zip(keep, part.to_pylist(), strict=True)
                        ]

    def _arrow(self) -> Any:
        """pyarrow, with its ``ipc`` submodule loaded."""
        self._module("pyarrow.ipc")
        return self._module("pyarrow")

    def _module(self, name: str) -> Any:
        """A pyarrow module, or InputError naming the extra to install."""
        try:
            importlib.import_module("pyarrow")  # first: a submodule may be cached without it
            return importlib.import_module(name)
        except ImportError as exc:
            raise InputError(
                f"reading {self.needs} needs pyarrow: pip install 'turnstile[{self.extra}]'"
            ) from exc


def _row(line: int, record: dict[str, Any]) -> Row:
    return Row(line, row_id(record, line), record)
