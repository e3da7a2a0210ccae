"""Snapshots: what a run has finished, so that a resume does not grow with the run.

A resume reads ``snapshot.bin`` and then only the journal segments after it, not
the whole journal. The files of a checkpoint folder, besides the manifest:

- ``journal.jsonl`` (segment 0), ``journal.000001.jsonl``, ...: the journal, in
  numbered segments (engine.checkpoint.journal). Only the last is written to.
- ``snapshot.bin``: the state a replay of every segment before segment ``s`` gives
  (the done lines as a compressed bitmap, the counters, the output, failed and
  filtered lengths it vouches for, and where in the input a resume may start
  reading: a line before which every line is done, with its byte offset), plus
  the records of the rows still in progress at that point, and ``s``. Replaced
  atomically (temp file, fsync, rename, fsync the folder); a digest of its body
  catches a damaged one.
- ``emits.bin``: the output's emit records of every segment a snapshot covers, as
  little-endian int64 pairs (input line, end of its row in the output), in journal
  order: what ``turnstile export`` needs to put rows in input order once those
  segments are gone (16 bytes a row). The snapshot says how long it is, and its
  CRC32 (``emits_crc``: a flipped bit is a clear error, not a row in the wrong
  place); anything after that (a snapshot that did not finish) is cut off when the
  run reopens it. Snapshots from before the checksum have none: export then checks
  that every line in the index is one the snapshot has done.

The single writer (engine.checkpoint.writer) keeps the same state as replay would,
applying each record it writes with the same rule (``journal.apply``). Every
``snapshot_every_rows`` rows, or once the segment it writes reaches
``snapshot_every_bytes``, it takes a snapshot in a thread hop of its own, between two
batches (the callers of the batch before it are already on their way):

1. fsync the output, failed and filtered files and the segment ``k`` (a snapshot
   is a durability point whatever ``journal.fsync`` says: it vouches for them);
2. append the pending output emits to ``emits.bin`` and fsync it;
3. create segment ``k + 1``;
4. write the snapshot saying ``s = k + 1`` (atomically, as above);
5. write to segment ``k + 1`` from now on, and delete the segments before it.

A SIGKILL before step 4 is done leaves the old snapshot and every segment after it,
so the resume is the one it would have been (an extra empty segment, a longer
``emits.bin`` that is cut back). After step 4, the segments before ``s`` are not
read any more; the next run deletes whichever step 5 did not reach. Nothing is read
twice, nothing is missed.

Rows in progress at a snapshot: their records may lie in segments about to be
deleted, so the snapshot carries them (``partial``, as journal records). The other
choice, keeping a segment until none of its rows is in progress, would keep one
old segment per slow row (a long conversation, a model in an outage) and the
deletion would need per-segment bookkeeping of lines; carrying costs only the
records of the rows in flight, which the tasks hold in memory anyway. Rows a
resume has not picked up yet stay in the writer's state, so each snapshot carries
them again until they finish.
"""

from __future__ import annotations

import base64
import hashlib
import sys
import zlib
from array import array
from pathlib import Path
from typing import Any

import orjson

from engine.checkpoint.crc import crc32
from engine.checkpoint.files import atomic_write
from engine.checkpoint.journal import LineSet, Replay, replay_segments, segments
from engine.errors import CheckpointError

SNAPSHOT_NAME = "snapshot.bin"
EMITS_NAME = "emits.bin"
_MAGIC = b"turnstile-snapshot 1 "
_COUNTERS = (
    "rows_ok",
    "rows_failed",
    "rows_filtered",
    "records",
    "work_records",
    "out_end",
    "failed_end",
    "filtered_end",
)
_FRESH = "run with --fresh to start over (the checkpoint is discarded)"


# -- the format: pure ----------------------------------------------------------------


def encode_snapshot(
    state: Replay, *, segment: int, emits_end: int, emits_crc: int | None = None
) -> bytes:
    """The snapshot of ``state``, which covers the journal segments before ``segment``;
    ``emits_crc`` is the CRC32 of the emits index's first ``emits_end`` bytes."""
    body: dict[str, Any] = {name: getattr(state, name) for name in _COUNTERS}
    body["segment"] = segment
    body["emits_end"] = emits_end
    body["spent"] = [state.spent_usd, state.spent_tokens]  # engine.cost: the budget's spend
    if emits_crc is not None:
        body["emits_crc"] = emits_crc
    body["checksums"] = True  # every journal record after it has one
    body["seek"] = list(state.seek)
    body["done_count"] = len(state.done)
    body["done"] = base64.b64encode(zlib.compress(state.done.to_bytes(), 1)).decode()
    # The records of rows in progress, as journaled, in journal order per row.
    body["partial"] = [record for records in state.partial.values() for record in records]
    data = orjson.dumps(body)
    return _MAGIC + _digest(data) + b"\n" + data


