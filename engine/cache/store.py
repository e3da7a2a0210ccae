"""The reply store: replies kept across runs, keyed by ``engine.cache.keys``.

The store is one SQLite database in WAL mode (``<cache.dir>/replies.sqlite3``),
shared by every run and shard that names the folder: readers never wait on the
writer, writers take turns (``busy_timeout``), and a key already stored is kept
(``INSERT OR IGNORE``: the same request made by two runs at once has one reply).
A SIGKILL at any moment leaves the database whole (SQLite's own guarantee): a
batch is committed or not at all, and ``ReplyCache.put`` returns only once its
batch is committed, so a reply a run has handed to its task is in the store.

``ReplyCache`` keeps writes off the event loop: additions queue and go to a worker
thread in batches, not waited for (a run's replies are journaled first: the store
only saves other runs a request); the run's end commits every one still queued.
Lookups in a store small enough to sit in the page cache are answered on the loop
(a few microseconds: less than the thread hop); in a bigger one they are batched
through the thread too, so a cold disk never stalls the loop.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import orjson

from engine.cache.settings import READ_ONLY, CacheConfig

STORE_NAME = "replies.sqlite3"
_BATCH = 512  # lookups or additions per thread call, at most
_BACKLOG = _BATCH * 16  # additions queued past this make the next one wait for a round
_BUSY_MS = 60_000  # how long a writer waits for another run's commit
_READER_BUSY_MS = 100  # a lookup on the loop that finds the file busy goes to the thread
# A store up to this size at open is read on the event loop (a lookup of a key in a
# file the page cache holds: a few microseconds, less than a thread hop); a bigger one
# through the worker thread, batched, so a cold disk never stalls the loop.
INLINE_READS_MAX_BYTES = 256 << 20
_PUT_LINGER_S = 0.02  # additions alone wait this long for more to commit with them


class ReplyStore:
    """The SQLite database: its main connection used from one thread at a time (the
    cache's worker calls), and a second one for ``lookup`` on the event loop."""

    def __init__(self, folder: Path, *, read_only: bool = False) -> None:
        self.path = folder / STORE_NAME
        self.read_only = read_only
        self._db: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        if read_only:
            if self.path.exists():
                uri = f"{self.path.resolve().as_uri()}?mode=ro"
                self._db = self._connect(uri, uri=True)
                self._reader = self._connect(uri, uri=True, busy_ms=_READER_BUSY_MS)
            self.small = self._size() <= INLINE_READS_MAX_BYTES
            return
        folder.mkdir(parents=True, exist_ok=True)
        db = self._connect(str(self.path))
        # Every run of the store sets WAL; the first one's setting is kept in the file.
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # WAL: a SIGKILL loses no commit
        db.execute(
            "CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, reply BLOB NOT NULL)"
            " WITHOUT ROWID"
        )
        self._db = db
        self._reader = self._connect(str(self.path), busy_ms=_READER_BUSY_MS)
        # Small enough to be in the page cache: looked up on the loop, no thread hop.
        self.small = self._size() <= INLINE_READS_MAX_BYTES

    @staticmethod
    def _connect(target: str, *, uri: bool = False, busy_ms: int = _BUSY_MS) -> sqlite3.Connection:
        db = sqlite3.connect(
            target, timeout=busy_ms / 1000, isolation_level=None, check_same_thread=False, uri=uri
        )
        db.execute(f"PRAGMA busy_timeout={busy_ms}")
        return db

    def _size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def lookup(self, key: str) -> dict[str, Any] | None:
        """The stored reply of ``key`` through the reader connection (a WAL reader never
        waits for the writer); raises sqlite3.OperationalError when the file is busy."""
        if self._reader is None:
            return None
        row = self._reader.execute("SELECT reply FROM replies WHERE key = ?", (key,)).fetchone()
        return None if row is None else orjson.loads(row[0])

    def get_many(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The stored replies of ``keys`` (those it holds)."""
        if self._db is None or not keys:
            return {}
        marks = ",".join("?" * len(keys))
        rows = self._db.execute(
            f"SELECT key, reply FROM replies WHERE key IN ({marks})", tuple(keys)
        ).fetchall()
        return {key: orjson.loads(reply) for key, reply in rows}

    def put_many(self, items: Iterable[tuple[str, dict[str, Any]]]) -> None:
        """Add replies in one transaction; a key already there keeps its reply."""
        if self._db is None or self.read_only:
            return
        rows = [(key, orjson.dumps(reply)) for key, reply in items]
        if not rows:
            return
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("INSERT OR IGNORE INTO replies (key, reply) VALUES (?, ?)", rows)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def exchange(
        self, items: Sequence[tuple[str, dict[str, Any]]], keys: Sequence[str]
    ) -> dict[str, dict[str, Any]]:
        """Add ``items``, then look ``keys`` up (one thread call of the cache's server)."""
        self.put_many(items)
        return self.get_many(keys)

    def count(self) -> int:
        if self._db is None:
            return 0
        return int(self._db.execute("SELECT count(*) FROM replies").fetchone()[0])

    def close(self) -> None:
        for db in (self._db, self._reader):
            if db is not None:
                db.close()
        self._db = self._reader = None


class ReplyCache:
    """The store as a run's tasks use it: ``get`` and ``put``, off the loop where it counts.

    Additions are not waited for (their replies are journaled already: the store only
    saves other runs a request). They queue, are seen by lookups at once (``_pending``)
    and go to the store in one thread call per round, with the lookups queued by
    then: a round starts when a lookup waits, when ``_BATCH`` additions are queued, or
    ``_PUT_LINGER_S`` after the first; an addition waits only while ``_BACKLOG`` are
    queued. After ``close`` the server commits everything queued before ``run`` ends.
    A small store (``ReplyStore.small``) answers lookups on the loop itself.
    """

    def __init__(self, store: ReplyStore) -> None:
        self.store = store
        self.read_only = store.read_only
        self._inline = store.small
        self._gets: list[tuple[str, asyncio.Future[dict[str, Any] | None]]] = []
        self._puts: list[tuple[str, dict[str, Any]]] = []
        self._pending: dict[str, dict[str, Any]] = {}  # added, not yet committed
        self._room: list[asyncio.Future[None]] = []  # additions waiting on the backlog
        self._wake = asyncio.Event()  # a lookup waits, a batch is full, or the cache closed
        self._queued = asyncio.Event()  # something is queued
        self._closed = False

    async def get(self, key: str) -> dict[str, Any] | None:
        """The stored reply of ``key``, or None."""
        self._check_open()
        reply = self._pending.get(key)
        if reply is not None:
            return reply
        if self._inline:
            try:
                return self.store.lookup(key)
            except sqlite3.OperationalError:
                pass  # the file is busy (another run's checkpoint): ask the thread
        future: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
        self._gets.append((key, future))
        self._queued.set()
        self._wake.set()
        return await future

    async def put(self, key: str, reply: dict[str, Any]) -> None:
        """Add a reply (nothing in read-only mode): committed by a later round."""
        if self.read_only:
            return
        self._check_open()
        self._puts.append((key, reply))
        self._pending.setdefault(key, reply)
        self._queued.set()
        if len(self._puts) >= _BATCH:
            self._wake.set()
        if len(self._puts) > _BACKLOG:
            room: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._room.append(room)
            await room

    async def run(self) -> None:
        """Serve lookups and additions until ``close``, then commit what is queued."""
        while True:
            if not self._gets and not self._puts:
                if self._closed:
                    return
                self._queued.clear()
                await self._queued.wait()
                continue
            if not self._gets and len(self._puts) < _BATCH and not self._closed:
                self._wake.clear()
                with anyio.move_on_after(_PUT_LINGER_S):
                    await self._wake.wait()  # more additions to commit with these
            gets, self._gets = self._gets[:_BATCH], self._gets[_BATCH:]
            puts, self._puts = self._puts[:_BATCH], self._puts[_BATCH:]
            keys = list({key for key, _ in gets})
            try:
                found = await anyio.to_thread.run_sync(self.store.exchange, puts, keys)
            except Exception as exc:
                for _, future in gets:
                    if not future.done():
                        future.set_exception(exc)
                raise
            for key, _ in puts:
                self._pending.pop(key, None)
            for key, future in gets:
                if not future.done():  # its asker may have been cancelled meanwhile
                    future.set_result(found.get(key))
            if self._room and len(self._puts) <= _BACKLOG:
                room, self._room = self._room, []
                for waiting in room:
                    if not waiting.done():
                        waiting.set_result(None)

    def close(self) -> None:
        """No more lookups or additions: ``run`` commits what is queued, then returns."""
        self._closed = True
        self._queued.set()
        self._wake.set()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the reply cache is closed")


@asynccontextmanager
async def open_cache(config: CacheConfig) -> AsyncIterator[ReplyCache | None]:
    """The run's cache while the block runs (None when ``cache.dir`` is not set)."""
    if config.dir is None:
        yield None
        return
    store = await anyio.to_thread.run_sync(
        lambda: ReplyStore(Path(config.dir or "."), read_only=config.mode == READ_ONLY)
    )
    cache = ReplyCache(store)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(cache.run)
            try:
                yield cache
            finally:
                cache.close()  # the loops finish what was queued, then end
    finally:
        await anyio.to_thread.run_sync(store.close)
