"""Shards of an input: the :class:`Slice` a plan file stores, and the arithmetic of cuts.

A sharded run gives each worker one slice and lets it read only that part of the
input. Planning must not read the input into memory, so each format finds its own
boundaries cheaply (JSONL: line starts near even byte offsets; Parquet: row-group
boundaries from the footers; saved datasets: even row numbers), then hands them to
:func:`slices_between`. The functions here are pure: values in, values out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate, pairwise
from typing import Any

_FIELDS = ("index", "first_row", "rows", "start", "end")


@dataclass(frozen=True, slots=True)
class Slice:
    """One shard: ``rows`` row numbers from ``first_row`` (global, 0-based).

    For JSONL the row numbers are line numbers, blank lines included, and ``start``
    and ``end`` are the byte range [start, end) holding the lines whose first byte
    lies in it (``start`` is always a line start). Columnar inputs leave both at 0:
    the row numbers say everything there.
    """

    index: int
    first_row: int
    rows: int
    start: int = 0
    end: int = 0

    def __post_init__(self) -> None:
        for name in _FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"slice {name} must be a whole number >= 0, got {value!r}")
        if self.end < self.start:
            raise ValueError(f"slice end {self.end} is before its start {self.start}")

    @property
    def next_row(self) -> int:
        """The row number just past the slice: the next slice's ``first_row``."""
        return self.first_row + self.rows

    def to_json(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in _FIELDS}

    @classmethod
    def from_json(cls, raw: Any) -> Slice:
        """A slice from :meth:`to_json`'s mapping; ValueError names what is wrong."""
        if not isinstance(raw, Mapping):
            raise ValueError(f"a slice must be a JSON object, got {type(raw).__name__}")
        unknown = sorted(str(key) for key in raw if key not in _FIELDS)
        if unknown:
            raise ValueError(f"unknown slice keys {', '.join(unknown)}; allowed: {_FIELDS}")
        missing = [name for name in _FIELDS[:3] if name not in raw]
        if missing:
            raise ValueError(f"a slice needs {', '.join(missing)}")
        return cls(**{str(key): value for key, value in raw.items()})


def check_shards(shards: int) -> None:
    """ValueError unless ``shards`` is a usable shard count."""
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards must be a whole number >= 1, got {shards!r}")


def even_cuts(total: int, shards: int) -> list[int]:
    """``shards + 1`` cut points from 0 to ``total``, as evenly spaced as whole numbers go."""
    return [total * k // shards for k in range(shards + 1)]


def group_cuts(sizes: Sequence[int], shards: int) -> list[int]:
    """``shards + 1`` row numbers, each a boundary between whole groups of ``sizes`` rows.

    Each inner cut is the group boundary nearest its ideal point ``total * k / shards``
    (the earlier on a tie), so the slices are balanced by rows as far as whole groups
    allow; a group bigger than a slice's share leaves a neighbouring slice empty. Cuts
    never go backwards.
    """
    bounds = [0, *accumulate(sizes)]
    total = bounds[-1]
    cuts = [0]
    j = 0  # the last boundary at or before the ideal point
    for k in range(1, shards):
        # Scaled by shards, the ideal point total * k / shards is a whole number.
        ideal = total * k
        while j + 1 < len(bounds) and bounds[j + 1] * shards <= ideal:
            j += 1
        pick = j
        if j + 1 < len(bounds) and bounds[j + 1] * shards - ideal < ideal - bounds[j] * shards:
            pick = j + 1
        cuts.append(bounds[pick])
    cuts.append(total)
    return cuts


def slices_between(bounds: Sequence[tuple[int, int]]) -> list[Slice]:
    """The slices between consecutive (first row, byte offset) boundaries, numbered in
    order: ``n + 1`` boundaries make ``n`` slices. Columnar inputs pass offset 0."""
    return [
        Slice(index, row, next_row - row, start, end)
        for index, ((row, start), (next_row, end)) in enumerate(pairwise(bounds))
    ]


def row_bounds(cuts: Sequence[int]) -> list[tuple[int, int]]:
    """Row-number cuts as boundaries for :func:`slices_between` (no byte offsets)."""
    return [(cut, 0) for cut in cuts]
