"""Replies kept across runs: a request answered once is never paid for again.

``request_key`` is the pure part: the sha256 of what defines a reply (the ``model``
sent, the request fields, the messages exactly as sent, and the generation where
one row asks the same model the same thing several times). Where the request goes
(URLs, replicas), who pays (API keys) and how long it may take (timeouts) are left
out: moving a server changes no reply.

The store is one SQLite database in WAL mode (``<cache.dir>/replies.sqlite3``),
shared by every run and shard that names the folder: readers never wait on the
writer, writers take turns (``busy_timeout``), and a key already stored is kept
(``INSERT OR IGNORE``: the same request made by two runs at once has one reply).
A SIGKILL at any moment leaves the database whole (SQLite's own guarantee): a
batch is committed or not at all, and ``ReplyCache.put`` returns only once its
batch is committed, so a reply a run has handed to its task is in the store.

``ReplyCache`` keeps the database off the event loop: lookups and additions queue
up while one thread call is under way and go to the next in one batch.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import orjson
from anyio.streams.memory import MemoryObjectReceiveStream

from engine.problems import Problems

if TYPE_CHECKING:
    from engine.tasks.asking import Key

READ_WRITE, READ_ONLY = "read_write", "read_only"
MODES = (READ_WRITE, READ_ONLY)
STORE_NAME = "replies.sqlite3"
_BATCH = 512  # lookups or additions per thread call, at most
_BUSY_MS = 60_000  # how long a writer waits for another run's commit
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """The ``cache:`` section: ``dir`` None is off."""

    dir: Path | None = None
    mode: str = READ_WRITE  # read_write | read_only

    @property
    def on(self) -> bool:
        return self.dir is not None


def request_key(
    model: str,
    params: Mapping[str, Any],
    messages: Sequence[Mapping[str, Any]],
    generation: int | str = 0,
) -> str:
    """The cache key of one request: sha256 (hex) of ``model`` (the name sent),
    ``params`` (every request field besides messages: sampling parameters,
    ``response_format``, ``seed``), ``messages`` as sent and ``generation`` (which of
    several same requests of one row this is; 0 for the first). Pure."""
    body = orjson.dumps(
        {"model": model, "params": params, "messages": messages, "generation": generation},
        option=orjson.OPT_SORT_KEYS,
    )
    return hashlib.sha256(body).hexdigest()


def generation_of(key: Key) -> int | str:
    """Which of a row's same requests ``key`` asks for (``request_key``'s generation):
    a sample's slot, a try's number within its slot, a rating's number; a turn is told
    apart by its history, a task's own key by its name. Stable across runs."""
    # Here, not at the top: engine.tasks imports this module (through Context.ask).
    from engine.tasks.asking import Rating, Sample, Try, Turn

    if isinstance(key, Turn):
        return 0
    if isinstance(key, Try):
        return f"{key.slot}.{key.number}"
    if isinstance(key, Sample):
        return key.slot
    if isinstance(key, Rating):
        return key.number
    return key


class ReplyStore:
    """The SQLite database, used from one thread at a time (the cache's worker calls)."""

    def __init__(self, folder: Path, *, read_only: bool = False) -> None:
        self.path = folder / STORE_NAME
        self.read_only = read_only
        self._db: sqlite3.Connection | None = None
        if read_only:
            if self.path.exists():
                uri = f"{self.path.resolve().as_uri()}?mode=ro"
                self._db = self._connect(uri, uri=True)
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

    @staticmethod
    def _connect(target: str, *, uri: bool = False) -> sqlite3.Connection:
        db = sqlite3.connect(
            target, timeout=_BUSY_MS / 1000, isolation_level=None, check_same_thread=False, uri=uri
        )
        db.execute(f"PRAGMA busy_timeout={_BUSY_MS}")
        return db

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

    def count(self) -> int:
        if self._db is None:
            return 0
        return int(self._db.execute("SELECT count(*) FROM replies").fetchone()[0])

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


