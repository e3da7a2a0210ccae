"""The journal: append-only records of everything a run has finished, and its replay.

One orjson object per line. Record kinds (short keys keep a 10^6-turn journal small):

- ``{"k": "t", "l": line, "i": turn, "c": text, "p": prompt_tokens, "o": completion_tokens,
  "f": finish_reason}``: a distillation turn;
- ``{"k": "g", ...}``, ``{"k": "ge", ...}``, ``{"k": "r", ...}``: preference generations,
  generation errors and judge replies (see engine.tasks.preference.task);
- ``{"k": "gg", ...}``: a generate task's reply to one attempt of one generation, valid
  or not (see engine.tasks.generate.attempts);
- ``{"k": "a", ...}``, ``{"k": "w", ...}``: a task's reply under a key of its own, a raw
  reply (engine.tasks.asking, which owns every reply kind);
- ``{"k": "v", "l": line, "b": start, "e": end}`` (+ ``"$"``, ``"p"``, ``"o"``: what the
  row's last replies cost): the row of input line ``l`` is being written to the output at
  bytes ``[b, e)``. Its last replies (a single-turn row's only one, with its trace) are
  journaled as the row itself, not a second time here: their text is in those bytes;
- ``{"k": "o", "l": line, "e": end}``: the row of input line ``l`` was written to the output,
  which then ended at byte ``e``; ``{"k": "x", ...}`` the same for the failed file, and
  ``{"k": "q", ...}`` for the filtered file.

A row's group write puts its ``v`` record in the journal, then the row in the output,
then its ``o`` record. A kill after the row and before its ``o`` leaves a row whose ``v``
record says where it is: a replay that finds those bytes whole takes the row as written
(engine.checkpoint.adopt); else the row is made again and its last replies asked again.

Each record ends with its checksum, ``"z"``: the CRC32 of the record as it would be
without it (``{"k": "t", ..., "f": "stop"}``), so a byte changed inside a record that
is still valid JSON (a letter of a reply, a digit of a line number) is caught. A
record that fails it is damaged, exactly as one that does not parse. Records
without one (checkpoints from before checksums) are accepted until the journal
shows one with a checksum, or when the checkpoint says every record has one
(``strict``: its manifest or snapshot).

The journal is a run of numbered segment files: ``journal.jsonl`` is segment 0 (the
one file of checkpoints from before segments, which resume as they are), then
``journal.000001.jsonl`` and so on. The writer appends to the last one and starts
the next each time it takes a snapshot (engine.checkpoint.snapshot), which covers
every segment before it; so a resume reads the snapshot and the segments after it.

Replay is pure over the journal's bytes, the segments read as one stream. A torn
last record (a crash mid-write) is dropped; a damaged record with good records
after it is an error naming the offset, which ``turnstile repair`` fixes by
dropping the damaged records (and the emits after one that may have been an emit:
see ``Replay.cut``).
"""

from __future__ import annotations

import os
import re
import sys
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from engine.checkpoint.crc import HELD_BYTES, crc32, crc32_holding_gil
from engine.checkpoint.files import fsync_dir
from engine.cost import SPENT
from engine.errors import CheckpointError

JOURNAL_NAME = "journal.jsonl"  # segment 0
READ_CHUNK = 1 << 22
EMIT_OUTPUT = "o"
EMIT_FAILED = "x"
EMIT_FILTERED = "q"
WRITING = "v"  # a row on its way to the output, where its last replies are kept
NO_LIMIT = (sys.maxsize, sys.maxsize, sys.maxsize)  # file sizes that vouch for every emit
_SEGMENT = re.compile(r"journal\.(\d{6,})\.jsonl")


CRC_KEY = "z"
_CRC_MARK = b',"' + CRC_KEY.encode() + b'":'
# Each emit kind's file: its place in the (output, failed, filtered) sizes.
_EMIT_FILE = {EMIT_OUTPUT: 0, EMIT_FAILED: 1, EMIT_FILTERED: 2}


def encode(record: dict[str, Any]) -> bytes:
    """One journal line: the record's JSON with its checksum as the last key.

    ``record`` is never empty (every record has ``k`` and ``l``).
    """
    data = orjson.dumps(record)  # on the event loop: the checksum keeps the GIL
    crc = crc32(data) if len(data) <= HELD_BYTES else crc32_holding_gil(data)
    return b'%b,"z":%d}\n' % (data[:-1], crc)


