"""The :class:`Source` every input format implements, and the :data:`Item` it yields.

One class per format (``jsonl.py``, ``parquet.py``, ``hf_dataset.py``) holds all of
that format's logic: which files make it up, checking, counting, planning shards and
reading. A new format is one new module and one entry in ``sources.SOURCES``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Container, Mapping
from pathlib import Path
from typing import Any, ClassVar

from engine.errors import InputError
from engine.input.reader import Marks
from engine.input.slices import Slice, check_shards

# A row as the run loop sees it: a JSONL line's bytes, or a columnar row already a dict.
Item = bytes | dict[str, Any]


class Source(ABC):
    """One input, of one format. Every method but :meth:`read` blocks: call it from a
    worker thread or before the loop starts."""

    __slots__ = ("path",)

    fmt: ClassVar[str]
    extra: ClassVar[str | None] = None  # the pip extra that reading this format needs

    def __init__(self, path: Path) -> None:
        self.path = path

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    @abstractmethod
    def files(self) -> list[Path]:
        """The files whose bytes define the input, in row order (the resume fingerprint)."""

    def check(self, columns: Mapping[str, str]) -> None:
        """Before the run: the input can be read and every mapped column exists.

        Raises InputError naming the fix. Reads no rows, at most schemas.
        """
        if not self.path.exists():
            raise InputError(f"input {self.path} does not exist; check input: in the config")
        self._check(columns)

    @abstractmethod
    def _check(self, columns: Mapping[str, str]) -> None: ...

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
    def read(
        self,
        columns: Mapping[str, str],
        skip: Container[int] = (),
        *,
        piece: Slice | None = None,
        start: tuple[int, int] = (0, 0),
        marks: Marks | None = None,
    ) -> AsyncIterator[tuple[int, Item]]:
        """Yield (global 0-based row number, item) for each row not in ``skip``.

        ``piece`` restricts the rows to one slice of :meth:`plan`. ``start`` is
        (row, byte offset) of a snapshot's seek: every row before it is finished
        (inside ``piece`` when both are given). ``marks`` gets where JSONL lines
        start as the reader goes; columnar formats have no offsets to note.
        """
