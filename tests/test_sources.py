"""Input sources: Parquet files and folders, saved Hugging Face datasets, column mapping."""

from __future__ import annotations

import base64
import datetime
import decimal
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from engine.checkpoint.journal import LineSet
from engine.errors import InputError
from engine.input.base import row_id
from engine.input.rows import InputRow, parse_row
from engine.input.sources import (
    Resume,
    Row,
    open_source,
    parse_input_columns,
    rename_columns,
)
from tests.conftest import write_jsonl

KEYS = ("messages", "conversations", "prompt", "id")

try:
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError:  # the extra is optional: tests that need it are skipped
    pa = pq = None

needs_pyarrow = pytest.mark.skipif(pa is None, reason="pyarrow is not installed")


def chats(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [
        {
            "uid": f"u{i}",
            "chat": [
                {"role": "user", "content": f"question {i}"},
                {"role": "assistant", "content": "old"},
            ],
            "score": i / 2,
            "tags": [f"t{i % 3}"],
        }
        for i in range(start, start + n)
    ]


def write_parquet(path: Path, rows: list[dict[str, Any]], row_group_size: int = 4) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


async def collect(path: Path, fmt: str, columns: Any = None, skip: Any = ()) -> list[Any]:
    """(row number, record) for each row of the source opened for ``path``."""
    rows = await read_rows(path, fmt, columns, skip)
    return [(row.line, row.record) for row in rows]


async def read_rows(path: Path, fmt: str, columns: Any = None, skip: Any = ()) -> list[Row]:
    source = open_source(path, columns)
    assert source.fmt == fmt
    return [row async for row in source.read(None, Resume(skip))]


def fmt_of(path: Path) -> str:
    return open_source(path).fmt


def rows_in(path: Path, fmt: str) -> int:
    source = open_source(path)
    assert source.fmt == fmt
    return source.count()


def files_of(path: Path, fmt: str) -> list[Path]:
    source = open_source(path)
    assert source.fmt == fmt
    return source.files()


def check(path: Path, fmt: str, columns: dict[str, str]) -> None:
    source = open_source(path, columns)
    assert source.fmt == fmt
    source.check()


# --- detection -------------------------------------------------------------------------


@needs_pyarrow
def test_detects_each_format(tmp_path: Path) -> None:
    assert fmt_of(write_jsonl(tmp_path / "a.jsonl", [{"prompt": "x"}])) == "jsonl"
    assert fmt_of(write_parquet(tmp_path / "b.parquet", chats(2))) == "parquet"
    no_suffix = tmp_path / "c.data"
    no_suffix.write_bytes((tmp_path / "b.parquet").read_bytes())
    assert fmt_of(no_suffix) == "parquet"  # by Parquet's magic bytes
    folder = tmp_path / "folder"
    folder.mkdir()
    write_parquet(folder / "part-0.parquet", chats(2))
    assert fmt_of(folder) == "parquet"
    hf = tmp_path / "hf"
    (hf).mkdir()
    (hf / "dataset_info.json").write_text("{}")
    (hf / "state.json").write_text("{}")
    assert fmt_of(hf) == "hf"


def test_a_folder_of_nothing_usable_names_the_fix(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(InputError, match=r"no \*.parquet files"):
        fmt_of(tmp_path)


@needs_pyarrow
def test_a_dataset_dict_asks_for_one_split(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = chats(3)
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows)}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(InputError, match=r"point input: at one split's folder.*test"):
        fmt_of(tmp_path / "dd")


# --- Parquet -----------------------------------------------------------------------------


@needs_pyarrow
async def test_parquet_rows_round_trip_with_types_and_numbers(tmp_path: Path) -> None:
    rows = chats(10)
    path = write_parquet(tmp_path / "in.parquet", rows)

    got = await collect(path, "parquet")

    assert [i for i, _ in got] == list(range(10))
    assert [row for _, row in got] == rows  # other columns carried, types kept
    assert rows_in(path, "parquet") == 10
    assert files_of(path, "parquet") == [path]


@needs_pyarrow
async def test_a_folder_of_parquet_files_reads_in_sorted_order_numbered_across_files(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    write_parquet(folder / "part-1.parquet", chats(3, start=3))
    write_parquet(folder / "part-0.parquet", chats(3, start=0))
    write_parquet(folder / "sub" / "part-2.parquet", chats(2, start=6))
    (folder / "_SUCCESS").write_text("")
    write_parquet(folder / ".hidden.parquet", chats(5, start=100))

    got = await collect(folder, "parquet")

    assert [(i, row["uid"]) for i, row in got] == [(i, f"u{i}") for i in range(8)]
    assert rows_in(folder, "parquet") == 8
    assert [p.name for p in files_of(folder, "parquet")] == [
        "part-0.parquet",
        "part-1.parquet",
        "part-2.parquet",
    ]


@needs_pyarrow
async def test_column_mapping_renames_and_keeps_other_columns(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "in.parquet", chats(3))

    got = await collect(path, "parquet", {"messages": "chat", "id": "uid"})

    index, row = got[1]
    assert index == 1
    assert row["id"] == "u1" and "uid" not in row
    assert row["messages"][0] == {"role": "user", "content": "question 1"}
    assert "chat" not in row
    assert row["score"] == 0.5 and row["tags"] == ["t1"]
    parsed = decode_input(index, row)
    assert parsed.id == "u1"
    assert parsed.messages[0]["content"] == "question 1"
    assert parsed.extra == {"score": 0.5, "tags": ["t1"]}


@needs_pyarrow
async def test_skip_set_leaves_out_finished_rows_and_whole_row_groups(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "in.parquet", chats(12), row_group_size=4)
    skip = LineSet()
    for i in (0, 1, 2, 3, 5, 11):  # rows 0-3 are a whole row group
        skip.add(i)

    got = await collect(path, "parquet", skip=skip)

    assert [i for i, _ in got] == [4, 6, 7, 8, 9, 10]
    assert [row["uid"] for _, row in got] == [f"u{i}" for i in (4, 6, 7, 8, 9, 10)]


@needs_pyarrow
async def test_values_become_json_values(tmp_path: Path) -> None:
    table = pa.table(
        {
            "prompt": ["hi", None],
            "messages": [None, [{"role": "user", "content": "from messages"}]],
            "blob": [b"\x00\xffbytes", None],
            "price": pa.array([decimal.Decimal("1.25"), None], type=pa.decimal128(5, 2)),
            "wait": pa.array([datetime.timedelta(seconds=3), None]),
            "when": [datetime.datetime(2024, 1, 2, 3, 4, 5), None],
            "meta": pa.array([[("a", 1)], None], type=pa.map_(pa.string(), pa.int64())),
            "imap": pa.array([[(7, 2)], None], type=pa.map_(pa.int64(), pa.int64())),
            "nested": [{"bin": b"x", "n": 1}, None],
            "id": [None, "kept"],
        }
    )
    path = tmp_path / "types.parquet"
    pq.write_table(table, path)

    got = dict(await collect(path, "parquet"))

    first = got[0]
    assert first["prompt"] == "hi"
    assert "messages" not in first  # null counts as absent: the prompt is used
    assert "id" not in first  # so the id falls back to the row number
    assert base64.b64decode(first["blob"]) == b"\x00\xffbytes"
    assert first["price"] == "1.25"
    assert first["wait"] == 3.0
    assert first["meta"] == {"a": 1}
    assert first["imap"] == [[7, 2]]  # a map with non-string keys: [key, value] pairs
    assert first["nested"] == {"bin": base64.b64encode(b"x").decode(), "n": 1}
    orjson.dumps(first)  # every value serialises
    assert decode_input(0, first).id == 0
    second = got[1]
    assert "prompt" not in second
    assert decode_input(1, second).messages == [{"role": "user", "content": "from messages"}]
    assert decode_input(1, second).id == "kept"
    assert row_id(second, 1) == "kept" and row_id(first, 0) == 0
    assert [row.id for row in await read_rows(path, "parquet")] == [0, "kept"]


# --- saved Hugging Face datasets ------------------------------------------------------------


@needs_pyarrow
async def test_a_saved_dataset_streams_from_its_arrow_files(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = chats(25)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"), num_shards=3)
    path = tmp_path / "hf"

    assert fmt_of(path) == "hf"
    got = await collect(path, "hf", {"messages": "chat"})

    assert [i for i, _ in got] == list(range(25))
    assert [row["uid"] for _, row in got] == [r["uid"] for r in rows]
    assert got[7][1]["messages"] == rows[7]["chat"]
    assert isinstance(got[7][1]["score"], float)
    assert rows_in(path, "hf") == 25
    assert [p.name for p in files_of(path, "hf")] == [
        f"data-0000{i}-of-00003.arrow" for i in range(3)
    ]
    skip = LineSet()
    for i in range(0, 25, 2):
        skip.add(i)
    assert [i for i, _ in await collect(path, "hf", skip=skip)] == list(range(1, 25, 2))


# --- the run loop's view: any input -----------------------------------------------------


async def test_jsonl_rows_come_decoded_with_mapping_and_one_id_rule(tmp_path: Path) -> None:
    no_user = {"uid": "u9", "chat": [{"role": "system", "content": "s"}]}
    path = write_jsonl(tmp_path / "in.jsonl", [*chats(3), no_user])
    with path.open("ab") as f:
        f.write(b"{nope\n")

    items = await collect(path, "jsonl", {"messages": "chat"})

    assert [i for i, _ in items] == [0, 1, 2, 3, 4]
    assert all(isinstance(record, dict) for _, record in items)
    assert items[2][1]["messages"][0]["content"] == "question 2"
    mapped = await read_rows(path, "jsonl", {"messages": "chat", "id": "uid"})
    row = parse_row(mapped[2].record, 2)
    assert row.id == "u2" and row.messages[0]["content"] == "question 2"
    assert mapped[4].error is not None and "not valid JSON" in mapped[4].error
    assert rows_in(path, "jsonl") == 5
    assert mapped[3].id == "u9" and mapped[3].error is None
    assert (await read_rows(path, "jsonl"))[3].id == 3
    assert mapped[4].id == 4 and mapped[4].record == {}


def test_rename_columns_leaves_rows_without_the_column_alone() -> None:
    row = {"prompt": "p", "other": 1}
    assert rename_columns(row, {"messages": "chat"}) == row
    assert rename_columns({"chat": [], "messages": "shadowed"}, {"messages": "chat"}) == {
        "messages": []
    }


@needs_pyarrow
def test_check_input_names_a_missing_column_and_its_columns(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "in.parquet", chats(2))
    check(path, "parquet", {"messages": "chat"})
    with pytest.raises(InputError, match=r"input_columns.messages: .* no column 'conversation'"):
        check(path, "parquet", {"messages": "conversation"})
    with pytest.raises(InputError, match="does not exist"):
        check(tmp_path / "missing.parquet", "parquet", {})


@needs_pyarrow
async def test_without_pyarrow_the_error_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_parquet(tmp_path / "in.parquet", chats(2))
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(InputError, match=r"pip install 'turnstile\[parquet\]'"):
        rows_in(path, "parquet")
    with pytest.raises(InputError, match=r"pip install 'turnstile\[parquet\]'"):
        await collect(path, "parquet")


# --- config ------------------------------------------------------------------------------


class Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, key: str, message: str) -> None:
        self.items.append(f"{key}: {message}")


def test_input_columns_are_validated() -> None:
    p = Problems()
    assert parse_input_columns({"messages": "chat", "id": "uid"}, p, KEYS) == {
        "messages": "chat",
        "id": "uid",
    }
    assert p.items == []
    parse_input_columns({"text": "x", "prompt": 3, "messages": "q", "conversations": "q"}, p, KEYS)
    assert any(item.startswith("input_columns.text: unknown key") for item in p.items)
    assert any(item.startswith("input_columns.prompt: must be the name") for item in p.items)
    assert any("already mapped" in item for item in p.items)
    p = Problems()
    parse_input_columns(["chat"], p, KEYS)
    assert p.items and p.items[0].startswith("input_columns: must be a mapping")


def decode_input(line: int, record: dict[str, Any]) -> InputRow:
    return parse_row(record, line)