def split_checksum(raw: bytes) -> tuple[bytes, bool | None]:
    """A journal line (no newline) as the record's JSON without its checksum, and
    whether the checksum holds: True, False, or None when it has none."""
    at = raw.rfind(_CRC_MARK)
    if at < 0 or raw[-1:] != b"}":
        return raw, None
    digits = raw[at + len(_CRC_MARK) : -1]
    if not digits.isdigit() or len(digits) > 10:
        return raw, None  # a record without one (a nested "z" key is not followed by digits})
    body = raw[:at] + b"}"
    return body, crc32(body) == int(digits)


class LineSet:
    """A set of input line numbers as a bitmap: 10^7 lines cost 1.25 MB."""

    __slots__ = ("_bits", "count")

    def __init__(self) -> None:
        self._bits = bytearray()
        self.count = 0

    def add(self, line: int) -> bool:
        """Add ``line`` (>= 0); whether it was not in the set before."""
        bits = self._bits
        byte = line >> 3
        if byte >= len(bits):
            bits.extend(bytes(max(byte + 1 - len(bits), len(bits))))
        mask = 1 << (line & 7)
        if bits[byte] & mask:
            return False
        bits[byte] |= mask
        self.count += 1
        return True

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
    checksum_failures: int = 0  # of the damaged, those whole but failing their checksum
    # The output, failed and filtered lengths vouched for just before the first damaged
    # record that may have been an emit (None: none was). A repair drops the emits
    # past them too, so the rows written after that point are written once more (from
    # the journal) instead of one being left in a file that no emit accounts for.
    cut: tuple[int, int, int] | None = None
    strict: bool = False  # every record must have a checksum
    segment: int = 0
    first_segment: int = 0
    emits: array[int] = field(default_factory=lambda: array("q"))
    emits_end: int = 0
    emits_crc: int | None = None  # CRC32 of the index's first emits_end bytes (None: unknown)
    seek: tuple[int, int] = (0, 0)
    # What the journaled replies that were paid for cost (engine.cost.SPENT), in every run
    # of the checkpoint: the budget starts from it, so the spend is exact across a kill.
    spent_usd: float = 0.0
    spent_tokens: int = 0
    # Rows whose ``v`` record is journaled and whose emit is not: line -> (start, end)
    # in the output. Only a replay's last group writes leave any (engine.checkpoint.adopt).
    writing: dict[int, tuple[int, int]] = field(default_factory=dict)
    # Emits of rows found whole in the output though their emit was not journaled,
    # (line, end): the run's writer journals them before anything else.
    adopted: list[tuple[int, int]] = field(default_factory=list)

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
            checksum_failures=self.checksum_failures,
            cut=self.cut,
            strict=self.strict,
            segment=self.segment,
            first_segment=self.first_segment,
            emits=array("q", self.emits),
            emits_end=self.emits_end,
            emits_crc=self.emits_crc,
            seek=self.seek,
            spent_usd=self.spent_usd,
            spent_tokens=self.spent_tokens,
            writing=dict(self.writing),
            adopted=list(self.adopted),
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
    # Damaged records not yet followed by a good one: (offset, length, failed its
    # checksum, the files' vouched lengths before it if it may have been an emit).
    pending: tuple[Path, list[tuple[int, int, bool, tuple[int, int, int] | None]]] | None = None
    for number, path in paths:
        state.segment, state.journal_end = number, 0
        for offset, raw, complete in iter_lines(path):
            record, status = decode(raw, state.strict) if complete else (None, UNREADABLE)
            if record is None:
                if raw.strip(b"\x00 \t\r"):
                    if pending is None:
                        pending = (path, [])
                    ends = (state.out_end, state.failed_end, state.filtered_end)
                    emit = ends if may_be_emit(raw, status) else None
                    pending[1].append((offset, len(raw) + complete, status == SUM_BAD, emit))
                continue
            if status == SUM_OK:
                state.strict = True  # from the first record with a checksum on, all have one
            if pending is not None:
                where, damage = pending
                if not repair:
                    what = "record failing its checksum" if damage[0][2] else "record"
                    raise CheckpointError(
                        f"{where}: damaged {what} at byte {damage[0][0]} with good records "
                        "after it; run `turnstile repair CONFIG` to drop the damaged records "
                        "(their work is simply requested again)"
                    )
                for at, length, bad_sum, emit in damage:
                    state.damaged.append((at, length))
                    state.checksum_failures += bad_sum
                    if state.cut is None and emit is not None:
                        state.cut = emit
                pending = None
            state.journal_end = offset + len(raw) + 1
            apply(state, record, sizes)