def decode_snapshot(data: bytes) -> Replay:
    """The state a snapshot holds, with ``first_segment`` (and ``segment``) the segment
    after it; raises ValueError when the bytes are not a whole, valid snapshot."""
    head, sep, body = data.partition(b"\n")
    if not sep or not head.startswith(_MAGIC) or head[len(_MAGIC) :] != _digest(body):
        raise ValueError("not a snapshot, or damaged (its digest does not match)")
    fields = orjson.loads(body)
    if not isinstance(fields, dict):
        raise ValueError("not a snapshot")
    numbers: dict[str, int] = {}
    for name in (*_COUNTERS, "segment", "emits_end"):
        value = fields.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} is {value!r}")
        numbers[name] = value
    bitmap = fields.get("done")
    if not isinstance(bitmap, str):
        raise ValueError("done is not text")
    done = LineSet.from_bytes(zlib.decompress(base64.b64decode(bitmap)))
    if len(done) != fields.get("done_count"):
        raise ValueError("the done set does not hold done_count lines")
    state = Replay(done=done)
    for name in _COUNTERS:
        setattr(state, name, numbers[name])
    state.segment = state.first_segment = numbers["segment"]
    state.emits_end = numbers["emits_end"]
    emits_crc = fields.get("emits_crc")  # snapshots before it had none
    if emits_crc is not None and (not isinstance(emits_crc, int) or isinstance(emits_crc, bool)):
        raise ValueError(f"emits_crc is {emits_crc!r}")
    state.emits_crc = emits_crc
    state.strict = fields.get("checksums") is True
    seek = fields.get("seek", [0, 0])  # snapshots before it had none: read from the start
    if (
        not isinstance(seek, list)
        or len(seek) != 2
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in seek)
    ):
        raise ValueError(f"seek is {seek!r}")
    if seek[0] and seek[0] - 1 not in done:
        raise ValueError("seek is past a line not done")
    state.seek = (seek[0], seek[1])
    spent = fields.get("spent", [0.0, 0])  # snapshots before it had none: nothing spent
    if (
        not isinstance(spent, list)
        or len(spent) != 2
        or not all(isinstance(n, int | float) and not isinstance(n, bool) for n in spent)
    ):
        raise ValueError(f"spent is {spent!r}")
    state.spent_usd, state.spent_tokens = float(spent[0]), int(spent[1])
    partial = fields.get("partial")
    if not isinstance(partial, list):
        raise ValueError("partial is not a list")
    for record in partial:
        if not isinstance(record, dict) or not isinstance(record.get("l"), int):
            raise ValueError("a partial record has no line")
        state.partial.setdefault(record["l"], []).append(record)
    return state


def pack_emits(pairs: array[int]) -> bytes:
    """(line, end) pairs, flat, as the emits index stores them: little-endian int64."""
    if sys.byteorder == "little":
        return pairs.tobytes()
    swapped = array("q", pairs)
    swapped.byteswap()
    return swapped.tobytes()


def unpack_emits(data: bytes) -> array[int]:
    pairs = array("q")
    pairs.frombytes(data[: len(data) - len(data) % 16])
    if sys.byteorder != "little":
        pairs.byteswap()
    return pairs


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).hexdigest().encode()


# -- files ---------------------------------------------------------------------------


def write_snapshot(checkpoint_dir: Path, data: bytes) -> None:
    """Replace the snapshot atomically: temp file, fsync, rename, fsync the folder."""
    path = checkpoint_dir / SNAPSHOT_NAME
    atomic_write(path, data, tmp=path.with_name(path.name + ".tmp"))


def read_snapshot(checkpoint_dir: Path) -> Replay | None:
    """The checkpoint's snapshot, or None when it has none (a run before its first)."""
    path = checkpoint_dir / SNAPSHOT_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return decode_snapshot(data)
    except (ValueError, zlib.error) as exc:  # orjson.JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: damaged snapshot ({exc}); {_FRESH}") from exc


