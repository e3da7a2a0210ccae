"""Snapshots: the format, and a resume from snapshot + journal tail = a replay of it all."""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import pytest

from engine.checkpoint.journal import (
    EMIT_FAILED,
    EMIT_FILTERED,
    EMIT_OUTPUT,
    JOURNAL_NAME,
    LineSet,
    Replay,
    apply,
    encode,
    segment_number,
    segment_path,
)
from engine.checkpoint.snapshot import (
    EMITS_NAME,
    SNAPSHOT_NAME,
    decode_snapshot,
    emit_sources,
    encode_snapshot,
    load,
    pack_emits,
    read_snapshot,
    unpack_emits,
    write_snapshot,
)
from engine.errors import CheckpointError
from tests.journal_support import replay

BIG = 10**12  # a file size that vouches for every emit


def turn(line: int, i: int) -> dict[str, Any]:
    return {"k": "t", "l": line, "i": i, "c": f"reply {line}.{i} é\n", "p": 3, "o": 2, "f": "stop"}


def random_journal(rng: random.Random, lines: int = 60) -> list[dict[str, Any]]:
    """Records as a run writes them: turns of rows in flight, interleaved, then each row's
    emit into one of the three files (ends growing per file); a few stray records too."""
    records: list[dict[str, Any]] = []
    ends = {EMIT_OUTPUT: 0, EMIT_FAILED: 0, EMIT_FILTERED: 0}
    turns = {line: rng.randint(0, 4) for line in range(lines)}
    given = dict.fromkeys(turns, 0)
    waiting = list(turns)
    rng.shuffle(waiting)
    open_rows: list[int] = []
    while waiting or open_rows:
        if waiting and ((len(open_rows) < 6 and rng.random() < 0.6) or not open_rows):
            open_rows.append(waiting.pop())
        line = rng.choice(open_rows)
        if given[line] < turns[line]:
            records.append(turn(line, given[line]))
            given[line] += 1
        elif rng.random() < 0.15:
            open_rows.remove(line)  # left in progress: the run stopped before it finished
        else:
            kind = rng.choice([EMIT_OUTPUT] * 4 + [EMIT_FAILED, EMIT_FILTERED])
            ends[kind] += rng.randint(5, 200)
            records.append({"k": kind, "l": line, "e": ends[kind]})
            open_rows.remove(line)
            if rng.random() < 0.1:
                records.append(turn(line, 99))  # a straggler after its row: ignored
    return records


def replay_of(records: list[dict[str, Any]]) -> Replay:
    state = Replay()
    for record in records:
        apply(state, record)
    return state


def assert_same(got: Replay, want: Replay) -> None:
    assert got.done == want.done
    assert got.partial == want.partial
    for name in ("rows_ok", "rows_failed", "rows_filtered", "records", "work_records"):
        assert getattr(got, name) == getattr(want, name), name
    assert (got.out_end, got.failed_end, got.filtered_end) == (
        want.out_end,
        want.failed_end,
        want.filtered_end,
    )
    assert got.seek == want.seek


def write_checkpoint(
    folder: Path, records: list[dict[str, Any]], cuts: list[int], snapshot_at: int | None
) -> None:
    """The journal as segments split at ``cuts`` (indices into records) and, when
    ``snapshot_at`` is a segment number, the snapshot covering the segments before it,
    those segments deleted, as a writer leaves the folder."""
    folder.mkdir(exist_ok=True)
    bounds = [0, *cuts, len(records)]
    for number, (start, stop) in enumerate(itertools.pairwise(bounds)):
        if snapshot_at is None or number >= snapshot_at:
            data = b"".join(encode(r) for r in records[start:stop])
            segment_path(folder, number).write_bytes(data)
    if snapshot_at is not None:
        covered = replay_of(records[: bounds[snapshot_at]])
        index = pack_emits(covered.emits)
        (folder / EMITS_NAME).write_bytes(index)
        write_snapshot(folder, encode_snapshot(covered, segment=snapshot_at, emits_end=len(index)))


