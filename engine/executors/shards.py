"""A sharded run's folder: the plan, one checkpoint per shard, and what each shard is at.

``checkpoint_dir`` of a sharded run holds, besides the run's manifest and lock::

    plan.json             the input cut into shards (engine.input.sources.Slice),
                          written once, atomically; its shard count is the run's
    storage-check         a token the driver writes and every shard reads back
    shards/0003/          shard 3's own checkpoint (manifest, lock, journal, snapshot)
                          and its rows.jsonl / rows.failed.jsonl / rows.filtered.jsonl
    shards/0003/done.json written atomically once shard 3 finished: its counts
    shards/0003/error.txt why its last attempt failed (removed when it finishes)

The driver never reads a shard's journal to know whether it is finished: a done
marker says so, written after the shard's writer closed its files. A shard without
one resumes from its own journal. Everything here is blocking file work.
"""

from __future__ import annotations

import fcntl
import secrets
import shutil
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from engine.checkpoint.checkpoint import Checkpoint
from engine.checkpoint.files import atomic_write
from engine.checkpoint.manifest import LOCK_NAME, MANIFEST_NAME
from engine.config import ExecutorConfig, MetricsConfig, RunConfig
from engine.errors import CheckpointError
from engine.executors.base import PLAN_NAME
from engine.input.sources import Slice

MERGED_NAME = "merged.json"  # written by engine.executors.merge once a merge finished
SHARDS_DIR = "shards"
DONE_NAME = "done.json"
ERROR_NAME = "error.txt"
STORAGE_CHECK = "storage-check"
PLAN_VERSION = 1
_FRESH = "run with --fresh to start over (the checkpoint is discarded)"


@dataclass(frozen=True, slots=True)
class Plan:
    shards: tuple[Slice, ...]
    input_digest: str

    def to_json(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "input_digest": self.input_digest,
            "shards": [piece.to_json() for piece in self.shards],
        }

    @classmethod
    def from_json(cls, data: Any) -> Plan:
        if not isinstance(data, dict) or data.get("version") != PLAN_VERSION:
            raise ValueError("not a plan of this version")
        shards = data.get("shards")
        if not isinstance(shards, list) or not shards:
            raise ValueError("no shards")
        pieces = tuple(Slice.from_json(item) for item in shards)
        if [p.index for p in pieces] != list(range(len(pieces))):
            raise ValueError("shards are not numbered 0..n-1")
        return cls(shards=pieces, input_digest=str(data.get("input_digest")))


def shard_dir(checkpoint_dir: Path, index: int) -> Path:
    return checkpoint_dir / SHARDS_DIR / f"{index:04d}"


def shard_config(config: RunConfig, piece: Slice) -> RunConfig:
    """The single-process run of one shard: its slice, its own checkpoint and files."""
    folder = shard_dir(config.checkpoint_dir, piece.index)
    return replace(
        config,
        output=folder / "rows.jsonl",
        checkpoint_dir=folder,
        executor=ExecutorConfig(),
        metrics=MetricsConfig(),  # the driver serves the whole run's
        piece=piece,
    )


