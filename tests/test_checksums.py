"""Journal record checksums, the emits index's checksum, and repair's cut: pure, on files."""

from __future__ import annotations

import zlib
from array import array
from pathlib import Path
from typing import Any

import orjson
import pytest

from engine.checkpoint.journal import (
    SUM_BAD,
    SUM_NONE,
    SUM_OK,
    UNREADABLE,
    Replay,
    decode,
    encode,
    repair,
    split_checksum,
)
from engine.checkpoint.snapshot import check_emits, decode_snapshot, encode_snapshot, pack_emits
from engine.errors import CheckpointError
from tests.journal_support import replay

BIG = 10**9


def turn(line: int, i: int, text: str = "reply") -> dict[str, Any]:
    return {"k": "t", "l": line, "i": i, "c": text, "p": 3, "o": 2, "f": "stop"}


def emit(line: int, end: int, kind: str = "o") -> dict[str, Any]:
    return {"k": kind, "l": line, "e": end}


def plain(record: dict[str, Any]) -> bytes:
    """A record as checkpoints from before checksums wrote it."""
    return orjson.dumps(record) + b"\n"


def test_a_record_ends_with_the_crc32_of_its_json() -> None:
    record = turn(1, 0, 'a "quoted", "z":1} reply')
    line = encode(record)
    data = orjson.dumps(record)
    assert line == data[:-1] + b',"z":' + str(zlib.crc32(data)).encode() + b"}\n"
    assert orjson.loads(line)["z"] == zlib.crc32(data)  # still one JSON object a line
    assert split_checksum(line[:-1]) == (data, True)
    assert decode(line[:-1]) == (record, SUM_OK)


def test_a_changed_byte_that_stays_valid_json_fails_the_checksum() -> None:
    line = encode(turn(3, 0, "the reply"))[:-1]
    for changed in (line.replace(b"the", b"thE"), line.replace(b'"l":3', b'"l":4')):
        orjson.loads(changed)
        assert decode(changed) == (None, SUM_BAD)


def test_records_without_a_checksum_are_accepted_unless_strict() -> None:
    line = plain(turn(0, 0))[:-1]
    assert decode(line) == (turn(0, 0), SUM_NONE)
    assert decode(line, strict=True) == (None, SUM_BAD)
    nested = plain({"k": "g", "l": 0, "x": {"a": 1, "z": 5}})[:-1]
    assert decode(nested)[1] == SUM_NONE
    assert decode(b'{"k":"t","l":') == (None, UNREADABLE)


def test_an_old_journal_resumes_and_goes_on_with_checksums(tmp_path: Path) -> None:
    journal = tmp_path / "journal.jsonl"
    journal.write_bytes(plain(turn(0, 0)) + plain(emit(0, 10)) + encode(turn(1, 0)))
    state = replay(journal, BIG, 0)
    assert 0 in state.done and state.partial == {1: [turn(1, 0)]}
    assert state.strict  # it has seen a record with a checksum: the rest must have one


def test_a_record_without_a_checksum_after_one_with_is_damage(tmp_path: Path) -> None:
    journal = tmp_path / "journal.jsonl"
    # The checksum key's name changed ("z" -> "y"): valid JSON, no checksum left.
    renamed = encode(turn(1, 0)).replace(b',"z":', b',"y":')
    journal.write_bytes(encode(turn(0, 0)) + renamed + encode(turn(2, 0)))
    with pytest.raises(CheckpointError, match="failing its checksum at byte"):
        replay(journal, BIG, 0)
    state = replay(journal, BIG, 0, repair=True)
    assert (len(state.damaged), state.checksum_failures) == (1, 1)


def test_a_last_record_failing_its_checksum_is_dropped_as_a_torn_one(tmp_path: Path) -> None:
    journal = tmp_path / "journal.jsonl"
    good = encode(turn(0, 0))
    journal.write_bytes(good + encode(turn(0, 1, "abc")).replace(b"abc", b"abd"))
    state = replay(journal, BIG, 0)
    assert state.partial == {0: [turn(0, 0)]} and state.journal_end == len(good)