@dataclass(frozen=True, slots=True)
class Repaired:
    """What ``repair`` did to one segment."""

    dropped: list[tuple[int, int]]  # (offset, length) of each damaged record
    checksum_failures: int  # of those, whole records failing their checksum
    emits_dropped: int  # emits past ``limits``: their rows are written again
    strict: bool  # whether records after this segment must have a checksum


def repair(
    path: Path, *, strict: bool = False, limits: tuple[int, int, int] | None = None
) -> Repaired:
    """Rewrite a journal segment keeping only its good records; report what was dropped.
    The work damaged records held is simply requested again.

    ``limits`` (``Replay.cut``) are the output, failed and filtered lengths to keep:
    emits past them are dropped too, and the next run cuts the files back and writes
    those rows again from the journal. ``strict``: as for replay (``Replay.strict``
    before this segment). The new segment replaces the old atomically; the old one is
    kept beside it as ``<name>.damaged`` for inspection.
    """
    dropped: list[tuple[int, int]] = []
    failures = emits_dropped = 0
    tmp = path.with_name(path.name + ".repair")
    with tmp.open("wb") as out:
        for offset, raw, complete in iter_lines(path):
            record, status = decode(raw, strict) if complete else (None, UNREADABLE)
            if record is not None:
                strict = strict or status == SUM_OK
                if limits is not None and _past(record, limits):
                    emits_dropped += 1
                    continue
                out.write(raw + b"\n")
            elif raw.strip(b"\x00 \t\r"):
                dropped.append((offset, len(raw) + complete))
                failures += status == SUM_BAD
        out.flush()
        os.fsync(out.fileno())
    result = Repaired(dropped, failures, emits_dropped, strict)
    if not dropped and not emits_dropped:
        tmp.unlink()
        return result
    os.replace(path, path.with_name(path.name + ".damaged"))
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return result


def _past(record: dict[str, Any], limits: tuple[int, int, int]) -> bool:
    file = _EMIT_FILE.get(record["k"])
    if file is None:
        return False
    end = record.get("e")
    return not isinstance(end, int) or end > limits[file]


# How a journal line decoded (``decode``'s second value).
SUM_NONE = 0  # a good record without a checksum (written before checksums)
SUM_OK = 1  # a good record whose checksum holds
SUM_BAD = 2  # a whole record failing its checksum (or without one where all have one)
UNREADABLE = 3  # not a record: torn, not JSON, or of the wrong shape


def decode(raw: bytes, strict: bool = False) -> tuple[dict[str, Any] | None, int]:
    """A journal line (no newline) as its record, or None when it is damaged, and how
    it decoded (SUM_NONE, SUM_OK, SUM_BAD, UNREADABLE). ``strict``: a record without
    a checksum is damaged (SUM_BAD when it is otherwise whole)."""
    body, holds = split_checksum(raw)
    record = _record(body)
    if record is None:
        return None, UNREADABLE
    if holds is None:
        return (None, SUM_BAD) if strict else (record, SUM_NONE)
    return (record, SUM_OK) if holds else (None, SUM_BAD)


def _record(raw: bytes) -> dict[str, Any] | None:
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("l"), int):
        return None
    if not isinstance(record.get("k"), str):
        return None
    return record


def may_be_emit(raw: bytes, status: int) -> bool:
    """Whether a damaged line may have been an emit record: one that does not parse
    may; a whole one may if it has an emit's few keys (k, l, e), whatever its
    damaged kind or key names say."""
    if status != SUM_BAD:
        return True
    body, _ = split_checksum(raw)
    try:
        record = orjson.loads(body)
    except orjson.JSONDecodeError:
        return True
    return not isinstance(record, dict) or len(record) - (CRC_KEY in record) <= 3