def read_plan(checkpoint_dir: Path) -> Plan | None:
    path = checkpoint_dir / PLAN_NAME
    try:
        return Plan.from_json(orjson.loads(path.read_bytes()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # orjson.JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: unreadable shard plan ({exc}); {_FRESH}") from exc


def write_plan(checkpoint_dir: Path, plan: Plan) -> None:
    atomic_write(
        checkpoint_dir / PLAN_NAME, orjson.dumps(plan.to_json(), option=orjson.OPT_INDENT_2)
    )


def check_plan(plan: Plan, shards: int, input_digest: str, where: Path) -> None:
    """Refuse a rerun whose shard count or input is not the plan's."""
    if plan.input_digest != input_digest:
        raise CheckpointError(f"{where}: the input changed since the shards were planned; {_FRESH}")
    if len(plan.shards) != shards:
        raise CheckpointError(
            f"{where}: this run was cut into {len(plan.shards)} shards; the shard count is "
            f"fixed by the first run: set executor.shards: {len(plan.shards)} (or --shards "
            f"{len(plan.shards)}) to resume, or {_FRESH}"
        )


def clear_shards(config: RunConfig) -> None:
    """--fresh for a sharded run: the plan and every shard go, then the run's files."""
    folder = config.checkpoint_dir
    (folder / MANIFEST_NAME).unlink(missing_ok=True)
    (folder / PLAN_NAME).unlink(missing_ok=True)
    shutil.rmtree(folder / SHARDS_DIR, ignore_errors=True)
    for path in (
        folder / STORAGE_CHECK,
        folder / MERGED_NAME,
        config.output,
        config.failed_output,
        config.filtered_output,
    ):
        path.unlink(missing_ok=True)


# -- shared storage ----------------------------------------------------------------


def write_storage_token(checkpoint_dir: Path) -> str:
    """A fresh token in ``checkpoint_dir`` for every shard to read back (shared storage)."""
    token = secrets.token_hex(16)
    atomic_write(checkpoint_dir / STORAGE_CHECK, token.encode())
    return token


def check_storage(checkpoint_dir: Path, token: str, node: str) -> None:
    """In a shard: the driver's token is there, so this node sees the same checkpoint."""
    path = checkpoint_dir / STORAGE_CHECK
    try:
        seen = path.read_text().strip()
    except OSError:
        seen = None
    if seen != token:
        raise CheckpointError(
            f"checkpoint_dir {checkpoint_dir} is not shared storage: node {node} does not see "
            f"the file the driver wrote there ({path}); put checkpoint_dir on a filesystem "
            "every node mounts at the same path (NFS, EFS, Lustre, a ReadWriteMany volume)"
        )


# -- shard state ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ShardState:
    index: int
    rows: int  # the row numbers its slice spans
    state: str  # done | running | failed | pending
    counts: dict[str, int]  # ok / failed / filtered, once done
    error: str | None = None
    started: bool = False  # pending with a journal: it resumes from there


def mark_done(checkpoint_dir: Path, index: int, counts: dict[str, int]) -> None:
    folder = shard_dir(checkpoint_dir, index)
    atomic_write(folder / DONE_NAME, orjson.dumps(counts))
    (folder / ERROR_NAME).unlink(missing_ok=True)


def mark_failed(checkpoint_dir: Path, index: int, error: str) -> None:
    atomic_write(shard_dir(checkpoint_dir, index) / ERROR_NAME, error.encode())


def shard_state(checkpoint_dir: Path, piece: Slice) -> ShardState:
    folder = shard_dir(checkpoint_dir, piece.index)
    try:
        counts = orjson.loads((folder / DONE_NAME).read_bytes())
        return ShardState(piece.index, piece.rows, "done", dict(counts))
    except FileNotFoundError:
        pass
    try:
        error = (folder / ERROR_NAME).read_text()
        return ShardState(piece.index, piece.rows, "failed", {}, error, started=True)
    except FileNotFoundError:
        pass
    if not (folder / MANIFEST_NAME).exists():
        return ShardState(piece.index, piece.rows, "pending", {})
    state = "running" if _locked(folder / LOCK_NAME) else "pending"
    return ShardState(piece.index, piece.rows, state, {}, started=True)


def _locked(path: Path) -> bool:
    """Whether a run holds this checkpoint lock now (engine.checkpoint.manifest's flock)."""
    try:
        with path.open("rb") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    except FileNotFoundError:
        return False
    return False


def wait_unlocked(checkpoint_dir: Path, index: int, timeout_s: float) -> bool:
    """Wait until no process holds shard ``index``'s checkpoint lock, up to ``timeout_s``.

    A shard holds it from before its first write to after its last, so once it is free
    the shard's files say everything it did: a stopped run reads its counts after
    this, not from the last counters a shard reported (up to a lease old). Blocking;
    True when the lock is free.
    """
    path = shard_dir(checkpoint_dir, index) / LOCK_NAME
    deadline = time.monotonic() + timeout_s
    while _locked(path):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)  # a process's exit is not something a file lock can wait on here
    return True


def journaled_counts(config: RunConfig, piece: Slice) -> dict[str, int] | None:
    """Rows a started shard has finished, from its checkpoint (rows, failed, filtered);
    None when it has none or it cannot be read. Blocking."""
    shard = shard_config(config, piece)
    if not (shard.checkpoint_dir / MANIFEST_NAME).exists():
        return None
    try:
        state = Checkpoint.of(shard).state(strict=False)
    except (OSError, CheckpointError):
        return None
    return {"rows": len(state.done), "failed": state.rows_failed, "filtered": state.rows_filtered}
