"""Shard plans: the input cut into slices that hold every row once, and reading a slice.

JSONL is cut by bytes at line starts; Parquet at row-group boundaries read from the
footers; saved datasets at even row numbers. Reading the slices one by one must give
what reading the whole input gives, with the same global row numbers.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import orjson
import pytest

from engine.checkpoint.journal import LineSet
from engine.input.base import START, Seek
from engine.input.hf_dataset import HfDatasetSource
from engine.input.jsonl import JsonlSource
from engine.input.parquet import ParquetSource
from engine.input.reader import Marks, line_starts, read_lines
from engine.input.slices import Slice, even_cuts, group_cuts
from engine.input.sources import Resume, Source, open_source

try:
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError:  # the extra is optional: tests that need it are skipped
    pa = pq = None

needs_pyarrow = pytest.mark.skipif(pa is None, reason="pyarrow is not installed")
BOM = b"\xef\xbb\xbf"


# --- helpers: what the reader should give, worked out the slow, obvious way -------------


def starts_of(data: bytes) -> list[int]:
    """The byte offset where each line starts (line numbers count blank lines)."""
    starts = [0] + [i + 1 for i, byte in enumerate(data) if byte == ord("\n")]
    if len(data) and data.endswith(b"\n"):
        starts.pop()  # after the final newline there is no line
    return starts if data else []


def lines_between(data: bytes, start: int, end: int) -> list[tuple[int, bytes]]:
    """(line number, bytes) of the non-blank lines whose first byte is in [start, end)."""
    out = []
    for number, at in enumerate(starts_of(data)):
        stop = data.find(b"\n", at)
        raw = data[at : len(data) if stop < 0 else stop]
        if at == 0 and raw.startswith(BOM):
            raw = raw[len(BOM) :]
        if start <= at < end and raw.strip():
            out.append((number, raw))
    return out


def first_start_at_or_after(data: bytes, offset: int) -> tuple[int, int]:
    for number, at in enumerate(starts_of(data)):
        if at >= offset:
            return number, at
    return len(starts_of(data)), len(data)


def check_plan(pieces: list[Slice], shards: int, total_rows: int) -> None:
    """In order, contiguous, covering every row number once."""
    assert len(pieces) == shards
    assert [p.index for p in pieces] == list(range(shards))
    assert pieces[0].first_row == 0
    assert pieces[-1].next_row == total_rows
    assert all(a.next_row == b.first_row for a, b in itertools.pairwise(pieces))


def random_jsonl(rng: random.Random) -> bytes:
    """A small file of JSON lines, blank and whitespace-only lines, CRLF or LF endings,
    sometimes a BOM, sometimes no final newline."""
    lines = []
    for i in range(rng.randint(0, 12)):
        kind = rng.random()
        if kind < 0.15:
            lines.append(b"")
        elif kind < 0.25:
            lines.append(b"  \t")
        else:
            lines.append(orjson.dumps({"n": i, "pad": "x" * rng.randint(0, 9)}))
    ending = rng.choice([b"\n", b"\r\n"])
    data = ending.join(lines)
    if lines and rng.random() < 0.6:
        data += ending
    if rng.random() < 0.3:
        data = BOM + data
    return data


async def read_all(
    source: Source,
    *,
    piece: Slice | None = None,
    skip: Any = (),
    start: Seek = START,
    marks: Marks | None = None,
) -> list[tuple[int, Any]]:
    """(row number, record) for each row the source reads."""
    resume = Resume(skip, start, marks)
    return [(row.line, row.record) async for row in source.read(piece, resume)]


# --- JSONL ---------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 2, 5, 1 << 24])
def test_line_starts_finds_the_next_line_start_for_every_offset(tmp_path: Path, chunk: int) -> None:
    data = BOM + b'{"a": 1}\r\n\n  \n{"b": 22}\n{"c": 333}'  # CRLF, blanks, no final newline
    path = tmp_path / "in.jsonl"
    path.write_bytes(data)
    offsets = list(range(-1, len(data) + 3))

    got = line_starts(path, offsets, chunk=chunk)

    assert got == [first_start_at_or_after(data, max(offset, 0)) for offset in offsets]


@pytest.mark.parametrize("chunk", [2, 1 << 20])
async def test_a_byte_range_reads_the_lines_that_start_in_it(tmp_path: Path, chunk: int) -> None:
    """Any [start, end), start a line start: the lines whose first byte is in it, a line
    that straddles ``end`` read to its newline, numbered from the start's line."""
    data = BOM + b'{"a": 1}\r\n\n  \n{"b": 22}\n{"c": 333}'
    path = tmp_path / "in.jsonl"
    path.write_bytes(data)
    for number, begin in enumerate(starts_of(data)):
        for end in range(begin, len(data) + 2):
            got = [
                item async for item in read_lines(path, chunk=chunk, start=(number, begin), end=end)
            ]
            assert got == lines_between(data, begin, end), (begin, end)


