"""The end of a sharded run: every shard's rows into the run's own files, in input order.

Once every shard is done, the driver writes ``output`` from the shards' outputs,
shard by shard (the shards are contiguous pieces of the input, in order), each in
input order through its journal's emits (engine.output.export.rows_in_order). The
failed file the same way, ordered by the ``line`` its rows carry; the filtered
file shard by shard, each in the order its rows finished (a filtered row does not
carry its line). Each file is written beside itself, fsynced and renamed into
place, so a merge cut short leaves no half file; the next run simply merges again.
``merged.json`` says a merge finished, so a rerun of a finished run does not redo it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import orjson

from engine.checkpoint.files import atomic_write, replacing
from engine.config import RunConfig
from engine.executors.shards import MERGED_NAME, Plan, shard_config
from engine.output.export import rows_in_order


def merged(config: RunConfig) -> bool:
    """Whether a merge finished and the files it wrote are still there."""
    try:
        sizes = orjson.loads((config.checkpoint_dir / MERGED_NAME).read_bytes())
    except (FileNotFoundError, ValueError):
        return False
    files = (config.output, config.failed_output, config.filtered_output)
    return all(_size(path) == sizes.get(path.name) for path in files)


def merge(config: RunConfig, plan: Plan) -> dict[str, int]:
    """Write the run's output, failed and filtered files from its shards; rows in each."""
    shards = [shard_config(config, piece) for piece in plan.shards]
    counts = {
        "ok": _write(config.output, _outputs(shards)),
        "failed": _write(config.failed_output, _by_line(s.failed_output for s in shards)),
        "filtered": _write(config.filtered_output, _lines(s.filtered_output for s in shards)),
    }
    files = (config.output, config.failed_output, config.filtered_output)
    atomic_write(
        config.checkpoint_dir / MERGED_NAME,
        orjson.dumps({path.name: _size(path) for path in files}),
    )
    return counts


def _outputs(shards: list[RunConfig]) -> Iterator[bytes]:
    for shard in shards:
        assert shard.piece is not None
        with rows_in_order(shard.checkpoint_dir, shard.output, shard.piece.first_row) as rows:
            yield from rows


def _by_line(paths: Iterable[Path]) -> Iterator[bytes]:
    """Failed rows, each shard's sorted by its ``line`` (a shard's failures are few)."""
    for path in paths:
        rows = [(_line_of(raw), raw) for raw in _lines([path])]
        rows.sort(key=lambda item: item[0])
        yield from (raw for _, raw in rows)


def _line_of(raw: bytes) -> int:
    try:
        line = orjson.loads(raw).get("line")
    except (ValueError, AttributeError):
        return -1
    return line if isinstance(line, int) else -1


def _lines(paths: Iterable[Path]) -> Iterator[bytes]:
    for path in paths:
        if not path.exists():
            continue
        with path.open("rb") as f:
            for raw in f:
                if raw.strip():
                    yield raw.rstrip(b"\n")


def _write(dest: Path, rows: Iterable[bytes], chunk: int = 1 << 20) -> int:
    """``rows`` into ``dest``, atomically; how many. An empty result leaves no file."""
    count = 0
    with replacing(dest, tmp=dest.with_name(f".{dest.name}.merge-{os.getpid()}")) as f:
        buffer: list[bytes] = []
        size = 0
        for row in rows:
            buffer.append(row + b"\n")
            size += len(row) + 1
            count += 1
            if size >= chunk:
                f.write(b"".join(buffer))
                buffer, size = [], 0
        f.write(b"".join(buffer))
    if not count:
        dest.unlink(missing_ok=True)  # an empty result leaves no file
    return count


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


__all__ = ["MERGED_NAME", "merge", "merged"]
