"""Hugging Face saved datasets: the folder ``datasets.Dataset.save_to_disk`` writes.

Its rows live in Arrow stream files, in the order ``state.json`` lists them; they
are memory-mapped, so a batch costs nothing until its rows are converted, and one
outside a shard or a resume's range is passed over unconverted. Batches can be
sliced, so shards are ranges of row numbers of about equal size. Reading needs no
``datasets`` install, only pyarrow and the files.
"""

from __future__ import annotations

from collections.abc import Container
from pathlib import Path

import orjson

from engine.errors import InputError
from engine.input.columnar import Batches, ColumnarSource
from engine.input.slices import Slice, even_cuts, row_bounds, slices_between


class HfDatasetSource(ColumnarSource):
    """A saved dataset (one split's folder: ``dataset_info.json`` and ``state.json``)."""

    __slots__ = ()

    fmt = "hf"
    extra = "hf"
    what = "saved dataset (a folder with dataset_info.json and state.json)"
    needs = "a saved Hugging Face dataset"
    unreadable = "save the dataset again with Dataset.save_to_disk"

    @classmethod
    def sniff(cls, path: Path) -> bool:
        """A folder with ``dataset_info.json`` and ``state.json``. A DatasetDict's folder
        is refused here, naming a split to point at instead."""
        if not path.is_dir():
            return False
        if (path / "dataset_info.json").is_file() and (path / "state.json").is_file():
            return True
        if (path / "dataset_dict.json").is_file():
            splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
            example = path / (splits[0] if splits else "train")
            raise InputError(
                f"input {path} is a DatasetDict (splits: {', '.join(splits) or 'none'}); "
                f"point input: at one split's folder, e.g. {example}"
            )
        return False

    def files(self) -> list[Path]:
        """The Arrow files in ``state.json``'s order: the order decides the row numbers,
        so it is part of the fingerprint."""
        state_path = self.path / "state.json"
        try:
            state = orjson.loads(state_path.read_bytes())
            names = [str(entry["filename"]) for entry in state["_data_files"]]
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise InputError(
                f"{state_path}: cannot read the saved dataset's file list ({exc}); "
                "save the dataset again with Dataset.save_to_disk"
            ) from exc
        files = [self.path / name for name in names]
        for file in files:
            if not file.is_file():
                raise InputError(
                    f"{file}: listed in {state_path} but missing; save the dataset again "
                    "with Dataset.save_to_disk"
                )
        return files

    def _plan(self, shards: int) -> list[Slice]:
        return slices_between(row_bounds(even_cuts(self.count(), shards)))

    def _schema_names(self, file: Path) -> list[str]:
        pa = self._arrow()
        with pa.memory_map(str(file)) as source:
            return list(pa.ipc.open_stream(source).schema.names)

    def _rows_in(self, file: Path) -> int:
        # A stream file has no footer with a total: add up the batch headers.
        pa = self._arrow()
        with pa.memory_map(str(file)) as source:
            return sum(int(batch.num_rows) for batch in pa.ipc.open_stream(source))

    def _batches(self, file: Path, first: int, skip: Container[int], lo: int, hi: int) -> Batches:
        pa = self._arrow()
        with pa.memory_map(str(file)) as source:
            for batch in pa.ipc.open_stream(source):
                size = int(batch.num_rows)
                wanted = first + size > lo and first < hi
                yield first, size, batch if wanted else None
                first += size