async def test_slices_of_random_files_hold_every_line_once_with_its_number(
    tmp_path: Path,
) -> None:
    """Property-style, over seeded random files: blank lines, CRLF, BOM, no final
    newline, cuts inside lines, more shards than lines."""
    rng = random.Random(20240611)
    path = tmp_path / "in.jsonl"
    for _ in range(60):
        data = random_jsonl(rng)
        path.write_bytes(data)
        total = len(starts_of(data))
        whole = [item async for item in read_lines(path)]
        assert whole == lines_between(data, 0, len(data) + 1)
        offsets = list(range(len(data) + 2))  # a cut at every byte: all straddles
        assert line_starts(path, offsets, chunk=2) == [
            first_start_at_or_after(data, offset) for offset in offsets
        ]
        for shards in sorted({1, 2, 3, 5, total, total + 3} - {0}):
            pieces = JsonlSource(path).plan(shards)
            check_plan(pieces, shards, total)
            assert pieces[0].start == 0 and pieces[-1].end == len(data)
            assert all(a.end == b.start for a, b in itertools.pairwise(pieces))
            got = []
            for piece in pieces:
                # A line start, or the end of a file with no final newline (empty slice).
                assert piece.start in (0, len(data)) or data[piece.start - 1] == ord("\n")
                assert (piece.rows == 0) == (piece.start == piece.end)
                lines = [item async for item in read_lines(path, chunk=3, **bounds(piece))]
                assert lines == lines_between(data, piece.start, piece.end)
                got += lines
            assert got == whole, (data, shards)


def bounds(piece: Slice) -> dict[str, Any]:
    return {"start": (piece.first_row, piece.start), "end": piece.end}


@pytest.mark.parametrize("bom", [b"", BOM])
@pytest.mark.parametrize("ending", [b"\n", b"\r\n"])
@pytest.mark.parametrize("final_newline", [True, False])
async def test_each_slice_reads_through_the_source_opened_either_way(
    tmp_path: Path, bom: bytes, ending: bytes, final_newline: bool
) -> None:
    rows = [orjson.dumps({"n": i, "pad": "y" * (i % 5)}) for i in range(23)]
    data = bom + ending.join(rows) + (ending if final_newline else b"")
    path = tmp_path / "in.jsonl"
    path.write_bytes(data)
    source = open_source(path)
    assert isinstance(source, JsonlSource) and source.files() == [path]
    assert source.count() == 23

    pieces = source.plan(4)

    check_plan(pieces, 4, 23)
    assert all(p.rows for p in pieces)
    by_source = []
    by_input = []
    for piece in pieces:
        by_source += await read_all(source, piece=piece)
        by_input += await read_all(JsonlSource(path), piece=piece)
    assert by_source == by_input
    assert [n for n, _ in by_source] == list(range(23))
    assert [record["n"] for _, record in by_source] == list(range(23))  # BOM gone


def test_blank_lines_count_in_a_slice_but_not_in_the_total(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"a": 1}\n\n   \n{"b": 2}\n')
    source = JsonlSource(path)
    assert source.plan(1) == [Slice(0, 0, 4, 0, path.stat().st_size)]
    assert source.count() == 2


