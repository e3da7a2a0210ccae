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

The journal is a run of numbered segment files: ``journal.jsonl`` is segment 0 (the
one file of checkpoints from before segments, which resume as they are), then
``journal.000001.jsonl`` and so on. The writer appends to the last one and starts
the next each time it takes a snapshot (engine.checkpoint.snapshot), which covers
every segment before it; so a resume reads the snapshot and the segments after it.

Replay is pure over the journal's bytes, the segments read as one stream. A torn
last record (a crash mid-write) is dropped; a damaged record with good records
after it is an error naming the offset, which ``turnstile repair`` fixes by
dropping the damaged records.
"""

from __future__ import annotations

import os
import re
import sys
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from engine.errors import CheckpointError

JOURNAL_NAME = "journal.jsonl"  # segment 0
READ_CHUNK = 1 << 22
EMIT_OUTPUT = "o"
EMIT_FAILED = "x"
EMIT_FILTERED = "q"
NO_LIMIT = (sys.maxsize, sys.maxsize, sys.maxsize)  # file sizes that vouch for every emit
_SEGMENT = re.compile(r"journal\.(\d{6,})\.jsonl")


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
        # The input reader asks this once per input line: shifts and one try are
        # a third cheaper than isinstance and divmod. A non-integer raises TypeError.
        try:
            return line >= 0 and self._bits[line >> 3] >> (line & 7) & 1 == 1  # type: ignore[operator]
        except (IndexError, TypeError):
            return False

    def __len__(self) -> int:
        return self.count

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LineSet) and self.to_bytes() == other.to_bytes()

    __hash__ = None  # type: ignore[assignment]

    def to_bytes(self) -> bytes:
        """The bitmap, bit ``n % 8`` of byte ``n // 8`` for line ``n``, without trailing zeros."""
        return bytes(self._bits).rstrip(b"\0")

    @classmethod
    def from_bytes(cls, bits: bytes) -> LineSet:
        lines = cls()
        lines._bits = bytearray(bits)
        lines.count = int.from_bytes(bits, "little").bit_count()
        return lines

    def prefix(self, start: int = 0) -> int:
        """The first line at or after ``start`` that is not in the set."""
        line = start
        while line & 7:  # bit by bit up to a byte boundary
            if line not in self:
                return line
            line += 1
        rest = self._bits[line >> 3 :]
        full = len(rest) - len(rest.lstrip(b"\xff"))
        line += full * 8
        if full == len(rest):
            return line
        return line + (~rest[full] & (rest[full] + 1)).bit_length() - 1

    def copy(self) -> LineSet:
        lines = LineSet()
        lines._bits = bytearray(self._bits)
        lines.count = self.count
        return lines


@dataclass(slots=True)
class Replay:
    """What a journal says is finished.

    ``done`` holds the input lines whose row is in the output or failed file;
    ``partial`` the records of lines not yet done; ``out_end``/``failed_end`` the
    byte lengths of the output and failed files that the journal vouches for.

    ``segment`` is the journal segment that ``journal_end`` measures (the last one,
    which the writer appends to); ``first_segment`` the first one this state needs
    (a snapshot covers those before it). ``emits`` holds (line, end) pairs, flat, of
    the output emits applied since the snapshot (or since the start), which the
    next snapshot adds to the emits index; ``emits_end`` that index's length.
    ``seek`` is where in the input a resume may start reading: (line, byte offset
    of its start), every line before it done (engine.input.reader.Marks).
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
    segment: int = 0
    first_segment: int = 0
    emits: array[int] = field(default_factory=lambda: array("q"))
    emits_end: int = 0
    seek: tuple[int, int] = (0, 0)

    def copy(self) -> Replay:
        """A copy to go on applying records to, sharing only the (never mutated) records."""
        return Replay(
            done=self.done.copy(),
            partial={line: list(records) for line, records in self.partial.items()},
            rows_ok=self.rows_ok,
            rows_failed=self.rows_failed,
            rows_filtered=self.rows_filtered,
            records=self.records,
            work_records=self.work_records,
            out_end=self.out_end,
            failed_end=self.failed_end,
            filtered_end=self.filtered_end,
            journal_end=self.journal_end,
            damaged=list(self.damaged),
            segment=self.segment,
            first_segment=self.first_segment,
            emits=array("q", self.emits),
            emits_end=self.emits_end,
            seek=self.seek,
        )


def segment_path(checkpoint_dir: Path, number: int) -> Path:
    """The path of journal segment ``number`` (0 is the single journal of old checkpoints)."""
    return checkpoint_dir / (JOURNAL_NAME if number == 0 else f"journal.{number:06d}.jsonl")


def segment_number(path: Path) -> int:
    if path.name == JOURNAL_NAME:
        return 0
    match = _SEGMENT.fullmatch(path.name)
    if match is None:
        raise ValueError(f"{path} is not a journal segment")
    return int(match.group(1))


def segments(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """The journal segments in the folder, (number, path) in order."""
    found = []
    try:
        names = os.listdir(checkpoint_dir)
    except FileNotFoundError:
        return []
    for name in names:
        match = _SEGMENT.fullmatch(name)
        if name == JOURNAL_NAME or match is not None:
            found.append((int(match.group(1)) if match else 0, checkpoint_dir / name))
    return sorted(found)


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
    if path.exists():
        replay_segments(state, [(0, path)], (out_size, failed_size, filtered_size), repair=repair)
    return state


def replay_segments(
    state: Replay,
    paths: Iterable[tuple[int, Path]],
    sizes: tuple[int, int, int],
    *,
    repair: bool = False,
) -> None:
    """Apply the records of journal segments, (number, path) in order, to ``state``:
    one stream, so damage at the end of one with good records in the next is damage.
    ``state.segment`` and ``journal_end`` end up measuring the last one."""
    pending: tuple[Path, list[tuple[int, int]]] | None = None
    for number, path in paths:
        state.segment, state.journal_end = number, 0
        for offset, raw, complete in iter_lines(path):
            record = _decode(raw) if complete else None
            if record is None:
                if raw.strip(b"\x00 \t\r"):
                    if pending is None:
                        pending = (path, [])
                    pending[1].append((offset, len(raw) + (1 if complete else 0)))
                continue
            if pending is not None:
                if not repair:
                    where, damage = pending
                    raise CheckpointError(
                        f"{where}: damaged record at byte {damage[0][0]} with good records "
                        "after it; run `turnstile repair CONFIG` to drop the damaged records "
                        "(their work is simply requested again)"
                    )
                state.damaged.extend(pending[1])
                pending = None
            state.journal_end = offset + len(raw) + 1
            apply(state, record, sizes)


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
    fsync_dir(path.parent)
    return dropped


def fsync_dir(path: Path) -> None:
    """Make the folder's last renames, creations and removals durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def apply(state: Replay, record: dict[str, Any], sizes: tuple[int, int, int] = NO_LIMIT) -> None:
    """Apply one decoded record to ``state``: the one rule replay and the writer share.

    ``sizes`` are the output, failed and filtered files' lengths: an emit past its
    file's end does not count (the writer, which knows what it wrote, passes none).
    """
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
            state.emits.append(line)
            state.emits.append(end)
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
