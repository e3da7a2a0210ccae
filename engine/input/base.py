"""The input seam: the :class:`Source` every input format implements, and what it yields.

One class per format (``jsonl.py``, ``parquet.py``, ``hf_dataset.py``) holds all of
that format's logic; the registry (``sources.py``) asks each class in turn whether a
path is its format and opens the first that says yes, once per run. A new format is
one new module and one :func:`~engine.input.sources.register` call. It provides:

- ``fmt``: its name (``"csv"``), shown in messages; ``extra``: the pip extra it needs;
  ``what``: what it reads, for the message when no format matches (``"CSV file"``).
- ``sniff(path) -> bool`` (a classmethod, cheap, blocking): whether ``path`` is this
  format. It may raise InputError when the path is plainly this format's but unusable
  as given (a DatasetDict folder rather than one split).
- ``files()``: the files whose bytes define the rows, in row order (the resume
  fingerprint); ``_check()``: InputError naming the fix when it cannot be read or a
  mapped column is missing, reading no rows; ``count()``: its rows (the progress
  total); ``_plan(shards)``: exactly ``shards`` contiguous :class:`Slice` s.
- ``read(piece, resume)``: an async iterator of :class:`Row`, in row order, each row
  numbered 0-based over the whole input, its record's columns already mapped
  (``self.columns``), its id decided by :func:`row_id`. Rows in ``resume.done`` are
  not yielded; rows before ``resume.seek``'s row are finished. A row that cannot be
  decoded is yielded with ``error`` set (it fails, the run goes on). Blocking work
  (file reads, decoding big chunks) runs in worker threads.

Everything but :meth:`Source.read` blocks: call it from a worker thread or before the
loop starts. Where reading may resume is the source's own business: it notes
(row, position) pairs in ``resume.marks`` as it goes, a snapshot keeps one, and the
next run hands it back as ``resume.seek`` untouched (JSONL's position is a byte
offset; a source that notes nothing resumes by the ``done`` set alone).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Container, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import orjson

from engine.errors import InputError
from engine.input.slices import Slice, check_shards

# What an id may be: a string or a number (an integer past 64 bits as its own digits).
ID_TYPES = (str, int, float, orjson.Fragment)

# Where reading may start: (row, position). Every row before ``row`` is finished;
# ``position`` means something only to the source that noted it.
Seek = tuple[int, int]
START: Seek = (0, 0)


def row_id(record: object, line: int) -> object:
    """A row's id, the one rule: its record's ``id`` when that is a string or a number
    (not true/false), else its row number. ``record`` is whatever could be decoded
    (None, or not a mapping, when nothing could)."""
    # type() first: a row is nearly always a dict, and the ABC check costs more than the rest.
    value = record.get("id") if type(record) is dict or isinstance(record, Mapping) else None
    return value if isinstance(value, ID_TYPES) and not isinstance(value, bool) else line


class Row(NamedTuple):
    """One input row as a task gets it. A NamedTuple: one is made per row, cheaply.

    ``error`` says why a row cannot be used (it goes to the failed file with its id,
    and ``record`` is empty); None for a usable row.
    """

    line: int
    id: object
    record: dict[str, Any]
    error: str | None = None


class Marks:
    """(row, position) pairs a source notes as it reads, one a chunk.

    The writer asks for the last one at or before the first row not done yet
    (:meth:`before`) when it takes a snapshot; older ones are dropped then, so
    the marks kept span only the rows the reader is ahead of the finished ones.
    """

    __slots__ = ("_marks",)

    def __init__(self) -> None:
        self._marks: deque[Seek] = deque()

    def note(self, line: int, offset: int) -> None:
        self._marks.append((line, offset))

    def before(self, line: int) -> Seek | None:
        """The last mark whose row is at most ``line`` (None when there is none)."""
        marks = self._marks
        while len(marks) > 1 and marks[1][0] <= line:
            marks.popleft()
        if marks and marks[0][0] <= line:
            return marks[0]
        return None


@dataclass(frozen=True, slots=True)
class Resume:
    """What a read knows of earlier runs: the rows ``done``, where a snapshot said
    reading may start (``seek``, passed back as the source noted it), and ``marks``
    for the source to note new seeks in."""

    done: Container[int] = ()
    seek: Seek = START
    marks: Marks | None = field(default=None, compare=False)


FRESH = Resume()


class Source(ABC):
    """One input, of one format, with the run's column mapping (``input_columns:``)."""

    __slots__ = ("columns", "path")

    fmt: ClassVar[str]
    extra: ClassVar[str | None] = None  # the pip extra that reading this format needs
    what: ClassVar[str]  # what it reads, e.g. "JSONL file"

    def __init__(self, path: Path, columns: Mapping[str, str] | None = None) -> None:
        self.path = path
        self.columns: Mapping[str, str] = dict(columns or {})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    @classmethod
    @abstractmethod
    def sniff(cls, path: Path) -> bool:
        """Whether ``path`` is this format. Blocking, cheap: names and magic bytes."""

    @abstractmethod
    def files(self) -> list[Path]:
        """The files whose bytes define the input, in row order (the resume fingerprint)."""

    def check(self) -> None:
        """Before the run: the input can be read and every mapped column exists.

        Raises InputError naming the fix. Reads no rows, at most schemas.
        """
        if not self.path.exists():
            raise InputError(f"input {self.path} does not exist; check input: in the config")
        self._check()

    @abstractmethod
    def _check(self) -> None: ...

    @abstractmethod
    def count(self) -> int:
        """Rows in the input, for the progress total (non-blank lines for JSONL)."""

    def plan(self, shards: int) -> list[Slice]:
        """Exactly ``shards`` slices, in order and contiguous, that together hold every
        row once; some are empty when rows cannot be spread that thin."""
        check_shards(shards)
        return self._plan(shards)

    @abstractmethod
    def _plan(self, shards: int) -> list[Slice]: ...

    @abstractmethod
    def read(self, piece: Slice | None = None, resume: Resume = FRESH) -> AsyncIterator[Row]:
        """Yield a :class:`Row` for each row not in ``resume.done``, in row order.

        ``piece`` restricts the rows to one slice of :meth:`plan`; ``resume.seek``
        moves the start forward (inside ``piece`` when both are given).
        """