# --- the format --------------------------------------------------------------------------


def test_a_snapshot_decodes_to_the_state_it_encodes() -> None:
    rng = random.Random(1)
    state = replay_of(random_journal(rng, 300))
    assert state.partial and len(state.done)
    got = decode_snapshot(encode_snapshot(state, segment=7, emits_end=4096))
    assert_same(got, state)
    assert (got.first_segment, got.segment, got.emits_end) == (7, 7, 4096)
    assert len(got.emits) == 0  # the emits of covered segments are in the index, not here


def test_the_seek_round_trips_and_one_past_the_done_prefix_is_refused() -> None:
    state = Replay()
    for line in (0, 1, 2, 3, 5):
        state.done.add(line)
    state.seek = (4, 812)
    assert decode_snapshot(encode_snapshot(state, segment=1, emits_end=0)).seek == (4, 812)
    state.seek = (5, 900)  # line 4 is not done: a resume seeking past it would lose it
    with pytest.raises(ValueError, match="seek"):
        decode_snapshot(encode_snapshot(state, segment=1, emits_end=0))


def test_an_empty_state_round_trips() -> None:
    got = decode_snapshot(encode_snapshot(Replay(), segment=1, emits_end=0))
    assert_same(got, Replay())
    assert len(got.done) == 0


def test_ten_million_done_lines_cost_little() -> None:
    state = Replay()
    state.done = LineSet.from_bytes(b"\xff" * (10**7 // 8))
    data = encode_snapshot(state, segment=1, emits_end=0)
    assert len(data) < 100_000
    assert len(decode_snapshot(data).done) == 10**7


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d[:-1],
        lambda d: d[:40],
        lambda d: d.replace(b'"rows_ok":', b'"rows_ko":'),
        lambda d: d[:-3] + bytes([d[-3] ^ 1]) + d[-2:],
        lambda d: b"x" + d,
        lambda d: b"",
    ],
    ids=["last byte", "head only", "a key", "a flipped bit", "magic", "empty"],
)
def test_a_damaged_snapshot_is_refused(tmp_path: Path, damage: Any) -> None:
    data = encode_snapshot(replay_of(random_journal(random.Random(2))), segment=3, emits_end=0)
    with pytest.raises(ValueError):
        decode_snapshot(damage(data))
    (tmp_path / SNAPSHOT_NAME).write_bytes(damage(data))
    with pytest.raises(CheckpointError, match=r"damaged snapshot.*--fresh"):
        read_snapshot(tmp_path)


def test_emits_pack_as_little_endian_pairs() -> None:
    state = replay_of([{"k": EMIT_OUTPUT, "l": 5, "e": 300}, {"k": EMIT_OUTPUT, "l": 2, "e": 1}])
    data = pack_emits(state.emits)
    assert data == (5).to_bytes(8, "little") + (300).to_bytes(8, "little") + (2).to_bytes(
        8, "little"
    ) + (1).to_bytes(8, "little")
    assert list(unpack_emits(data)) == [5, 300, 2, 1]


# --- load = snapshot + tail ---------------------------------------------------------------


def test_snapshot_plus_tail_is_a_replay_of_the_whole_journal(tmp_path: Path) -> None:
    rng = random.Random(20240611)
    for case in range(150):
        records = random_journal(rng, rng.randint(1, 80))
        whole = tmp_path / f"whole{case}.jsonl"
        whole.write_bytes(b"".join(encode(r) for r in records))
        want = replay(whole, BIG, BIG, BIG)
        cuts = sorted(rng.sample(range(len(records) + 1), rng.randint(0, min(4, len(records)))))
        snapshot_at = rng.randint(0, len(cuts) + 1)  # len(cuts) + 1: past the last segment
        folder = tmp_path / f"ck{case}"
        write_checkpoint(folder, records, cuts, snapshot_at or None)

        got = load(folder, BIG, BIG, BIG)

        assert_same(got, want)
        pairs, journals = emit_sources(folder)
        assert list(pairs) + list(got.emits) == list(want.emits)
        assert [segment_number(p) for p in journals] == list(range(snapshot_at or 0, len(cuts) + 1))
        assert got.first_segment == (snapshot_at or 0)
        assert got.segment == max(len(cuts), snapshot_at)


