"""Parquet input: one file, or a folder of them read in sorted order.

Only footers are read to count, check and plan: a shard is a run of whole row groups
(a row group cannot be split without reading it), balanced by rows, so a shard reads
its own row groups and no other. Within a read, a row group whose rows are all
finished is not read either.
"""

from __future__ import annotations

from collections.abc import Container
from pathlib import Path

from engine.input.columnar import CHUNK_ROWS, Batches, ColumnarSource
from engine.input.slices import Slice, group_cuts, row_bounds, slices_between

PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")
PARQUET_MAGIC = b"PAR1"


class ParquetSource(ColumnarSource):
    """A Parquet file or a folder of Parquet files, rows numbered across files."""

    __slots__ = ()

    fmt = "parquet"
    extra = "parquet"
    what = "*.parquet files (a file, or a folder of them)"
    needs = "Parquet"
    unreadable = (
        "a file named .parquet (.pq, .parq) is read as Parquet: if it holds JSON lines, "
        "rename it to .jsonl; else write it again as Parquet"
    )

    @classmethod
    def sniff(cls, path: Path) -> bool:
        """A folder holding ``*.parquet`` files, a file named ``*.parquet`` (missing or
        not), or a file starting with Parquet's magic bytes."""
        if path.is_dir():
            return bool(parquet_files(path))
        if path.suffix.lower() in PARQUET_SUFFIXES:
            return True
        try:
            with path.open("rb") as f:
                return f.read(len(PARQUET_MAGIC)) == PARQUET_MAGIC
        except OSError:
            return False  # a missing file is reported by whoever reads it

    def files(self) -> list[Path]:
        return parquet_files(self.path) if self.path.is_dir() else [self.path]

    def _plan(self, shards: int) -> list[Slice]:
        sizes = [size for file in self.files() for size in self._group_rows(file)]
        return slices_between(row_bounds(group_cuts(sizes, shards)))

    def _schema_names(self, file: Path) -> list[str]:
        return list(self._module("pyarrow.parquet").read_schema(file).names)

    def _rows_in(self, file: Path) -> int:
        with self._module("pyarrow.parquet").ParquetFile(file) as pf:
            return int(pf.metadata.num_rows)

    def _group_rows(self, file: Path) -> list[int]:
        with self._module("pyarrow.parquet").ParquetFile(file) as pf:
            meta = pf.metadata
            return [int(meta.row_group(group).num_rows) for group in range(meta.num_row_groups)]

    def _batches(self, file: Path, first: int, skip: Container[int], lo: int, hi: int) -> Batches:
        with self._module("pyarrow.parquet").ParquetFile(file) as pf:
            for group in range(pf.metadata.num_row_groups):
                size = int(pf.metadata.row_group(group).num_rows)
                wanted = range(max(first, lo), min(first + size, hi))
                if all(i in skip for i in wanted):  # none wanted, or all finished
                    yield first, size, None
                    first += size
                    continue
                for batch in pf.iter_batches(batch_size=CHUNK_ROWS * 8, row_groups=[group]):
                    yield first, int(batch.num_rows), batch
                    first += int(batch.num_rows)


def parquet_files(folder: Path) -> list[Path]:
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