def test_more_shards_than_lines_leaves_slices_empty(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": 2}')
    pieces = JsonlSource(path).plan(7)
    check_plan(pieces, 7, 2)
    assert sorted(p.rows for p in pieces) == [0, 0, 0, 0, 0, 1, 1]
    assert all(p.start == p.end for p in pieces if not p.rows)


async def test_an_empty_file_plans_empty_slices(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"")
    source = JsonlSource(path)
    pieces = source.plan(3)
    assert pieces == [Slice(k, 0, 0, 0, 0) for k in range(3)]
    assert await read_all(source, piece=pieces[1]) == []


async def test_a_resume_inside_a_slice_seeks_and_skips(tmp_path: Path) -> None:
    rows = [orjson.dumps({"n": i}) for i in range(30)]
    data = b"\n".join(rows) + b"\n"
    path = tmp_path / "in.jsonl"
    path.write_bytes(data)
    piece = JsonlSource(path).plan(3)[1]
    seek_line = piece.first_row + 3
    seek = (seek_line, starts_of(data)[seek_line])
    skip = LineSet()
    for n in (*range(seek_line), seek_line + 1):
        skip.add(n)
    marks = Marks()

    got = await read_all(JsonlSource(path), piece=piece, skip=skip, start=seek, marks=marks)

    wanted = [n for n in range(seek_line, piece.next_row) if n != seek_line + 1]
    assert [n for n, _ in got] == wanted
    assert marks.before(piece.next_row) is not None


def test_zero_shards_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"{}\n")
    with pytest.raises(ValueError, match="shards must be"):
        JsonlSource(path).plan(0)


# --- Slice and the cut arithmetic ------------------------------------------------------


def test_a_slice_round_trips_through_json() -> None:
    piece = Slice(index=2, first_row=100, rows=50, start=4096, end=8192)
    assert Slice.from_json(orjson.loads(orjson.dumps(piece.to_json()))) == piece
    assert Slice.from_json({"index": 0, "first_row": 0, "rows": 3}) == Slice(0, 0, 3)
    assert piece.next_row == 150


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([1, 2], "must be a JSON object"),
        ({"index": 0, "first_row": 0, "rows": 1, "bytes": 3}, "unknown slice keys bytes"),
        ({"index": 0, "rows": 1}, "needs first_row"),
        ({"index": -1, "first_row": 0, "rows": 1}, "index must be a whole number"),
        ({"index": 0, "first_row": "0", "rows": 1}, "first_row must be a whole number"),
        ({"index": 0, "first_row": 0, "rows": True}, "rows must be a whole number"),
        ({"index": 0, "first_row": 0, "rows": 1.5}, "rows must be a whole number"),
        ({"index": 0, "first_row": 0, "rows": 1, "start": 9, "end": 4}, "before its start"),
    ],
)
def test_a_bad_slice_is_refused_naming_the_field(raw: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Slice.from_json(raw)


def test_even_cuts_and_group_cuts() -> None:
    assert even_cuts(10, 3) == [0, 3, 6, 10]
    assert even_cuts(0, 2) == [0, 0, 0]
    assert group_cuts([4, 4, 4, 4], 2) == [0, 8, 16]
    assert group_cuts([4, 4, 4, 4], 3) == [0, 4, 12, 16]  # 5.3 -> 4, 10.7 -> 12
    assert group_cuts([10], 3) == [0, 0, 10, 10]  # one group: one slice holds it
    assert group_cuts([], 2) == [0, 0, 0]
    assert group_cuts([2, 2], 2) == [0, 2, 4]
    assert group_cuts([3, 2], 2) == [0, 3, 5]
    assert group_cuts([2, 2], 4) == [0, 0, 2, 2, 4]  # on a tie, the earlier boundary
    assert group_cuts([0, 5, 0, 5], 2) == [0, 5, 10]


# --- Parquet ----------------------------------------------------------------------------


def uid_rows(start: int, n: int) -> list[dict[str, Any]]:
    return [{"uid": f"u{i}", "prompt": f"q{i}"} for i in range(start, start + n)]


def write_parts(folder: Path, sizes: list[int], row_group_size: int) -> None:
    folder.mkdir()
    first = 0
    for k, n in enumerate(sizes):
        table = pa.Table.from_pylist(uid_rows(first, n))
        pq.write_table(table, folder / f"part-{k}.parquet", row_group_size=row_group_size)
        first += n


@needs_pyarrow
async def test_parquet_slices_are_whole_row_groups_balanced_across_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "data"
    write_parts(folder, [10, 7, 5], row_group_size=3)
    groups = [3, 3, 3, 1, 3, 3, 1, 3, 2]  # in file order
    group_starts = [sum(groups[:k]) for k in range(len(groups))]
    source = open_source(folder)
    assert isinstance(source, ParquetSource) and source.count() == 22
    # A spy, not a fake: it notes which row groups are read and reads them.
    read: list[int] = []
    iter_batches = pq.ParquetFile.iter_batches

    def spy(self: Any, *args: Any, **kw: Any) -> Any:
        read.extend(kw["row_groups"])
        return iter_batches(self, *args, **kw)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)

    for shards in range(1, 13):
        pieces = source.plan(shards)
        check_plan(pieces, shards, 22)
        for piece in pieces:
            assert {piece.first_row, piece.next_row} <= {*group_starts, 22}
            assert piece.start == piece.end == 0
            assert abs(piece.rows - 22 / shards) <= max(groups)  # within a group of even
            read.clear()
            got = await read_all(source, piece=piece)
            assert [(n, row["uid"]) for n, row in got] == [
                (n, f"u{n}") for n in range(piece.first_row, piece.next_row)
            ]
            inside = [s for s in group_starts if piece.first_row <= s < piece.next_row]
            assert len(read) == len(inside)  # its own row groups, no other
        whole = [
            n for piece in pieces for n, _ in await read_all(ParquetSource(folder), piece=piece)
        ]
        assert whole == list(range(22))