def test_repair_cuts_at_a_damaged_emit_so_no_row_is_left_unaccounted(tmp_path: Path) -> None:
    journal = tmp_path / "journal.jsonl"
    records = [turn(0, 0), emit(0, 10), turn(1, 0), emit(1, 20), turn(2, 0), emit(2, 30)]
    lines = [encode(r) for r in records]
    lines[3] = lines[3].replace(b'"k":"o"', b'"k":"o', 1)  # row 1's emit no longer parses
    journal.write_bytes(b"".join(lines))

    state = replay(journal, 30, 0, repair=True)
    assert state.cut == (10, 0, 0)  # vouched for before the damaged emit
    result = repair(journal, limits=state.cut)

    assert (len(result.dropped), result.emits_dropped) == (1, 1)
    after = replay(journal, 30, 0)
    # Rows 1 and 2 are written again from their journaled turns; row 0 stays.
    assert 0 in after.done and 1 not in after.done and 2 not in after.done
    assert after.partial == {1: [turn(1, 0)], 2: [turn(2, 0)]}
    assert after.out_end == 10


def test_repair_of_a_damaged_turn_cuts_nothing(tmp_path: Path) -> None:
    journal = tmp_path / "journal.jsonl"
    lines = [encode(r) for r in (turn(0, 0), emit(0, 10), turn(1, 0), turn(1, 1), emit(1, 20))]
    lines[2] = lines[2].replace(b"reply", b"replY")  # a whole turn failing its checksum
    journal.write_bytes(b"".join(lines))

    state = replay(journal, 20, 0, repair=True)
    result = repair(journal, limits=state.cut)

    assert state.cut is None and state.checksum_failures == 1
    assert (len(result.dropped), result.checksum_failures, result.emits_dropped) == (1, 1, 0)


def test_the_emits_index_is_checked_by_its_checksum() -> None:
    pairs = array("q", [0, 10, 1, 20])
    data = pack_emits(pairs)
    state = decode_snapshot(
        encode_snapshot(Replay(), segment=1, emits_end=len(data), emits_crc=zlib.crc32(data))
    )
    assert check_emits(data, state) is None
    flipped = bytearray(data)
    flipped[6] ^= 0x10
    assert "checksum" in str(check_emits(bytes(flipped), state))
    assert check_emits(data[:-1], state) is not None


def test_an_old_emits_index_is_checked_against_the_done_lines() -> None:
    state = Replay()
    state.done.add(0)
    state.done.add(1)
    state.out_end = 20
    data = pack_emits(array("q", [0, 10, 1, 20]))
    state.emits_end = len(data)
    assert check_emits(data, state) is None
    flipped = bytearray(data)
    flipped[6] ^= 0x10  # line 0 becomes a line far past the input
    assert "line" in str(check_emits(bytes(flipped), state))


def test_the_checksum_is_zlibs_crc32_whichever_library_computes_it() -> None:
    # A checkpoint written where ISA-L is installed must read where it is not.
    import zlib

    from engine.checkpoint.crc import crc32

    for data in (b"", b'{"k":"t","l":0}', bytes(range(256)) * 80):
        assert crc32(data) == zlib.crc32(data)
        assert crc32(data, 12345) == zlib.crc32(data, 12345)


def test_the_checksum_in_pieces_that_keep_the_gil_is_the_same() -> None:
    # encode runs on the event loop: it checksums a long record (a reasoning turn's 16 KB)
    # in pieces of at most 5 KiB, so the library never lets go of the GIL.
    import zlib

    from engine.checkpoint.crc import crc32_holding_gil

    for size in (0, 1, 5119, 5120, 5121, 10_240, 16_732, 100_003):
        data = bytes((i * 7 + size) % 251 for i in range(size))
        assert crc32_holding_gil(data) == zlib.crc32(data)
