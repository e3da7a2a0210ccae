"""The checkpoint folder's manifest and lock.

The manifest pins what a run's journal means: fingerprints of the input file and
of the generation-relevant config, and the output path. Resuming with any of them
changed is refused (unless ``--fresh``): the journal's turns would be attached to
the wrong conversations or mixed with replies made under other settings.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import orjson

from engine.checkpoint.files import atomic_write
from engine.checkpoint.journal import segments
from engine.checkpoint.paths import same_file
from engine.checkpoint.snapshot import EMITS_NAME, SNAPSHOT_NAME
from engine.config import RunConfig
from engine.errors import CheckpointError
from engine.input.base import Source

MANIFEST_NAME = "manifest.json"
LOCK_NAME = "lock"
FORMAT_VERSION = 1
# Checkpoints made since journal records carry a checksum say so: a record without
# one is then damage. Those from before resume as they are (the format is the same).
CHECKSUMS_KEY, CHECKSUMS = "checksums", "crc32"
_HASH_CHUNK = 1 << 22


@dataclass(frozen=True, slots=True)
class InputPrint:
    size: int
    mtime_ns: int
    digest: str


def hash_file(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def input_print(source: Source, known: dict[str, Any] | None = None) -> InputPrint:
    """The input's fingerprint. Reuses a known digest when size and mtime are unchanged.

    A folder input (Parquet files, a saved dataset) is fingerprinted over the files
    that define its rows, in row order; a single file exactly as before, so the
    checkpoints of earlier versions still resume.
    """
    path, files = source.path, source.files()
    stats = [f.stat() for f in files]
    size = sum(st.st_size for st in stats)
    mtime_ns = max((st.st_mtime_ns for st in stats), default=0)
    if known and known.get("size") == size and known.get("mtime_ns") == mtime_ns:
        return InputPrint(size, mtime_ns, str(known.get("digest")))
    if len(files) == 1 and files[0] == path:
        return InputPrint(size, mtime_ns, hash_file(path))
    h = hashlib.blake2b(digest_size=16)
    for f in files:
        h.update(f.relative_to(path).as_posix().encode() + b"\0" + hash_file(f).encode() + b"\n")
    return InputPrint(size, mtime_ns, h.hexdigest())


def config_digest(config: RunConfig) -> str:
    data = orjson.dumps(config.fingerprint_fields(), option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def new_manifest(
    config: RunConfig, fingerprint: InputPrint, *, checksums: bool = True
) -> dict[str, Any]:
    """The manifest of a run; ``checksums`` says its journal records all carry one
    (False only for a checkpoint begun before them, whose manifest is rewritten)."""
    return {
        "format": FORMAT_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "task": config.task,
        "input": {
            "path": str(config.input),
            "size": fingerprint.size,
            "mtime_ns": fingerprint.mtime_ns,
            "digest": fingerprint.digest,
        },
        "output": str(config.output),
        "config": config.fingerprint_fields(),
        "config_digest": config_digest(config),
        **({CHECKSUMS_KEY: CHECKSUMS} if checksums else {}),
    }


def has_checksums(manifest: dict[str, Any]) -> bool:
    """Whether every journal record of the manifest's checkpoint carries a checksum."""
    return manifest.get(CHECKSUMS_KEY) == CHECKSUMS


def read_manifest(checkpoint_dir: Path) -> dict[str, Any] | None:
    path = checkpoint_dir / MANIFEST_NAME
    try:
        data = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, orjson.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{path}: unreadable manifest ({exc}); run with --fresh to start over"
        ) from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: unreadable manifest; run with --fresh to start over")
    return data


def check_manifest(manifest: dict[str, Any], config: RunConfig, source: Source) -> InputPrint:
    """Refuse to resume when the input, the config or the output changed."""
    where = config.checkpoint_dir
    hint = "run with --fresh to start over (the checkpoint is discarded)"
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{where}: checkpoint format {manifest.get('format')!r}; {hint}")
    if manifest.get("task") != config.task:
        raise CheckpointError(
            f"{where}: this checkpoint is of a {manifest.get('task')!r} run, the config says "
            f"{config.task!r}; use another checkpoint_dir or {hint}"
        )
    recorded = manifest.get("input")
    known: dict[str, Any] = recorded if isinstance(recorded, dict) else {}
    fingerprint = input_print(source, known)
    if fingerprint.digest != known.get("digest"):
        raise CheckpointError(
            f"the input file {config.input} has changed since the run in {where} started; "
            f"restore the original file to resume, or {hint}; with cache.dir set, only what "
            "changed is requested"
        )
    if manifest.get("config_digest") != config_digest(config):
        _refuse_task_resume(manifest, config, hint)
        changed = _changed_keys(manifest.get("config"), config.fingerprint_fields())
        raise CheckpointError(
            f"the config changed since the run in {where} started ({', '.join(changed)}): "
            f"its replies would not match; put the old values back to resume, or {hint}"
        )
    if manifest.get("output") != str(config.output):
        raise CheckpointError(
            f"the output path changed since the run in {where} started "
            f"(was {manifest.get('output')}); put it back to resume, or {hint}"
        )
    return fingerprint


def open_manifest(
    config: RunConfig,
    source: Source,
    manifest: dict[str, Any] | None,
    known_input: dict[str, Any] | None = None,
) -> tuple[bool, InputPrint]:
    """Check the stored ``manifest`` against the run, or write the first one; whether
    this resumes a run, and the input's fingerprint. ``known_input``: the input's
    fingerprint as a manifest stores it, when the caller has it (a shard: the driver
    hashed the input once for every shard). Blocking; hold the checkpoint's lock."""
    if manifest is None:
        fingerprint = input_print(source, known_input)
        write_manifest(config.checkpoint_dir, new_manifest(config, fingerprint))
        return False, fingerprint
    fingerprint = check_manifest(manifest, config, source)
    if fingerprint.mtime_ns != manifest["input"].get("mtime_ns"):
        # Same bytes, new mtime (copied or touched): remember it, skip the rehash next time.
        renewed = new_manifest(config, fingerprint, checksums=has_checksums(manifest))
        write_manifest(config.checkpoint_dir, renewed)
    return True, fingerprint