@needs_pyarrow
async def test_one_row_group_goes_whole_to_one_slice(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(uid_rows(0, 10)), path)
    source = ParquetSource(path)

    pieces = source.plan(3)

    check_plan(pieces, 3, 10)
    assert [p.rows for p in pieces] == [0, 10, 0]
    assert [await read_all(source, piece=p) != [] for p in pieces] == [False, True, False]


@needs_pyarrow
async def test_a_resume_inside_a_parquet_slice_skips_and_starts_late(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    write_parts(folder, [12, 12], row_group_size=4)
    piece = open_source(folder).plan(2)[1]
    assert (piece.first_row, piece.rows) == (12, 12)
    skip = LineSet()
    for n in (15, 18):
        skip.add(n)

    got = await read_all(open_source(folder), piece=piece, skip=skip, start=(14, 0))

    assert [n for n, _ in got] == [14, 16, 17, 19, 20, 21, 22, 23]


# --- saved Hugging Face datasets -----------------------------------------------------------


@needs_pyarrow
async def test_a_saved_dataset_is_cut_into_even_row_ranges(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "hf"
    datasets.Dataset.from_list(uid_rows(0, 25)).save_to_disk(str(path), num_shards=3)
    source = open_source(path)
    assert isinstance(source, HfDatasetSource) and len(source.files()) == 3

    pieces = source.plan(4)

    assert [(p.first_row, p.rows) for p in pieces] == [(0, 6), (6, 6), (12, 6), (18, 7)]
    for piece in pieces:
        got = await read_all(source, piece=piece)
        assert [(n, row["uid"]) for n, row in got] == [
            (n, f"u{n}") for n in range(piece.first_row, piece.next_row)
        ]
        via_input = await read_all(HfDatasetSource(path), piece=piece)
        assert via_input == got
    skip = LineSet()
    for n in range(0, 25, 2):
        skip.add(n)
    got = await read_all(source, piece=pieces[1], skip=skip, start=(8, 0))
    assert [n for n, _ in got] == [9, 11]
    many = source.plan(30)
    check_plan(many, 30, 25)
    assert sorted({p.rows for p in many}) == [0, 1]
