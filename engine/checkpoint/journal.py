"""The journal: append-only records of everything a run has finished, and its replay.

One orjson object per line. Record kinds (short keys keep a 10^6-turn journal small):

- ``{"k": "t", "l": line, "i": turn, "c": text, "p": prompt_tokens, "o": completion_tokens,
  "f": finish_reason}``: a distillation turn;
- ``{"k": "g", ...}``, ``{"k": "ge", ...}``, ``{"k": "r", ...}``: preference generations,
  generation errors and judge replies (see engine.tasks.preference.task);
- ``{"k": "gg", ...}``: a generate task's reply to one attempt of one generation, valid
  or not (see engine.tasks.generate.attempts);
- ``{"k": "o", "l": line, "e": end}``: the row of input line ``l`` was written to the output,
  which then ended at byte ``e``; ``{"k": "x", ...}`` the same for the failed file, and
  ``{"k": "q", ...}`` for the filtered file.

Replay is pure over the journal's bytes. A torn last record (a crash mid-write) is
dropped; a damaged record with good records after it is an error naming the offset,
which ``turnstile repair`` fixes by dropping the damaged records.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from engine.errors import CheckpointError

JOURNAL_NAME = "journal.jsonl"
READ_CHUNK = 1 << 22
EMIT_OUTPUT = "o"
EMIT_FAILED = "x"
EMIT_FILTERED = "q"


def encode(record: dict[str, Any]) -> bytes:
    return orjson.dumps(record) + b"\n"


class LineSet:
    """A set of input line numbers as a bitmap: 10^7 lines cost 1.25 MB."""

    __slots__ = ("_bits", "count")

    def __init__(self) -> None:
        self._bits = bytearray()
        self.count = 0

    def add(self, line: int) -> None:
        byte, bit = divmod(line, 8)
        if byte >= len(self._bits):
            self._bits.extend(bytes(max(byte + 1 - len(self._bits), len(self._bits))))
        if not self._bits[byte] & (1 << bit):
            self._bits[byte] |= 1 << bit
            self.count += 1

    def __contains__(self, line: object) -> bool:
        if not isinstance(line, int):
            return False
        byte, bit = divmod(line, 8)
        return byte < len(self._bits) and bool(self._bits[byte] & (1 << bit))

    def __len__(self) -> int:
        return self.count


@dataclass(slots=True)
class Replay:
    """What a journal says is finished.

    ``done`` holds the input lines whose row is in the output or failed file;
    ``partial`` the records of lines not yet done; ``out_end``/``failed_end`` the
    byte lengths of the output and failed files that the journal vouches for.
    """

    done: LineSet = field(default_factory=LineSet)
    partial: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    rows_ok: int = 0
    rows_failed: int = 0
    rows_filtered: int = 0
    records: int = 0
    work_records: int = 0  # turns, generations, ratings
    out_end: int = 0
    failed_end: int = 0
    filtered_end: int = 0
    journal_end: int = 0  # bytes of good records; anything after is dropped
    damaged: list[tuple[int, int]] = field(default_factory=list)  # (offset, length)


def iter_lines(path: Path, chunk: int = READ_CHUNK) -> Iterator[tuple[int, bytes, bool]]:
    """Yield (offset, line without newline, complete) for each line of a file, in big reads."""
    offset = 0
    rest = b""
    with path.open("rb") as f:
        while True:
            data = f.read(chunk)
            if not data:
                break
            data = rest + data if rest else data
            start = 0
            while True:
                end = data.find(b"\n", start)
                if end < 0:
                    break
                yield offset, data[start:end], True
                offset += end - start + 1
                start = end + 1
            rest = data[start:]
    if rest:
        yield offset, rest, False


def replay(
    path: Path,
    out_size: int,
    failed_size: int,
    filtered_size: int = 0,
    *,
    repair: bool = False,
) -> Replay:
    """Rebuild the run's state from its journal.

    ``out_size`` and ``failed_size`` are the current sizes of the output and failed
    files: a row the journal says was written past the end of its file (possible
    only after a power cut) is treated as not written, so it is written again.
    With ``repair`` damaged records are skipped and listed instead of raising.
    """
    state = Replay()
    if not path.exists():
        return state
    pending_damage: list[tuple[int, int]] = []
    for offset, raw, complete in iter_lines(path):
        record = _decode(raw) if complete else None
        if record is None:
            if raw.strip(b"\x00 \t\r"):
                pending_damage.append((offset, len(raw) + (1 if complete else 0)))
            continue
        if pending_damage:
            if not repair:
                first = pending_damage[0][0]
                raise CheckpointError(
                    f"{path}: damaged record at byte {first} with good records after it; "
                    "run `turnstile repair CONFIG` to drop the damaged records "
                    "(their work is simply requested again)"
                )
            state.damaged.extend(pending_damage)
            pending_damage = []
        state.journal_end = offset + len(raw) + 1
        _apply(state, record, (out_size, failed_size, filtered_size))
    return state


def repair(path: Path) -> list[tuple[int, int]]:
    """Rewrite the journal keeping only its good records; return the (offset, length)
    of each damaged record dropped. The work they held is simply requested again.

    The new journal replaces the old atomically; the old one is kept beside it as
    ``journal.jsonl.damaged`` for inspection.
    """
    dropped: list[tuple[int, int]] = []
    tmp = path.with_name(path.name + ".repair")
    with tmp.open("wb") as out:
        for offset, raw, complete in iter_lines(path):
            if complete and _decode(raw) is not None:
                out.write(raw + b"\n")
            elif raw.strip(b"\x00 \t\r"):
                dropped.append((offset, len(raw) + (1 if complete else 0)))
        out.flush()
        os.fsync(out.fileno())
    if not dropped:
        tmp.unlink()
        return dropped
    os.replace(path, path.with_name(path.name + ".damaged"))
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return dropped


def _decode(raw: bytes) -> dict[str, Any] | None:
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("l"), int):
        return None
    if not isinstance(record.get("k"), str):
        return None
    return record


def _apply(state: Replay, record: dict[str, Any], sizes: tuple[int, int, int]) -> None:
    state.records += 1
    kind = record["k"]
    line: int = record["l"]
    if kind in (EMIT_OUTPUT, EMIT_FAILED, EMIT_FILTERED):
        end = record.get("e")
        limit = sizes[(EMIT_OUTPUT, EMIT_FAILED, EMIT_FILTERED).index(kind)]
        if not isinstance(end, int) or end > limit or line in state.done:
            return
        state.done.add(line)
        state.partial.pop(line, None)
        if kind == EMIT_OUTPUT:
            state.rows_ok += 1
            state.out_end = max(state.out_end, end)
        elif kind == EMIT_FAILED:
            state.rows_failed += 1
            state.failed_end = max(state.failed_end, end)
        else:
            state.rows_filtered += 1
            state.filtered_end = max(state.filtered_end, end)
        return
    if line in state.done:
        return
    state.work_records += 1
    state.partial.setdefault(line, []).append(record)