def test_a_torn_tail_after_a_snapshot_is_dropped(tmp_path: Path) -> None:
    records = random_journal(random.Random(5), 40)
    write_checkpoint(tmp_path, records, [len(records) // 2], 1)
    tail = segment_path(tmp_path, 1)
    good = tail.stat().st_size
    with tail.open("ab") as f:
        f.write(b'{"k":"t","l":3,"c":"to')
    got = load(tmp_path, BIG, BIG, BIG)
    assert_same(got, replay_of(records))
    assert (got.segment, got.journal_end) == (1, good)


def test_damage_at_the_end_of_a_segment_with_records_after_it_is_an_error(tmp_path: Path) -> None:
    records = random_journal(random.Random(6), 40)
    write_checkpoint(tmp_path, records, [10, 20], 1)
    with segment_path(tmp_path, 1).open("ab") as f:
        f.write(b"\x01garbage\n")
    with pytest.raises(CheckpointError, match=r"journal\.000001\.jsonl: damaged record"):
        load(tmp_path, BIG, BIG, BIG)
    assert len(load(tmp_path, BIG, BIG, BIG, repair=True).damaged) == 1


def test_a_missing_segment_after_the_snapshot_is_an_error(tmp_path: Path) -> None:
    records = random_journal(random.Random(7), 40)
    write_checkpoint(tmp_path, records, [10, 20, 30], 1)
    segment_path(tmp_path, 2).unlink()
    with pytest.raises(CheckpointError, match="segment 2 is missing"):
        load(tmp_path, BIG, BIG, BIG)


def test_segments_a_snapshot_covers_are_not_read(tmp_path: Path) -> None:
    # A SIGKILL between writing a snapshot and deleting what it covers.
    records = random_journal(random.Random(8), 40)
    write_checkpoint(tmp_path, records, [15], 1)
    segment_path(tmp_path, 0).write_bytes(b"\x01 not even json\n" + encode(turn(0, 0)))
    assert_same(load(tmp_path, BIG, BIG, BIG), replay_of(records))


def test_an_old_checkpoint_is_its_single_journal(tmp_path: Path) -> None:
    records = random_journal(random.Random(9), 50)
    (tmp_path / JOURNAL_NAME).write_bytes(b"".join(encode(r) for r in records))
    got = load(tmp_path, BIG, BIG, BIG)
    assert_same(got, replay(tmp_path / JOURNAL_NAME, BIG, BIG, BIG))
    assert (got.segment, got.first_segment) == (0, 0)
    assert got.journal_end == (tmp_path / JOURNAL_NAME).stat().st_size


def test_files_shorter_than_the_snapshot_vouches_for_are_refused(tmp_path: Path) -> None:
    records = [turn(0, 0), {"k": EMIT_OUTPUT, "l": 0, "e": 100}, turn(1, 0)]
    write_checkpoint(tmp_path, records, [2], 1)
    assert load(tmp_path, 100, 0, 0).rows_ok == 1
    with pytest.raises(CheckpointError, match=r"output file is 99 bytes.*vouches for 100"):
        load(tmp_path, 99, 0, 0)
    (tmp_path / EMITS_NAME).write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"emits\.bin is 0 bytes"):
        load(tmp_path, 100, 0, 0)


def test_a_tail_emit_past_the_end_of_the_output_is_not_done(tmp_path: Path) -> None:
    records = [
        {"k": EMIT_OUTPUT, "l": 0, "e": 100},
        turn(1, 0),
        {"k": EMIT_OUTPUT, "l": 1, "e": 250},
    ]
    write_checkpoint(tmp_path, records, [1], 1)
    got = load(tmp_path, 200, 0, 0)
    assert 0 in got.done and 1 not in got.done
    assert got.partial == {1: [turn(1, 0)]}
    assert got.out_end == 100
