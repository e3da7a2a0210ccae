"""A row's last replies are journaled once, in the row: its v record says where it went,
and a kill between the row and its emit leaves a row the next run keeps, not asks again
(engine.checkpoint.adopt)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import orjson

from engine.checkpoint.adopt import adopt
from engine.checkpoint.checkpoint import Checkpoint, Outputs
from engine.checkpoint.durability import JournalConfig
from engine.checkpoint.journal import WRITING, Replay, apply, writing_record
from engine.cost import SPENT
from tests.journal_support import output

TRACE = "thinking " * 2000  # 18 KB, as a reasoning teacher's trace


def checkpoint(tmp_path: Path) -> Checkpoint:
    out = tmp_path / "out"
    outputs = Outputs(out / "rows.jsonl", out / "rows.failed.jsonl", out / "rows.filtered.jsonl")
    (tmp_path / "ck").mkdir(exist_ok=True)
    return Checkpoint(tmp_path / "ck", outputs)


def last_turn(line: int) -> dict[str, Any]:
    return {
        "k": "t",
        "l": line,
        "i": 1,
        "c": f"answer {line}",
        "r": TRACE,
        "p": 5,
        "o": 7,
        SPENT: 0.25,
    }


def first_turn(line: int) -> dict[str, Any]:
    return {"k": "t", "l": line, "i": 0, "c": f"first {line}", "p": 2, "o": 3, SPENT: 0.5}


def row(line: int) -> dict[str, Any]:
    return {
        "id": f"r{line}",
        "messages": [
            {"role": "assistant", "content": f"answer {line}", "reasoning_content": TRACE}
        ],
    }


def write_rows(ck: Checkpoint, lines: range) -> None:
    """Each line: its first turn journaled alone, then its row with its last turn."""

    async def write() -> None:
        writer = ck.writer(ck.state(), JournalConfig(), snapshot_every_rows=10_000)
        async with anyio.create_task_group() as group:
            group.start_soon(writer.run)
            for line in lines:
                await writer.record(first_turn(line))
                await output(writer, line, row(line), [last_turn(line)])
            await writer.close()

    anyio.run(write)


def journal(ck: Checkpoint) -> list[dict[str, Any]]:
    records = []
    for path in sorted(ck.folder.glob("journal*.jsonl")):
        records += [orjson.loads(raw) for raw in path.read_bytes().splitlines()]
    return records


def drop_emits(ck: Checkpoint, lines: set[int]) -> None:
    """As a kill after those rows reached the output and before their emits did."""
    path = ck.folder / "journal.jsonl"
    kept = [
        raw
        for raw in path.read_bytes().splitlines(keepends=True)
        if not (orjson.loads(raw)["k"] == "o" and orjson.loads(raw)["l"] in lines)
    ]
    path.write_bytes(b"".join(kept))


def test_a_rows_last_turn_is_journaled_once_in_the_row(tmp_path: Path) -> None:
    ck = checkpoint(tmp_path)
    write_rows(ck, range(3))
    journal_bytes = sum(p.stat().st_size for p in ck.folder.glob("journal*.jsonl"))
    assert TRACE.encode() not in b"".join(p.read_bytes() for p in ck.folder.glob("journal*"))
    assert journal_bytes < 3 * 400  # the trace (18 KB a row) is in the output only
    places = [r for r in journal(ck) if r["k"] == WRITING]
    out = ck.outputs.output.read_bytes()
    for place, line in zip(places, range(3), strict=True):
        assert place["l"] == line
        assert orjson.loads(out[place["b"] : place["e"]]) == row(line)
        assert (place[SPENT], place["p"], place["o"]) == (0.25, 5, 7)
    state = ck.state()
    assert state.spent_usd == 3 * (0.5 + 0.25) and state.spent_tokens == 3 * (5 + 12)
    assert len(state.done) == 3 and state.partial == {} and state.writing == {}


def test_rows_whole_in_the_output_without_their_emits_are_kept_and_vouched(
    tmp_path: Path,
) -> None:
    ck = checkpoint(tmp_path)
    write_rows(ck, range(4))
    complete = ck.outputs.output.read_bytes()
    drop_emits(ck, {2, 3})
    with ck.outputs.output.open("ab") as f:
        f.write(b'{"id": "half a row')  # and a row cut short after them

    state = ck.state()

    assert sorted(n for n in range(4) if n in state.done) == [0, 1, 2, 3]
    assert state.out_end == len(complete) and state.partial == {}
    assert state.adopted == [(2, len(complete) - len(orjson.dumps(row(3))) - 1), (3, len(complete))]
    # The run's writer journals their emits first and cuts the half row off.
    write_rows(ck, range(4, 5))
    assert ck.outputs.output.read_bytes()[: len(complete)] == complete
    again = ck.state()
    assert again.adopted == [] and len(again.done) == 5
    assert [r["l"] for r in journal(ck) if r["k"] == "o"] == [0, 1, 2, 3, 4]


def test_a_row_cut_short_is_made_again_from_its_journaled_turns(tmp_path: Path) -> None:
    ck = checkpoint(tmp_path)
    write_rows(ck, range(3))
    out = ck.outputs.output.read_bytes()
    drop_emits(ck, {1, 2})
    ck.outputs.output.write_bytes(out[: len(out) - 100])  # row 2 torn: row 1 whole

    state = ck.state()

    assert 1 in state.done and 2 not in state.done
    assert state.out_end == len(out) - len(orjson.dumps(row(2))) - 1
    # Row 2's first turn is kept; its last is asked again (its text was in the row).
    assert state.partial == {2: [first_turn(2)]}


def test_a_row_after_one_made_again_is_not_taken_for_it(tmp_path: Path) -> None:
    # Row 1 never reached the output; the next run wrote row 5 where it would have
    # gone. Row 1's old v record must not vouch for row 5's bytes, whatever lengths.
    state = Replay()
    for record in (
        {**writing_record(1, []), "b": 100, "e": 200},
        {**writing_record(2, []), "b": 200, "e": 300},
        {**writing_record(5, []), "b": 100, "e": 200},
    ):
        apply(state, record)
    assert state.writing == {5: (100, 200)}
    apply(state, {"k": "o", "l": 5, "e": 200})
    assert state.writing == {} and 5 in state.done


def test_a_place_below_what_emits_vouch_for_is_never_adopted(tmp_path: Path) -> None:
    ck = checkpoint(tmp_path)
    write_rows(ck, range(2))
    out = ck.outputs.output.read_bytes()
    # A v record pointing into row 0's bytes, for a line never finished.
    stray = {**writing_record(9, []), "b": 0, "e": len(out) // 2}
    state = ck.state()
    apply(state, stray)
    adopt(state, ck.outputs.output)
    assert 9 not in state.done and state.adopted == [] and state.writing == {}