def _refuse_task_resume(manifest: dict[str, Any], config: RunConfig, hint: str) -> None:
    """The task's own reasons not to resume a checkpoint (distillation: another turn rule)."""
    recorded = manifest.get("config")
    section = recorded.get(config.task) if isinstance(recorded, dict) else None
    problem = config.kind.resume_problem(section if isinstance(section, dict) else None, config)
    if problem is not None:
        raise CheckpointError(problem + hint)


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        out: list[str] = []
        for key in keys:
            out += _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [prefix.rstrip(".") or "config"] if old != new else []


def write_manifest(checkpoint_dir: Path, manifest: dict[str, Any]) -> None:
    """Replace the manifest atomically: temp file, fsync, rename, fsync the folder."""
    path = checkpoint_dir / MANIFEST_NAME
    data = orjson.dumps(manifest, option=orjson.OPT_INDENT_2)
    atomic_write(path, data, tmp=path.with_suffix(".json.tmp"))


def lock_checkpoint(checkpoint_dir: Path) -> IO[bytes]:
    """Take the checkpoint's lock, or refuse at once if another process holds it.

    An OS lock (flock) dies with its process, so a SIGKILL never leaves it stale.
    The returned file must stay open for the run.
    """
    return _flock(
        checkpoint_dir / LOCK_NAME,
        f"pid {os.getpid()}",
        unwritable=lambda why: (
            f"{checkpoint_dir}: the checkpoint folder is not writable ({why}); "
            "fix its permissions or set checkpoint_dir to a writable folder"
        ),
        busy=lambda holder: (
            f"{checkpoint_dir} is in use by {holder}; one run per checkpoint: wait for it "
            "to finish or stop it, or give this run its own checkpoint_dir"
        ),
    )


def output_lock_path(output: Path) -> Path:
    """The lock file beside the output: ``.<output name>.lock``."""
    return output.with_name(f".{output.name}.lock")


def lock_output(output: Path, checkpoint_dir: Path) -> IO[bytes]:
    """Take the output's lock, or refuse at once if another run holds it.

    Two runs with different checkpoints appending to one output would interleave
    their rows and cut each other's back on resume. An OS lock (flock) like the
    checkpoint's: it dies with its process; the file stays (removing it would race
    with the next run taking it). The returned file must stay open for the run.
    """
    path = output_lock_path(output)
    return _flock(
        path,
        f"pid {os.getpid()}, checkpoint_dir {checkpoint_dir}",
        unwritable=lambda why: (
            f"output: cannot create {path} ({why}); make {path.parent} writable, "
            "or set output: to a path in a writable folder"
        ),
        busy=lambda holder: (
            f"output: {output} is being written by another run ({holder}); one run per "
            "output: wait for it to finish or stop it, or give this run another output:"
        ),
    )


def _flock(
    path: Path, note: str, *, unwritable: Callable[[str], str], busy: Callable[[str], str]
) -> IO[bytes]:
    """Take an exclusive OS lock on ``path`` (made with its folder), noting who holds it;
    CheckpointError with ``unwritable(why)`` or ``busy(holder)`` when it cannot be had."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = path.open("a+b")
    except OSError as exc:
        raise CheckpointError(unwritable(str(exc.strerror))) from exc
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        handle.seek(0)
        holder = handle.read().decode(errors="replace").strip() or "another process"
        handle.close()
        raise CheckpointError(busy(holder)) from exc
    handle.seek(0)
    handle.truncate()
    handle.write(note.encode())
    handle.flush()
    return handle


class Locks:
    """The locks a run holds (its checkpoint's, its output's), released together."""

    def __init__(self, *handles: IO[bytes]) -> None:
        self._handles = handles

    def close(self) -> None:
        for handle in reversed(self._handles):
            handle.close()


def clear_checkpoint(config: RunConfig) -> None:
    """--fresh: forget the journal, snapshot and manifest and remove the run's output files.

    Refuses, before deleting anything, when one of them is the input (under
    another name: a link, ``..``): the config check should have caught it, and
    this is the last place where the input could be lost.
    """
    folder = config.checkpoint_dir
    # The manifest first, the outputs last: stopped half-way, what is left is either
    # nothing or an output that the next run refuses to overwrite without --fresh.
    doomed = [
        folder / MANIFEST_NAME,
        folder / SNAPSHOT_NAME,
        folder / (SNAPSHOT_NAME + ".tmp"),
        folder / EMITS_NAME,
        *(path for _, path in segments(folder)),
        config.output,
        config.failed_output,
        config.filtered_output,
    ]
    for path in doomed:
        if same_file(path, config.input):
            raise CheckpointError(
                f"--fresh would delete {path}, which is the input file {config.input}; "
                "set output: and checkpoint_dir: to paths apart from the input"
            )
    for path in doomed:
        try:
            path.unlink(missing_ok=True)
        except IsADirectoryError as exc:
            raise CheckpointError(
                f"--fresh would delete {path}, which is a folder; set output: to a file path "
                "or move the folder away"
            ) from exc
        except OSError as exc:
            raise CheckpointError(
                f"--fresh cannot delete {path} ({exc.strerror}); fix the folder's permissions "
                "and run again"
            ) from exc
