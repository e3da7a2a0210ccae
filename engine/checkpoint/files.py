"""The two ways Turnstile writes a file: replaced whole, or appended to.

``atomic_write`` (and ``replacing``, for data written as a stream) is the one way a
small state file is replaced: the manifest, the snapshot, a shard plan or done
marker, the report, a merged output. Temp file beside it, fsync, rename over it,
fsync the folder: after a crash the file is the old one or the new one, never half.

``AppendFile`` is an append-only descriptor that knows its length, opened cut back to
the length the caller vouches for (what a journal or a snapshot says was written),
and can roll a failed write back: the journal, the output files, ``emits.bin`` and
the history (engine.history's ``Appender``) are each one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

Buffer = bytes | memoryview
try:
    _IOV_MAX = max(16, os.sysconf("SC_IOV_MAX"))
except (ValueError, OSError):
    _IOV_MAX = 1024


def fsync_dir(path: Path) -> None:
    """Make the folder's last renames, creations and removals durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def replacing(path: Path, *, tmp: Path | None = None) -> Iterator[IO[bytes]]:
    """A file to write ``path``'s new content into; it replaces ``path`` atomically when
    the block ends without an error (and is removed when it raises).

    ``tmp`` names the temp file (default ``.<name>.tmp-<pid>`` beside it): a fixed name
    lets a later run find and remove one a crash left behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = tmp if tmp is not None else path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with temp.open("wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: Path, data: bytes, *, tmp: Path | None = None) -> None:
    """Make ``data`` the content of ``path`` all at once, durably (see ``replacing``)."""
    with replacing(path, tmp=tmp) as f:
        f.write(data)


class AppendFile:
    """An append-only file descriptor that knows its length.

    Opened cut back to ``keep`` bytes (what the caller vouches for: the rest is a torn
    or unvouched tail). ``rollback`` cuts a failed write off again.
    """

    def __init__(self, path: Path, keep: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        size = os.fstat(self.fd).st_size
        if size > keep:
            os.ftruncate(self.fd, keep)  # drop what the journal does not vouch for
        self.size = min(size, keep)
        self.dirty = False

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]
        self.size += len(data)
        self.dirty = True

    def write_parts(self, parts: Sequence[Buffer]) -> None:
        """Append ``parts`` in order, without joining them first (``writev``, up to
        ``IOV_MAX`` at a time; a short write's rest is written whole)."""
        for at in range(0, len(parts), _IOV_MAX):
            chunk = parts[at : at + _IOV_MAX]
            size = sum(map(len, chunk))
            written = os.writev(self.fd, chunk)
            if written < size:
                self.size += written
                self.write(b"".join(chunk)[written:])
            else:
                self.size += size
        self.dirty = True

    def rollback(self, size: int) -> None:
        os.ftruncate(self.fd, size)
        self.size = size

    def sync(self) -> None:
        if self.dirty:
            os.fsync(self.fd)
            self.dirty = False

    def close(self) -> None:
        os.close(self.fd)