@dataclass(slots=True)
class _Waiter:
    key: str
    reply: dict[str, Any] | None = None
    done: anyio.Event = field(default_factory=anyio.Event)


class ReplyCache:
    """The store as a run's tasks use it: ``get`` and ``put``, batched off the loop."""

    def __init__(self, store: ReplyStore) -> None:
        self.store = store
        self.read_only = store.read_only
        self._gets_in, self._gets = anyio.create_memory_object_stream[_Waiter](_BATCH * 16)
        self._puts_in, self._puts = anyio.create_memory_object_stream[
            tuple[_Waiter, dict[str, Any]]
        ](_BATCH * 16)
        self._lock = anyio.Lock()  # one thread call on the store at a time

    async def get(self, key: str) -> dict[str, Any] | None:
        """The stored reply of ``key``, or None."""
        waiter = _Waiter(key)
        await self._gets_in.send(waiter)
        await waiter.done.wait()
        return waiter.reply

    async def put(self, key: str, reply: dict[str, Any]) -> None:
        """Add a reply; returns once it is committed (nothing in read-only mode)."""
        if self.read_only:
            return
        waiter = _Waiter(key)
        await self._puts_in.send((waiter, reply))
        await waiter.done.wait()

    async def run(self) -> None:
        """Serve lookups and additions until both streams are closed (``close``)."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._serve_gets)
            tg.start_soon(self._serve_puts)

    def close(self) -> None:
        self._gets_in.close()
        self._puts_in.close()

    async def _serve_gets(self) -> None:
        async for batch in _batches(self._gets):
            keys = list({w.key for w in batch})
            async with self._lock:
                found = await anyio.to_thread.run_sync(self.store.get_many, keys)
            for waiter in batch:
                waiter.reply = found.get(waiter.key)
                waiter.done.set()

    async def _serve_puts(self) -> None:
        async for batch in _batches(self._puts):
            items = [(w.key, reply) for w, reply in batch]
            async with self._lock:
                await anyio.to_thread.run_sync(self.store.put_many, items)
            for waiter, _ in batch:
                waiter.done.set()


async def _batches(stream: MemoryObjectReceiveStream[T]) -> AsyncIterator[list[T]]:
    """What has queued up on ``stream``, a batch at a time, until it is closed."""
    async for first in stream:
        batch = [first]
        while len(batch) < _BATCH:
            try:
                batch.append(stream.receive_nowait())
            except (anyio.WouldBlock, anyio.EndOfStream):
                break
        yield batch


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


def reply_value(
    text: str,
    finish_reason: str | None,
    prompt_tokens: int,
    completion_tokens: int,
    reasoning_tokens: int,
    trace: str | None,
    cached_tokens: int = 0,
) -> dict[str, Any]:
    """What the store keeps of a reply (its usage too: a hit shows what it saved)."""
    value: dict[str, Any] = {
        "c": text,
        "f": finish_reason,
        "p": prompt_tokens,
        "o": completion_tokens,
    }
    if reasoning_tokens:
        value["n"] = reasoning_tokens
    if trace is not None:
        value["r"] = trace
    if cached_tokens:
        value["ct"] = cached_tokens
    return value


def parse_cache(p: Problems, raw: Any, base: Path) -> CacheConfig:
    """The ``cache:`` section (a relative ``dir`` is the config file's folder's)."""
    body = p.mapping("cache", raw) if raw is not None else None
    if body is None:
        return CacheConfig()
    p.unknown("cache", body, ("dir", "mode"))
    mode = body.get("mode", READ_WRITE)
    if mode not in MODES:
        p.add("cache.mode", f"must be one of {', '.join(MODES)}, got {mode!r}")
        mode = READ_WRITE
    value = body.get("dir")
    if value is None:
        return CacheConfig(mode=mode)
    folder = p.string("cache.dir", value, required=False, fix="a folder, e.g. dir: ~/.turnstile")
    if folder is None:
        return CacheConfig(mode=mode)
    path = Path(folder).expanduser()
    return CacheConfig(path if path.is_absolute() else base / path, mode)
