"""Journal replay: done lines, partial work, torn tails, damage, and the LineSet bitmap."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine.checkpoint.journal import (
    EMIT_FAILED,
    EMIT_OUTPUT,
    SPENT,
    WRITING,
    LineSet,
    Replay,
    apply,
    apply_written,
    encode,
    iter_lines,
    replay_segments,
    segment_number,
    segment_path,
    segments,
    split_checksum,
)
from engine.errors import CheckpointError
from tests.journal_support import replay


def turn(line: int, i: int, text: str = "reply") -> dict[str, Any]:
    return {"k": "t", "l": line, "i": i, "c": text, "p": 3, "o": 2, "f": "stop"}


def emit(line: int, end: int, kind: str = EMIT_OUTPUT) -> dict[str, Any]:
    return {"k": kind, "l": line, "e": end}


def write(path: Path, *records: dict[str, Any] | bytes) -> bytes:
    data = b"".join(r if isinstance(r, bytes) else encode(r) for r in records)
    path.write_bytes(data)
    return data


BIG = 10**9  # an output file size that vouches for every emit


@pytest.fixture
def journal(tmp_path: Path) -> Path:
    return tmp_path / "journal.jsonl"


# --- encode ------------------------------------------------------------------------------


def test_encode_is_one_compact_line() -> None:
    # With its checksum last: the CRC32 of the record's JSON without it.
    line = encode({"k": "t", "l": 1, "c": "a\nb"})
    assert line.startswith(b'{"k":"t","l":1,"c":"a\\nb","z":') and line.endswith(b"}\n")
    assert line.count(b"\n") == 1


def test_a_record_past_5_kib_carries_the_same_checksum() -> None:
    # Checksummed in pieces (the GIL kept): the line reads back whole.
    line = encode({"k": "t", "l": 1, "c": "x" * 20_000})
    body, whole = split_checksum(line[:-1])
    assert whole is True and body == b'{"k":"t","l":1,"c":"' + b"x" * 20_000 + b'"}'


def test_a_written_batch_gives_the_state_its_records_give_one_by_one() -> None:
    # The writer's batch: work records, each output row's v record (with what it spent),
    # then the emits of its rows; apply_written leaves no v record placed.
    records = [
        turn(0, 0),
        {"k": WRITING, "l": 0, SPENT: 0.25, "p": 3, "o": 2, "b": 0, "e": 10},
        turn(1, 0),
        {"k": WRITING, "l": 2, "b": 10, "e": 30},
        {"k": WRITING, "l": 3, SPENT: 0.5, "p": 1, "o": 1, "b": 30, "e": 40},
    ]
    emits = [emit(0, 10), emit(2, 30), emit(3, 40), emit(4, 7, EMIT_FAILED)]
    want = Replay()
    for record in [*records, *emits]:
        apply(want, record)
    got = Replay()
    apply_written(got, records, emits)
    assert got == want
    assert got.writing == {} and got.spent_usd == 0.75 and got.spent_tokens == 7
    assert got.partial == {1: [turn(1, 0)]} and got.rows_ok == 3 and got.rows_failed == 1


# --- replay ------------------------------------------------------------------------------


def test_missing_journal_is_an_empty_replay(journal: Path) -> None:
    state = replay(journal, 0, 0)
    assert len(state.done) == 0
    assert state.partial == {}
    assert (state.records, state.journal_end, state.out_end) == (0, 0, 0)


def test_replay_of_work_and_emit_records(journal: Path) -> None:
    data = write(
        journal,
        turn(0, 0, "a"),
        turn(1, 0, "b"),
        turn(0, 1, "c"),
        emit(0, 120),
        turn(2, 0, "d"),
        emit(2, 80, EMIT_FAILED),
        turn(1, 1, "e"),
    )
    state = replay(journal, out_size=120, failed_size=80)

    assert 0 in state.done and 2 in state.done and 1 not in state.done
    assert len(state.done) == 2
    # Finished lines drop their partial records; unfinished ones keep theirs in order.
    assert state.partial == {1: [turn(1, 0, "b"), turn(1, 1, "e")]}
    assert state.rows_ok == 1 and state.rows_failed == 1
    assert state.out_end == 120 and state.failed_end == 80
    assert state.records == 7
    assert state.work_records == 5
    assert state.journal_end == len(data)
    assert state.damaged == []


def test_out_end_is_the_furthest_vouched_row(journal: Path) -> None:
    write(journal, emit(3, 40), emit(1, 90), emit(2, 65))
    state = replay(journal, out_size=90, failed_size=0)
    assert state.out_end == 90
    assert state.rows_ok == 3


def test_work_after_a_line_is_done_is_ignored(journal: Path) -> None:
    write(journal, turn(4, 0), emit(4, 10), turn(4, 1), emit(4, 20))
    state = replay(journal, out_size=BIG, failed_size=0)
    assert state.partial == {}
    assert state.rows_ok == 1  # the second emit of the same line is not counted again
    assert state.work_records == 1
    assert state.out_end == 10


def test_emit_past_the_end_of_the_output_is_not_done(journal: Path) -> None:
    write(journal, turn(0, 0), emit(0, 50), turn(1, 0, "x"), turn(1, 1, "y"), emit(1, 100))
    state = replay(journal, out_size=99, failed_size=0)  # a power cut lost the last row
    assert 0 in state.done
    assert 1 not in state.done
    assert state.partial == {1: [turn(1, 0, "x"), turn(1, 1, "y")]}
    assert state.out_end == 50
    assert state.rows_ok == 1


def test_failed_emit_is_checked_against_the_failed_file(journal: Path) -> None:
    write(journal, turn(0, 0), emit(0, 30, EMIT_FAILED))
    state = replay(journal, out_size=BIG, failed_size=29)
    assert 0 not in state.done
    assert state.partial == {0: [turn(0, 0)]}
    assert state.failed_end == 0


# --- torn tails and damage ---------------------------------------------------------------


def test_torn_last_line_without_newline_is_dropped(journal: Path) -> None:
    good = encode(turn(0, 0)) + encode(turn(1, 0))
    write(journal, good, encode(turn(2, 0))[:-1])  # complete JSON, but no newline
    state = replay(journal, BIG, 0)
    assert state.journal_end == len(good)
    assert 2 not in state.partial
    assert state.records == 2


def test_half_written_last_line_is_dropped(journal: Path) -> None:
    good = encode(turn(0, 0))
    write(journal, good, b'{"k":"t","l":1,"c":"par')
    state = replay(journal, BIG, 0)
    assert state.journal_end == len(good)
    assert list(state.partial) == [0]
    assert state.damaged == []


def test_invalid_json_on_the_last_line_is_dropped(journal: Path) -> None:
    good = encode(turn(0, 0)) + encode(emit(0, 10))
    write(journal, good, b'{"k":"t","l":1,\x00\x00\n')
    state = replay(journal, BIG, 0)
    assert state.journal_end == len(good)
    assert 0 in state.done
    assert state.partial == {}


def test_blank_and_zero_filled_lines_are_not_damage(journal: Path) -> None:
    write(journal, encode(turn(0, 0)), b"\n", b"\x00\x00\x00\n", encode(turn(0, 1)))
    state = replay(journal, BIG, 0)
    assert state.partial == {0: [turn(0, 0), turn(0, 1)]}


def damaged_journal(journal: Path) -> tuple[int, int, bytes]:
    first = encode(turn(0, 0)) + encode(turn(1, 0))
    bad = b'{"k":"t","l":2,"c":"garb\n'
    rest = encode(turn(1, 1)) + encode(emit(0, 10))
    write(journal, first, bad, rest)
    return len(first), len(bad), first + bad + rest


def test_damage_in_the_middle_is_an_error_naming_the_offset(journal: Path) -> None:
    offset, _, _ = damaged_journal(journal)
    with pytest.raises(CheckpointError) as info:
        replay(journal, BIG, 0)
    message = str(info.value)
    assert f"damaged record at byte {offset}" in message
    assert "turnstile repair" in message
    assert str(journal) in message


def test_repair_skips_and_lists_the_damaged_records(journal: Path) -> None:
    offset, length, data = damaged_journal(journal)
    state = replay(journal, BIG, 0, repair=True)
    assert state.damaged == [(offset, length)]
    assert state.partial == {1: [turn(1, 0), turn(1, 1)]}
    assert 0 in state.done
    assert state.journal_end == len(data)
    assert state.records == 4


def test_repair_lists_every_damaged_record(journal: Path) -> None:
    a, b = encode(turn(0, 0)), encode(turn(0, 1))
    write(journal, a, b"xx\n", b"[1]\n", b, b'{"l":"x","k":"t"}\n', a)
    state = replay(journal, BIG, 0, repair=True)
    assert state.damaged == [(len(a), 3), (len(a) + 3, 4), (len(a) + len(b) + 7, 18)]
    assert state.records == 3


@pytest.mark.parametrize(
    "bad",
    [b"[1, 2]\n", b'{"k": "t"}\n', b'{"k": 1, "l": 0}\n', b'{"k": "t", "l": "0"}\n'],
    ids=["not_object", "no_line", "kind_not_str", "line_not_int"],
)
def test_records_of_the_wrong_shape_count_as_damage(journal: Path, bad: bytes) -> None:
    write(journal, encode(turn(0, 0)), bad, encode(turn(0, 1)))
    with pytest.raises(CheckpointError, match="damaged record at byte"):
        replay(journal, BIG, 0)


# --- LineSet -----------------------------------------------------------------------------


def test_lineset_add_contains_len() -> None:
    lines = LineSet()
    assert len(lines) == 0 and 0 not in lines
    for line in (0, 7, 8, 9, 63, 64):
        lines.add(line)
    lines.add(8)  # twice counts once
    assert len(lines) == 6
    assert all(line in lines for line in (0, 7, 8, 9, 63, 64))
    assert all(line not in lines for line in (1, 6, 10, 62, 65, 1000))


def test_lineset_large_line_numbers() -> None:
    lines = LineSet()
    big = [10_000_019, 3, 123_456_789, 10_000_020]
    for line in big:
        lines.add(line)
    assert len(lines) == 4
    assert all(line in lines for line in big)
    assert 10_000_018 not in lines and 123_456_790 not in lines and 10**12 not in lines


def test_lineset_ignores_non_integers() -> None:
    lines = LineSet()
    lines.add(1)
    assert "1" not in lines
    assert 1.0 not in lines
    assert None not in lines


def test_lineset_matches_a_set() -> None:
    lines = LineSet()
    expected: set[int] = set()
    for i in range(2000):
        line = (i * 7919) % 5003
        lines.add(line)
        expected.add(line)
    assert len(lines) == len(expected)
    assert [n for n in range(5003) if n in lines] == sorted(expected)


# --- iter_lines --------------------------------------------------------------------------


@pytest.mark.parametrize("tail", [b"", b'{"torn":'], ids=["whole", "torn"])
def test_iter_lines_is_the_same_for_any_chunk_size(tmp_path: Path, tail: bytes) -> None:
    path = tmp_path / "j.jsonl"
    records = [encode({"k": "t", "l": i, "c": "x" * (i % 13)}) for i in range(60)]
    path.write_bytes(b"".join(records) + b"\n" + tail)
    big = list(iter_lines(path))
    for chunk in (1, 2, 3, 7, 64):
        assert list(iter_lines(path, chunk=chunk)) == big
    assert len(big) == 61 + (1 if tail else 0)
    assert big[0] == (0, records[0][:-1], True)
    assert big[60] == (sum(len(r) for r in records), b"", True)
    if tail:
        assert big[-1] == (sum(len(r) for r in records) + 1, tail, False)


def test_iter_lines_offsets_point_at_each_line(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    data = b"a\nbb\n\nccc"
    path.write_bytes(data)
    lines = list(iter_lines(path, chunk=2))
    assert lines == [(0, b"a", True), (2, b"bb", True), (5, b"", True), (6, b"ccc", False)]
    for offset, raw, _ in lines:
        assert data[offset : offset + len(raw)] == raw


def test_lineset_bytes_round_trip_and_compare_by_content() -> None:
    lines = LineSet()
    for line in (0, 9, 10_000, 77):
        lines.add(line)
    again = LineSet.from_bytes(lines.to_bytes())
    assert again == lines and len(again) == 4 and 77 in again and 78 not in again
    assert lines.to_bytes() == lines.to_bytes().rstrip(b"\0")  # no trailing zeros
    grown = lines.copy()
    grown.add(5)
    assert grown != lines and len(lines) == 4 and 5 not in lines
    assert LineSet() == LineSet.from_bytes(b"\0\0")


def test_lineset_refuses_negative_lines() -> None:
    lines = LineSet()
    lines.add(7)
    assert -1 not in lines and -8 not in lines


# --- segments ------------------------------------------------------------------------------


def test_segment_zero_is_the_journal_of_old_checkpoints(tmp_path: Path) -> None:
    assert segment_path(tmp_path, 0) == tmp_path / "journal.jsonl"
    assert segment_path(tmp_path, 12) == tmp_path / "journal.000012.jsonl"
    for n in (0, 1, 12, 1_234_567):
        assert segment_number(segment_path(tmp_path, n)) == n
    with pytest.raises(ValueError):
        segment_number(tmp_path / "journal.jsonl.damaged")


def test_segments_lists_only_segments_in_order(tmp_path: Path) -> None:
    assert segments(tmp_path / "missing") == []
    for name in ("journal.000010.jsonl", "journal.jsonl", "journal.000002.jsonl"):
        (tmp_path / name).write_bytes(b"")
    for name in ("journal.jsonl.damaged", "journal.000003.jsonl.repair", "journal.x.jsonl"):
        (tmp_path / name).write_bytes(b"")
    assert [n for n, _ in segments(tmp_path)] == [0, 2, 10]


def test_replaying_segments_is_replaying_their_concatenation(tmp_path: Path) -> None:
    records = [turn(0, 0), turn(1, 0), emit(0, 50), turn(1, 1), emit(1, 90), turn(2, 0)]
    whole = tmp_path / "whole.jsonl"
    write(whole, *records)
    parts = [(0, records[:2]), (1, records[2:3]), (2, []), (3, records[3:])]
    paths = []
    for n, part in parts:
        path = tmp_path / f"journal.{n:06d}.jsonl"
        write(path, *part)
        paths.append((n, path))
    state = Replay()
    replay_segments(state, paths, (BIG, BIG, BIG))
    want = replay(whole, BIG, BIG)
    assert (state.done, state.partial, state.records) == (want.done, want.partial, want.records)
    assert list(state.emits) == list(want.emits) == [0, 50, 1, 90]
    assert (state.segment, state.journal_end) == (3, paths[-1][1].stat().st_size)
