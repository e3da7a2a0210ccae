"""The JSONL reader: lines, the finished prefix a resume seeks past, and its marks."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.checkpoint.journal import LineSet
from engine.input.reader import Marks, read_lines


async def lines_of(path: Path, **kw: object) -> list[tuple[int, bytes]]:
    return [item async for item in read_lines(path, **kw)]  # type: ignore[arg-type]


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


LINES = [b'{"n": %d, "pad": "%s"}' % (i, b"x" * (i % 7)) for i in range(40)]


@pytest.mark.parametrize("ending", [b"\n", b"\r\n"])
@pytest.mark.parametrize("final_newline", [True, False])
@pytest.mark.parametrize("chunk", [2, 61, 1 << 20])  # 2: the BOM spans two reads
async def test_marks_are_line_starts_and_reading_from_any_gives_the_rest(
    tmp_path: Path, ending: bytes, final_newline: bool, chunk: int
) -> None:
    data = b"\xef\xbb\xbf" + ending.join(LINES) + (ending if final_newline else b"")
    path = write(tmp_path / "in.jsonl", data)
    marks = Marks()
    whole = await lines_of(path, chunk=chunk, marks=marks)
    assert [n for n, _ in whole] == list(range(len(LINES)))
    assert [raw.rstrip(b"\r") for _, raw in whole] == LINES

    noted = list(marks._marks)
    assert noted, "the reader noted no mark"
    for line, offset in noted[:: max(1, len(noted) // 12)] + noted[-1:]:
        if line < len(LINES):
            assert data[offset:].lstrip(b"\xef\xbb\xbf").startswith(LINES[line])
        rest = await lines_of(path, chunk=chunk, start=(line, offset))
        assert rest == whole[line:]


async def test_a_start_skips_what_is_before_it_and_still_honours_the_skip_set(
    tmp_path: Path,
) -> None:
    path = write(tmp_path / "in.jsonl", b"\n".join(LINES) + b"\n")
    offset = sum(len(raw) + 1 for raw in LINES[:10])
    skip = LineSet()
    for n in (*range(10), 12, 13):
        skip.add(n)
    got = await lines_of(path, skip=skip, start=(10, offset))
    assert [n for n, _ in got] == [10, 11, *range(14, 40)]


def test_marks_before_gives_the_last_at_or_before_and_drops_older() -> None:
    marks = Marks()
    for line in (0, 5, 9, 14):
        marks.note(line, line * 100)
    assert marks.before(8) == (5, 500)
    assert marks.before(3) is None  # older marks are gone once a later one served
    assert marks.before(14) == (14, 1400)
    assert Marks().before(10) is None


@pytest.mark.parametrize(
    ("lines", "prefix"),
    [
        ((), 0),
        ((1, 2), 0),
        ((0,), 1),
        (tuple(range(8)), 8),
        (tuple(range(13)), 13),
        ((*range(16), 17), 16),
        ((*range(64), 100), 64),
    ],
)
def test_the_prefix_is_the_first_line_not_done(lines: tuple[int, ...], prefix: int) -> None:
    done = LineSet()
    for line in lines:
        done.add(line)
    assert done.prefix() == prefix
    # From any start: the first line at or after it that is not done.
    for start in range(0, 110, 3):
        assert done.prefix(start) == next(n for n in range(start, 10**6) if n not in done)
