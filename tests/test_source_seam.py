"""A new input format is one module: a CSV source written against the public source
interface alone (engine.input.sources), registered from the test, read by real runs."""

from __future__ import annotations

import csv
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import engine
from engine.errors import InputError
from engine.input.sources import (
    FRESH,
    Resume,
    Row,
    Slice,
    Source,
    formats,
    open_source,
    register,
    rename_columns,
    row_id,
    unregister,
)
from engine.testing.mock_server import MockServer
from tests.conftest import read_jsonl, write_jsonl


class CsvSource(Source):
    """A CSV file with a header row: each row a record of strings."""

    __slots__ = ()

    fmt = "csv"
    what = "CSV file (*.csv)"

    @classmethod
    def sniff(cls, path: Path) -> bool:
        return path.suffix.lower() == ".csv" and not path.is_dir()

    def files(self) -> list[Path]:
        return [self.path]

    def _check(self) -> None:
        with self.path.open(newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        for key, column in self.columns.items():
            if column not in header:
                raise InputError(f"input_columns.{key}: {self.path} has no column {column!r}")

    def count(self) -> int:
        return len(self._records())

    def _plan(self, shards: int) -> list[Slice]:
        total = self.count()
        cuts = [total * k // shards for k in range(shards + 1)]
        return [Slice(k, cuts[k], cuts[k + 1] - cuts[k]) for k in range(shards)]

    async def read(self, piece: Slice | None = None, resume: Resume = FRESH) -> AsyncIterator[Row]:
        records = await anyio.to_thread.run_sync(self._records)
        lo = max(resume.seek[0], piece.first_row if piece else 0)
        for line in range(lo, piece.next_row if piece else len(records)):
            if line not in resume.done:
                record = rename_columns(records[line], self.columns)
                yield Row(line, row_id(record, line), record)

    def _records(self) -> list[dict[str, Any]]:
        with self.path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))


@pytest.fixture
def csv_source() -> Iterator[type[Source]]:
    register(CsvSource)
    try:
        yield CsvSource
    finally:
        unregister(CsvSource)


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


ROWS = [
    {"id": "a", "question": "first question", "lang": "en"},
    {"id": "", "question": "second question", "lang": "fr"},  # an empty id is still an id
    {"id": "c", "question": "   ", "lang": "de"},  # a blank prompt: the row fails
    {"id": "d", "question": "fourth question", "lang": "en"},
]


def test_a_registered_source_is_sniffed_first_and_unregistered_is_gone(
    tmp_path: Path, csv_source: type[Source]
) -> None:
    path = write_csv(tmp_path / "in.csv", ROWS)
    assert formats() == ("csv", "hf", "parquet", "jsonl")
    source = open_source(path, {"prompt": "question"})
    assert isinstance(source, csv_source) and source.count() == 4
    pieces = source.plan(3)
    assert [(p.first_row, p.rows) for p in pieces] == [(0, 1), (1, 1), (2, 2)]
    unregister(csv_source)
    assert open_source(path).fmt == "jsonl"  # the catch-all takes any file


def test_a_path_no_format_takes_names_the_path_and_the_formats(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(InputError) as info:
        open_source(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "hf, parquet, jsonl" in message
    assert "no *.parquet files" in message and "point input: at" in message


def test_a_run_reads_the_new_format_and_resumes(
    tmp_path: Path, threaded_mock: MockServer, csv_source: type[Source]
) -> None:
    write_csv(tmp_path / "in.csv", ROWS)
    config = {
        "task": "distill",
        "input": str(tmp_path / "in.csv"),
        "input_columns": {"prompt": "question"},
        "output": str(tmp_path / "out" / "distilled.jsonl"),
        "checkpoint_dir": str(tmp_path / "ck"),
        "models": {"teacher": {"base_url": threaded_mock.base_url, "model": "mock"}},
        "distill": {"model": "teacher"},
    }

    summary = engine.run(config)

    assert (summary.rows_ok, summary.rows_failed) == (3, 1)
    out = {row["id"]: row for row in read_jsonl(summary.output)}
    assert set(out) == {"a", "", "d"}
    assert out["d"]["lang"] == "en" and out["d"]["messages"][0]["content"] == "fourth question"
    assert "question" not in out["a"]  # the mapped column became the prompt
    [failed] = read_jsonl(summary.failed_output)
    assert (failed["id"], failed["line"]) == ("c", 2) and "'prompt' is empty" in failed["error"]
    again = engine.run(config)
    assert again.resumed and again.turns == 0 and again.rows_ok == 3


def test_jsonl_is_still_read_beside_the_new_format(
    tmp_path: Path, threaded_mock: MockServer, csv_source: type[Source]
) -> None:
    write_jsonl(tmp_path / "in.jsonl", [{"id": 7, "prompt": "q"}, {"id": True, "prompt": "r"}])
    config = {
        "task": "distill",
        "input": str(tmp_path / "in.jsonl"),
        "output": str(tmp_path / "out.jsonl"),
        "checkpoint_dir": str(tmp_path / "ck"),
        "models": {"teacher": {"base_url": threaded_mock.base_url, "model": "mock"}},
        "distill": {"model": "teacher"},
    }
    summary = engine.run(config)
    # One id rule: true is no id, so the row number stands in.
    assert sorted(row["id"] for row in read_jsonl(summary.output)) == [1, 7]