def apply(state: Replay, record: dict[str, Any], sizes: tuple[int, int, int] = NO_LIMIT) -> None:
    """Apply one decoded record to ``state``: the one rule replay and the writer share.

    ``sizes`` are the output, failed and filtered files' lengths: an emit past its
    file's end does not count (the writer, which knows what it wrote, passes none).
    """
    state.records += 1
    kind = record["k"]
    line: int = record["l"]
    file = _EMIT_FILE.get(kind)
    if file is not None:
        end = record.get("e")
        # An emit past its file's end, or of a row already done, does not count.
        if not isinstance(end, int) or end > sizes[file] or not state.done.add(line):
            return
        if state.partial:
            state.partial.pop(line, None)
        if state.writing:
            state.writing.pop(line, None)
        if kind == EMIT_OUTPUT:
            state.rows_ok += 1
            if end > state.out_end:
                state.out_end = end
            state.emits.extend((line, end))
        elif kind == EMIT_FAILED:
            state.rows_failed += 1
            if end > state.failed_end:
                state.failed_end = end
        else:
            state.rows_filtered += 1
            if end > state.filtered_end:
                state.filtered_end = end
        return
    _count_spent(state, record)  # a reply paid for: counted even for a row already done
    if line in state.done:
        return
    if kind == WRITING:
        _writing(state, line, record)
        return
    state.work_records += 1
    state.partial.setdefault(line, []).append(record)


def apply_written(
    state: Replay, records: Iterable[dict[str, Any]], emits: Iterable[dict[str, Any]]
) -> None:
    """Apply one batch the writer wrote (its records, then its emits) to ``state``.

    The state ``apply`` gives record by record, with one step left out: a ``v`` record
    is not placed in ``state.writing``, as its row's emit, in the same batch, would
    take it out again (``state.writing`` is empty while a run writes: the replay's rows
    were adopted or cut off before its writer started).
    """
    for record in records:
        if record["k"] == WRITING:
            state.records += 1
            _count_spent(state, record)
        else:
            apply(state, record)
    for emit in emits:
        apply(state, emit)


def _count_spent(state: Replay, record: dict[str, Any]) -> None:
    """What a reply record says it cost (``SPENT``, its tokens), added to the spend."""
    spent = record.get(SPENT)
    if spent is not None:
        state.spent_usd += spent
        state.spent_tokens += record.get("p", 0) + record.get("o", 0)


def emit_record(kind: str, line: int, end: int) -> dict[str, Any]:
    """The emit of line ``line``'s row: written to the ``kind`` file (o, x, q), which
    then ended at byte ``end``."""
    return {"k": kind, "l": line, "e": end}


def writing_record(line: int, replies: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The ``v`` record of line ``line``'s row, standing for its last ``replies`` (whose
    text the row holds): what those that were paid for cost. The writer adds the
    row's place in the output (``b``, ``e``) when it knows it."""
    record: dict[str, Any] = {"k": WRITING, "l": line}
    if len(replies) == 1:  # a row's last turn, the common case
        spent = replies[0].get(SPENT)
        if spent is not None:
            reply = replies[0]
            record[SPENT], record["p"], record["o"] = spent, reply.get("p", 0), reply.get("o", 0)
        return record
    usd = None
    prompt = completion = 0
    for reply in replies:
        spent = reply.get(SPENT)
        if spent is not None:
            usd = (usd or 0.0) + spent
            prompt += reply.get("p", 0)
            completion += reply.get("o", 0)
    if usd is not None:
        record[SPENT], record["p"], record["o"] = usd, prompt, completion
    return record


def _writing(state: Replay, line: int, record: dict[str, Any]) -> None:
    start, end = record.get("b"), record.get("e")
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end):
        return
    writing = state.writing
    # Written at ``start``: whatever an earlier record put there or after was cut off
    # by the run that wrote this one (the output only grows, from its vouched end).
    # So the entries stay in order of their starts, and the stale ones are the last.
    while writing and next(reversed(writing.values()))[0] >= start:
        writing.popitem()
    writing.pop(line, None)  # (a dict keeps a key where it was first put)
    writing[line] = (start, end)