def load(
    checkpoint_dir: Path,
    out_size: int,
    failed_size: int,
    filtered_size: int = 0,
    *,
    repair: bool = False,
    strict: bool = False,
) -> Replay:
    """What the checkpoint says is finished: its snapshot, then the segments after it.

    The same state a replay of the whole journal gives (a checkpoint without a
    snapshot is exactly that). The sizes are the files' current lengths: a row the
    journal says was written past the end of its file (possible only after a power
    cut) is taken as not written; the snapshot's own lengths must all be there.
    ``strict``: every journal record must carry a checksum (the manifest says the
    checkpoint was made with them).
    """
    state = read_snapshot(checkpoint_dir)
    sizes = (out_size, failed_size, filtered_size)
    if state is None:
        state = Replay()
    else:
        _check_lengths(checkpoint_dir, state, sizes)
    state.strict = state.strict or strict
    replay_segments(state, tail_segments(checkpoint_dir, state.first_segment), sizes, repair=repair)
    return state


def tail_segments(checkpoint_dir: Path, first: int) -> list[tuple[int, Path]]:
    """The segments from ``first`` on, which must follow each other with no gap."""
    tail = [(n, path) for n, path in segments(checkpoint_dir) if n >= first]
    for expected, (number, path) in enumerate(tail, start=first):
        if number != expected:
            raise CheckpointError(
                f"{checkpoint_dir}: journal segment {expected} is missing (found {path.name}); "
                f"restore it, or {_FRESH}"
            )
    return tail


def covered_segments(checkpoint_dir: Path, first: int) -> list[Path]:
    """The segments before ``first``: a snapshot covers them, nothing reads them."""
    return [path for n, path in segments(checkpoint_dir) if n < first]


def _check_lengths(checkpoint_dir: Path, state: Replay, sizes: tuple[int, int, int]) -> None:
    vouched = (state.out_end, state.failed_end, state.filtered_end)
    for what, size, end in zip(("output", "failed", "filtered"), sizes, vouched, strict=True):
        if size < end:
            raise CheckpointError(
                f"the {what} file is {size} bytes but {checkpoint_dir / SNAPSHOT_NAME} vouches "
                f"for {end}: it was cut or replaced; restore it to resume, or {_FRESH}"
            )
    emits = _size(checkpoint_dir / EMITS_NAME)
    if emits < state.emits_end:
        raise CheckpointError(
            f"{checkpoint_dir / EMITS_NAME} is {emits} bytes but the snapshot vouches for "
            f"{state.emits_end}; restore it to resume, or {_FRESH}"
        )


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


# -- what export reads ---------------------------------------------------------------


def emit_sources(checkpoint_dir: Path) -> tuple[array[int], list[Path]]:
    """Where the output's emits are, in journal order: the emits index (flat (line, end)
    pairs, as far as the snapshot vouches for it), then the segments after the snapshot.

    Read without the lock (export may run beside a run): a segment that a snapshot
    taken meanwhile deletes is a FileNotFoundError when it is read; read again.
    """
    state = read_snapshot(checkpoint_dir)
    if state is None:
        return array("q"), [path for _, path in tail_segments(checkpoint_dir, 0)]
    path = checkpoint_dir / EMITS_NAME
    with path.open("rb") as f:
        data = f.read(state.emits_end)
    damage = check_emits(data, state)
    if damage is not None:
        raise CheckpointError(
            f"{path} is damaged ({damage}): export cannot put the rows in input order. "
            "The output file itself is whole: use it as it is (rows in completion order), "
            "or restore the checkpoint from a copy and export again"
        )
    pairs = unpack_emits(data)
    return pairs, [path for _, path in tail_segments(checkpoint_dir, state.first_segment)]


def check_emits(data: bytes, state: Replay) -> str | None:
    """Why the emits index's bytes are not what the snapshot ``state`` vouches for, or None.

    By its checksum; an index from before checksums by what it must hold: whole pairs
    of lines the snapshot has done and ends inside the output it vouches for.
    """
    if len(data) != state.emits_end:
        return f"{len(data)} bytes where the snapshot vouches for {state.emits_end}"
    if state.emits_crc is not None:
        if crc32(data) != state.emits_crc:
            return "its checksum does not match the snapshot's"
        return None
    pairs = unpack_emits(data)
    flat = iter(pairs)
    for line, end in zip(flat, flat, strict=True):
        if line not in state.done or not 0 < end <= state.out_end:
            return f"an entry names line {line} ending at byte {end}, which the snapshot does not"
    return None


def has_journal(checkpoint_dir: Path) -> bool:
    return bool(segments(checkpoint_dir)) or (checkpoint_dir / SNAPSHOT_NAME).exists()


__all__ = [
    "EMITS_NAME",
    "SNAPSHOT_NAME",
    "covered_segments",
    "decode_snapshot",
    "emit_sources",
    "encode_snapshot",
    "has_journal",
    "load",
    "pack_emits",
    "read_snapshot",
    "tail_segments",
    "unpack_emits",
    "write_snapshot",
]
