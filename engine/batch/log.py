"""A batch model's own durability records, and what replaying them says.

One append-only file per model in the checkpoint folder (``batches.<model>.jsonl``),
written through ``BatchLog.record`` (one fsynced line per record: a few per batch):

- ``{"k": "file", "seq", "file"}``: a batch file was uploaded (before its batch is created);
- ``{"k": "batch", "seq", "file", "batch", "status", "total", "created_at"}``: its batch
  was created (or found by its metadata), as the provider described it then;
- ``{"k": "done", "batch", "status", "completed", "failed", "total"}``: every line of
  the batch is accounted for (handed to its row, or its row was already finished).

Records of earlier versions lack the fields after ``batch``: readers default them.

The row journal keys every record by an input line and compacts it in snapshots; these
records belong to no row, hence a file of their own. A torn last line is dropped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import anyio
import orjson


class BatchLog(Protocol):
    """Where a batch endpoint journals its records (``writer.record``-style)."""

    async def record(self, record: dict[str, Any]) -> None: ...

    def replay(self) -> list[dict[str, Any]]: ...


@dataclass(slots=True)
class Replayed:
    """What earlier runs left: uploaded files without a batch, batches not yet done."""

    files: dict[int, str] = field(default_factory=dict)  # seq -> file id, no batch journaled
    batches: dict[int, tuple[str, str]] = field(default_factory=dict)  # seq -> (file, batch)
    next_seq: int = 0


def replay(records: list[dict[str, Any]]) -> Replayed:
    state = Replayed()
    done: set[str] = set()
    for r in records:
        kind = r.get("k")
        if kind == "file":
            state.files[r["seq"]] = r["file"]
        elif kind == "batch":
            state.files.pop(r["seq"], None)
            state.batches[r["seq"]] = (r["file"], r["batch"])
        elif kind == "done":
            done.add(r["batch"])
        if isinstance(r.get("seq"), int):
            state.next_seq = max(state.next_seq, r["seq"] + 1)
    state.batches = {s: fb for s, fb in state.batches.items() if fb[1] not in done}
    return state


@dataclass(frozen=True, slots=True)
class LoggedBatch:
    """A batch as its records last described it (``turnstile status``, ``cancel``)."""

    seq: int
    file: str
    batch: str  # "" while only its file was journaled (created, or not, by a killed run)
    done: bool = False
    status: str = "unknown"
    completed: int = 0
    failed: int = 0
    total: int = 0
    created_at: float = 0.0  # the provider's, unix seconds (0: unknown)


def logged_batches(records: list[dict[str, Any]]) -> list[LoggedBatch]:
    """Every batch the records name, by sequence number, with its last known state. Pure."""
    found: dict[int, LoggedBatch] = {}
    by_id: dict[str, int] = {}
    for r in records:
        kind = r.get("k")
        if kind == "file" and r["seq"] not in found:
            found[r["seq"]] = LoggedBatch(r["seq"], r["file"], "", status="uploaded")
        elif kind == "batch":
            found[r["seq"]] = LoggedBatch(
                r["seq"],
                r["file"],
                r["batch"],
                status=str(r.get("status") or "unknown"),
                total=int(r.get("total") or 0),
                created_at=float(r.get("created_at") or 0.0),
            )
            by_id[r["batch"]] = r["seq"]
        elif kind == "done" and r.get("batch") in by_id:
            seq = by_id[r["batch"]]
            old = found[seq]
            found[seq] = LoggedBatch(
                seq,
                old.file,
                old.batch,
                done=True,
                status=str(r.get("status") or "completed"),
                completed=int(r.get("completed") or 0),
                failed=int(r.get("failed") or 0),
                total=int(r.get("total") or old.total),
                created_at=old.created_at,
            )
    return [found[seq] for seq in sorted(found)]


class FileLog:
    """``BatchLog`` on a file of its own."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def record(self, record: dict[str, Any]) -> None:
        await anyio.to_thread.run_sync(self._append, orjson.dumps(record) + b"\n")

    def _append(self, data: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def replay(self) -> list[dict[str, Any]]:
        return read_log(self.path)


def read_log(path: Path) -> list[dict[str, Any]]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    records = []
    for line in raw.splitlines():
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue  # the torn last line of a killed run
        if isinstance(record, dict):
            records.append(record)
    return records


def log_path(checkpoint_dir: Path, model: str) -> Path:
    return checkpoint_dir / f"batches.{model}.jsonl"


class MemoryLog:
    """``BatchLog`` in memory (tests, the bench)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    async def record(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def replay(self) -> list[dict[str, Any]]:
        return list(self.records)
