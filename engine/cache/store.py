"""The reply store: replies kept across runs, keyed by ``engine.cache.keys``.

The store is one SQLite database in WAL mode (``<cache.dir>/replies.sqlite3``),
shared by every run and shard that names the folder: readers never wait on the
writer, writers take turns (``busy_timeout``), and a key already stored is kept
(``INSERT OR IGNORE``: the same request made by two runs at once has one reply).
A SIGKILL at any moment leaves the database whole (SQLite's own guarantee): a
batch is committed or not at all.

Its one table is written in the order replies come (rowids grow: a batch fills a
few new pages), found by a unique index on each key's first 8 bytes as an integer
(``slot``: small entries, the only random writes), the whole 32-byte key kept
beside the reply and compared on every lookup. Two keys sharing a slot (one chance
in 2^64 a pair) cost the later one its place: it is asked again, never answered
with the other's reply.

``ReplyCache`` keeps writes off the event loop: additions come encoded, queue and go
to the store's own thread in batches of up to ``_PUT_BYTES`` bytes (a reply counted
``_ROW_BYTES`` over its length: at most ``_PUT_ROWS`` replies), gathered for up to
``_PUT_LINGER_S``, not waited for (a run's replies are journaled first: the store only
saves other runs a request; a kill loses at most the batch being gathered); the run's
end commits every one still queued. A batch goes in a few INSERTs of a power of two
rows each (statements SQLite compiled once), their parameters made by C loops and
bound with the GIL held, the statements run with it released.
That thread runs at a lower CPU priority (``STORE_THREAD_NICE``, on Linux), as a
database's background writers do: where the CPU is the bound (a fast server on the
same machine), a commit waits for a core the loop and the server leave idle instead
of taking one from them. A commit's cost is mostly per page it touches, and a
batch's new keys land all over the index: big batches touch each index page once
for many keys (on a store of 10^5 replies, 8,192 to a commit cost a reply about 60%
of the CPU 2,048 did, 40% of 300's).

Lookups in a store small enough to sit in the page cache are answered on the loop,
all those of one loop pass in one query (a few microseconds: less than a thread
hop); in a bigger one they are batched through the thread too, so a cold disk never
stalls the loop.

While a run writes a store of up to ``KNOWN_SLOTS_MAX`` replies, the cache holds
every slot in it (read at open, then each request's it is about to send: ``claim``):
a lookup whose slot is not there is a miss without a query (no SQLite call on the
loop for a run that is not answered from the store). Another run's commit ends that
(SQLite's ``data_version``, read with every round and at least every second): from
then on every lookup queries, so a reply another run stores is found, at most about
a second late.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sqlite3
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from itertools import chain
from operator import itemgetter
from pathlib import Path
from typing import Any, TypeVar

import anyio
import orjson
from anyio.abc import TaskStatus

from engine.cache.settings import READ_ONLY, CacheConfig
from engine.errors import ConfigError

T = TypeVar("T")

STORE_NAME = "replies.sqlite3"
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS reply (slot INTEGER NOT NULL, key BLOB NOT NULL,"
    " reply BLOB NOT NULL)",
    "CREATE UNIQUE INDEX IF NOT EXISTS reply_slot ON reply (slot)",
)
_OLD_TABLE = "replies"  # the first layout: hex text keys, one WITHOUT ROWID table
_GETS = 512  # lookups per query, at most
# A commit's worth of additions: their encoded bytes (replies with long traces), each
# counted ``_ROW_BYTES`` more than its length, so at most ``_PUT_ROWS`` replies (a
# commit's cost is mostly per page: the more to a commit, the less a reply costs).
_PUT_BYTES = 8 << 20
_ROW_BYTES = 1024
_PUT_ROWS = _PUT_BYTES // _ROW_BYTES  # 8,192
_INSERT_ROWS = 1024  # rows an INSERT binds at most (a power of two): 3,072 parameters
_PAGE_BYTES = 16384  # a new store's page size
_BACKLOG = 4  # commits' worth queued past which the next addition waits for a round
_BUSY_MS = 60_000  # how long a writer waits for another run's commit
_READER_BUSY_MS = 100  # a lookup on the loop that finds the file busy goes to the thread
# A store up to this size at open is read on the event loop (a lookup of a key in a
# file the page cache holds: a few microseconds, less than a thread hop); a bigger one
# through the store's thread, batched, so a cold disk never stalls the loop.
INLINE_READS_MAX_BYTES = 256 << 20
_PUT_LINGER_S = 0.25  # additions alone wait this long for more to commit with them
# A store of up to this many replies has its slots in memory while a run writes it: a
# lookup of a slot it lacks is a miss at once, no query (a fresh store's every lookup).
KNOWN_SLOTS_MAX = 1 << 20
_OTHERS_CHECK_S = 1.0  # how often an idle cache asks whether another run has written
# The store's thread runs at this niceness (Linux): its commits, which nobody waits
# for, take the CPU the event loop and a server on the same machine leave idle.
STORE_THREAD_NICE = 10


_SLOT = struct.Struct(">q")
_unpack = _SLOT.unpack_from
_KEY_BYTES = 32  # a key: a sha256 digest
_KEY_SLOT = struct.Struct(f">q{_KEY_BYTES - _SLOT.size}x")  # a key's slot, in keys joined


def slot_of(key: bytes) -> int:
    """A key's slot in the store's index: its first 8 bytes as a signed integer."""
    slot: int = _unpack(key)[0]
    return slot


class ReplyStore:
    """The SQLite database: its main connection used from one thread at a time (the
    cache's worker calls), and a second one for lookups on the event loop."""

    def __init__(self, folder: Path, *, read_only: bool = False) -> None:
        self.path = folder / STORE_NAME
        self.read_only = read_only
        self._db: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._version = 0  # SQLite's data_version when ``slots`` read the store
        self._rows_per_insert = _INSERT_ROWS  # rows one INSERT binds at most: a power of 2
        if read_only:
            if self.path.exists():
                uri = f"{self.path.resolve().as_uri()}?mode=ro"
                db = self._connect(uri, uri=True)
                if _has_table(db, "reply"):  # else a store never written by this version
                    self._db = db
                    self._reader = self._connect(uri, uri=True, busy_ms=_READER_BUSY_MS)
                else:
                    db.close()
            self.small = self._size() <= INLINE_READS_MAX_BYTES
            return
        folder.mkdir(parents=True, exist_ok=True)
        db = self._connect(str(self.path))
        try:
            _prepare(db)
        except BaseException:
            db.close()
            raise
        self._db = db
        # Parameters a statement may bind: 32,766 by default since SQLite 3.32, 999 before.
        rows = min(_INSERT_ROWS, db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // 3)
        self._rows_per_insert = 1 << (rows.bit_length() - 1)
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

    def lookup(self, keys: Sequence[bytes]) -> dict[bytes, dict[str, Any]]:
        """``get_many`` through the reader connection (a WAL reader never waits for the
        writer), for the event loop; raises sqlite3.OperationalError when the file is
        busy."""
        return _select(self._reader, keys)

    def get_many(self, keys: Sequence[bytes]) -> dict[bytes, dict[str, Any]]:
        """The stored replies of ``keys`` (those it holds)."""
        return _select(self._db, keys)

    def insert(self, replies: Mapping[bytes, bytearray]) -> None:
        """Add replies (key -> ``engine.cache.keys.stored_reply``) in one transaction; a
        key already there keeps its reply.

        Rows go in statements of a power of two rows each, up to ``_INSERT_ROWS``
        (2,250 rows: 1,024 + 1,024 + 128 + 64 + 8 + 2), so every statement is one of a
        dozen that SQLite compiled once (compiling one costs more than running it).
        Each binds its rows with the GIL held, then runs with it released."""
        if self._db is None or self.read_only or not replies:
            return
        values = _row_values(replies)
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            at = 0
            while left := (len(values) - at) // 3:
                rows = min(self._rows_per_insert, 1 << (left.bit_length() - 1))
                db.execute(_insert_sql(rows), values[at : at + 3 * rows])
                at += 3 * rows
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def exchange(
        self, replies: Mapping[bytes, bytearray], keys: Sequence[bytes]
    ) -> tuple[dict[bytes, dict[str, Any]], bool]:
        """Add ``replies``, then look ``keys`` up, and say whether another run has
        written meanwhile (one thread call of the cache's server)."""
        self.insert(replies)
        return self.get_many(keys), self.others_wrote()

    def slots(self, limit: int) -> set[int] | None:
        """Every slot the store holds, or None past ``limit`` of them (kept in memory
        only while small). Notes the store's version first: ``others_wrote`` then says
        whether another run has committed since."""
        if self._db is None:
            return set()
        self._version = self._data_version()
        found: set[int] = set()
        rows = self._db.execute("SELECT slot FROM reply")
        while part := rows.fetchmany(8192):
            found.update(slot for (slot,) in part)
            if len(found) > limit:
                return None
        return found

    def others_wrote(self) -> bool:
        """Whether another connection (another run) committed since ``slots`` (this
        one's own commits leave SQLite's data_version as it is)."""
        return self._db is not None and self._data_version() != self._version

    def _data_version(self) -> int:
        assert self._db is not None
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def holds_replies(self) -> bool:
        """Whether the store holds any reply (one row read)."""
        if self._db is None:
            return False
        return self._db.execute("SELECT 1 FROM reply LIMIT 1").fetchone() is not None

    def count(self) -> int:
        if self._db is None:
            return 0
        return int(self._db.execute("SELECT count(*) FROM reply").fetchone()[0])

    def close(self) -> None:
        for db in (self._db, self._reader):
            if db is not None:
                db.close()
        self._db = self._reader = None


def _row_values(replies: Mapping[bytes, bytearray]) -> list[Any]:
    """The INSERTs' parameters, row after row: each key's slot, the key, its reply.
    Made by C loops, no bytecode a row (while this thread holds the GIL, the event
    loop waits)."""
    keys = list(replies)
    joined = b"".join(keys)
    if len(joined) != _KEY_BYTES * len(keys):
        raise ValueError(f"a reply store key is {_KEY_BYTES} bytes (a sha256 digest)")
    slots = map(itemgetter(0), _KEY_SLOT.iter_unpack(joined))
    # bytearrays, not bytes (the replies come as bytearrays): sqlite3 binds a bytearray
    # as it is, where a bytes object first goes through its adapter lookup (two failed
    # attribute lookups, one of them an exception raised and cleared, with the GIL held).
    rows = zip(slots, map(bytearray, keys), replies.values(), strict=True)
    return list(chain.from_iterable(rows))


@functools.cache
def _insert_sql(rows: int) -> str:
    """The INSERT of ``rows`` replies (its text made once: SQLite's statement cache
    finds it by its text)."""
    return "INSERT OR IGNORE INTO reply (slot, key, reply) VALUES " + ",".join(["(?,?,?)"] * rows)


def _select(db: sqlite3.Connection | None, keys: Sequence[bytes]) -> dict[bytes, dict[str, Any]]:
    """The replies ``db`` holds for ``keys``: one query per ``_GETS`` keys, each row's
    whole key compared (a slot names a key's first 8 bytes only)."""
    if db is None or not keys:
        return {}
    found: dict[bytes, dict[str, Any]] = {}
    wanted = set(keys)
    for at in range(0, len(keys), _GETS):
        part = keys[at : at + _GETS]
        marks = ",".join("?" * len(part))
        rows = db.execute(
            f"SELECT key, reply FROM reply WHERE slot IN ({marks})", [slot_of(k) for k in part]
        ).fetchall()
        for key, reply in rows:
            if key in wanted:
                found[key] = orjson.loads(reply)
    return found


def _prepare(db: sqlite3.Connection) -> None:
    """Make the file a store of this layout, or find it one: several runs may do so at
    once, each waiting its turn."""
    # A new store's pages are 16 KiB (SQLite's default is 4): a commit's rows and
    # index entries fall on fewer pages (about 10% less CPU a reply). An existing
    # store keeps its own (the setting only takes before the first table).
    db.execute(f"PRAGMA page_size={_PAGE_BYTES}")
    # Every run of the store sets WAL; the first one's setting is kept in the file.
    _when_free(lambda: db.execute("PRAGMA journal_mode=WAL"))
    db.execute("PRAGMA synchronous=NORMAL")  # WAL: a SIGKILL loses no commit
    db.execute("PRAGMA cache_size=-65536")  # 64 MiB: a batch's index pages stay cached
    # One write transaction taken before anything is read: its wait is busy_timeout's.
    db.execute("BEGIN IMMEDIATE")
    try:
        for statement in _SCHEMA:
            db.execute(statement)
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    _upgrade(db)


def _when_free(call: Callable[[], T]) -> T:
    """``call()``, again while SQLite answers at once that the database is busy, for up
    to ``_BUSY_MS``. SQLite answers so without waiting out busy_timeout where waiting
    could deadlock, as when runs that open a new store at once each switch it to WAL
    (each holds a read lock and asks for the write lock): one goes on, the others
    try again after it."""
    deadline = time.monotonic() + _BUSY_MS / 1000
    pause = 0.001
    while True:
        try:
            return call()
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(pause)  # (a thread of the store's: never the event loop)
        pause = min(2 * pause, 0.1)


def _is_busy(exc: sqlite3.Error) -> bool:
    """Whether SQLite failed because another connection holds the lock it needed."""
    return getattr(exc, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_BUSY


def _has_table(db: sqlite3.Connection, name: str) -> bool:
    found = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,))
    return found.fetchone() is not None


def _digest(hex_key: object) -> bytes | None:
    """A first-layout key as this one keeps it (None: not a key this engine wrote)."""
    if not isinstance(hex_key, str) or len(hex_key) != 64:
        return None
    try:
        return bytes.fromhex(hex_key)
    except ValueError:
        return None


def _upgrade(db: sqlite3.Connection) -> None:
    """Move a store of the first layout (hex text keys) into this one, once, in one
    transaction (a second run opening it meanwhile waits, then finds it moved)."""
    if not _has_table(db, _OLD_TABLE):
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        if _has_table(db, _OLD_TABLE):
            old = db.execute(f"SELECT key, reply FROM {_OLD_TABLE}")
            while rows := old.fetchmany(4096):
                moved = [(_digest(hex_key), reply) for hex_key, reply in rows]
                db.executemany(
                    "INSERT OR IGNORE INTO reply (slot, key, reply) VALUES (?, ?, ?)",
                    [(slot_of(key), key, reply) for key, reply in moved if key is not None],
                )
            db.execute(f"DROP TABLE {_OLD_TABLE}")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


class ReplyCache:
    """The store as a run's tasks use it: ``claim`` (or ``missing``), ``get`` and ``add``,
    off the loop where it counts.

    Additions are not waited for (their replies are journaled already: the store only
    saves other runs a request). They come encoded (the store's thread then holds the
    GIL only to bind them) and queue in a dict, key to reply, that lookups see at once
    (``_own``). A dict that holds a commit's worth is sealed and the next addition
    starts another; each goes to the store in one thread call, a round: a sealed one
    at once, the one filling ``_PUT_LINGER_S`` after its first addition, or with the
    lookups that wait for the thread. An addition waits only while more than
    ``_BACKLOG`` sealed ones wait.
    After ``close`` the server commits everything queued before ``run`` ends.
    A small store (``ReplyStore.small``) answers the lookups of one loop pass on the
    loop itself, in one query; a big one's go to the thread, with the additions due.
    """

    def __init__(self, store: ReplyStore) -> None:
        self.store = store
        self.read_only = store.read_only
        self._inline = store.small
        self._loop = asyncio.get_running_loop()
        self._looking: list[tuple[bytes, asyncio.Future[dict[str, Any] | None]]] = []
        self._gets: list[tuple[bytes, asyncio.Future[dict[str, Any] | None]]] = []
        self._filling: dict[bytes, bytearray] = {}  # additions since the last seal: key -> JSON
        self._filling_left = _PUT_BYTES  # what they may still take of a commit's worth
        self._sealed: deque[dict[bytes, bytearray]] = deque()  # a commit's worth each, in order
        self._committing: dict[bytes, bytearray] = {}  # in the store's thread now
        self._due = 0.0  # when the oldest addition filling is to be committed
        # Every slot the store holds while only this run writes it; None: ask the store.
        self._known: set[int] | None = None
        self._room: list[asyncio.Future[None]] = []  # additions waiting on the backlog
        self._wake = asyncio.Event()  # a lookup waits, a commit is sealed, or the cache closed
        self._queued = asyncio.Event()  # something is queued
        self._closed = False
        self._adds_off = self.read_only  # read-only, or closed: one test an addition
        # The store's own thread (started with the first call): its priority is lowered
        # for good, so it is not one of anyio's shared worker threads.
        self._thread = ThreadPoolExecutor(
            1, thread_name_prefix="turnstile-cache", initializer=_lower_priority
        )

    def missing(self, key: bytes) -> bool:
        """Whether ``key`` is surely not stored, known without a query (its slot is not
        among those the store holds, nor claimed): ``get`` would answer None. A fresh
        store's every lookup, without a coroutine."""
        known = self._known
        return known is not None and _unpack(key)[0] not in known

    def claim(self, key: bytes) -> bool:
        """``missing``, for a request about to be sent (``ask``): its slot is known from
        now on, as the reply the caller then adds will be, so the same request asked
        later in this run is looked up (one step: the slot is read and the set probed
        once a request, not again with the addition)."""
        known = self._known
        if known is None:
            return False
        size = len(known)
        known.add(_unpack(key)[0])
        return len(known) != size

    async def get(self, key: bytes) -> dict[str, Any] | None:
        """The stored reply of ``key``, or None."""
        if self._closed:
            raise self._closed_error()
        own = self._own(key)
        if own is not None:
            stored: dict[str, Any] = orjson.loads(own)
            return stored
        if self.missing(key):
            return None  # not in the store: no query
        future: asyncio.Future[dict[str, Any] | None] = self._loop.create_future()
        if self._inline:
            if not self._looking:
                self._loop.call_soon(self._look_up)
            self._looking.append((key, future))
        else:
            self._ask_thread([(key, future)])
        return await future

    def _queues(self) -> tuple[dict[bytes, bytearray], ...]:
        """The additions not yet committed, oldest first: in the thread, sealed, filling."""
        return (self._committing, *self._sealed, self._filling)

    def _own(self, key: bytes) -> bytearray | None:
        """This run's addition of ``key`` not yet committed (the first one), or None."""
        for queued in self._queues():
            reply = queued.get(key)
            if reply is not None:
                return reply
        return None

    def _look_up(self) -> None:
        """Answer the lookups of the last loop pass with one query on the loop."""
        looking, self._looking = self._looking, []
        try:
            found = self.store.lookup([key for key, _ in looking])
        except sqlite3.OperationalError:
            self._ask_thread(looking)  # the file is busy (another run's commit)
            return
        except Exception as exc:
            for _, future in looking:
                if not future.done():
                    future.set_exception(exc)
            return
        for key, future in looking:
            if not future.done():  # its asker may have been cancelled meanwhile
                future.set_result(found.get(key))

    def _ask_thread(self, gets: list[tuple[bytes, asyncio.Future[dict[str, Any] | None]]]) -> None:
        self._gets += gets
        self._queued.set()
        self._wake.set()

    def add(self, key: bytes, reply: bytearray) -> asyncio.Future[None] | None:
        """Add the reply (``engine.cache.keys.stored_reply``) of a request ``claim``ed
        (nothing in read-only mode), committed by a later round: queued at once, without
        a coroutine; returned is a future for the caller to wait on when ``_BACKLOG``
        commits' worth are queued already (else None)."""
        if self._adds_off:
            if self._closed:
                raise self._closed_error()
            return None
        filling = self._filling
        if not filling:  # the first one since a seal: the server may be waiting for it
            self._due = self._loop.time() + _PUT_LINGER_S
            self._queued.set()
        filling.setdefault(key, reply)
        self._filling_left -= len(reply) + _ROW_BYTES
        if self._filling_left > 0:
            return None  # less than a commit's worth: the linger's end commits them
        self._seal()
        if len(self._sealed) <= _BACKLOG:
            return None
        room: asyncio.Future[None] = self._loop.create_future()
        self._room.append(room)
        return room

    def _seal(self) -> None:
        """The additions filling, a commit of their own: queued for the next round."""
        self._sealed.append(self._filling)
        self._filling, self._filling_left = {}, _PUT_BYTES
        self._wake.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve lookups and additions until ``close``, then commit what is queued
        (started, for ``TaskGroup.start``, once it knows the store's slots)."""
        try:
            await self._serve(task_status)
        finally:
            self._thread.shutdown(wait=False)  # no call is running: each one is waited for

    async def _serve(self, task_status: TaskStatus[None]) -> None:
        if not self.read_only and self._inline:
            await self._learn_slots()
        task_status.started()
        while True:
            if not self._gets and not self._sealed and not self._filling:
                if self._closed:
                    return
                self._queued.clear()
                if self._known is None:
                    await self._queued.wait()
                    continue
                with anyio.move_on_after(_OTHERS_CHECK_S) as idle:
                    await self._queued.wait()
                if idle.cancelled_caught:
                    await self._round([], {})  # has another run written meanwhile?
                continue
            if not self._gets and not self._sealed and not self._closed:
                self._wake.clear()
                with anyio.move_on_after(self._due - self._loop.time()):
                    await self._wake.wait()  # more additions to commit with these
            gets, self._gets = self._gets[:_GETS], self._gets[_GETS:]
            if not self._sealed and self._filling:
                if self._closed or self._loop.time() >= self._due:
                    self._seal()
            await self._round(gets, self._sealed.popleft() if self._sealed else {})

    async def _learn_slots(self) -> None:
        """Hold the store's slots (those added meanwhile too) when it is small enough."""
        known = await self._in_thread(self.store.slots, KNOWN_SLOTS_MAX)
        if known is not None:
            for queued in self._queues():
                known.update(slot_of(key) for key in queued)
        self._known = known

    async def _round(
        self,
        gets: list[tuple[bytes, asyncio.Future[dict[str, Any] | None]]],
        puts: dict[bytes, bytearray],
    ) -> None:
        """One thread call: commit ``puts``, answer ``gets``, notice other writers."""
        self._committing = puts  # seen by lookups until it is committed
        try:
            found, others = await self._in_thread(
                self.store.exchange, puts, [key for key, _ in gets]
            )
        except Exception as exc:
            for _, future in gets:
                if not future.done():
                    future.set_exception(exc)
            raise
        finally:
            self._committing = {}
        if others:
            self._known = None  # another run writes this store: ask it every time
        for key, future in gets:
            if not future.done():  # its asker may have been cancelled meanwhile
                future.set_result(found.get(key))
        if self._room and len(self._sealed) <= _BACKLOG:
            room, self._room = self._room, []
            for waiting in room:
                if not waiting.done():
                    waiting.set_result(None)

    async def _in_thread(self, call: Callable[..., T], *args: Any) -> T:
        """``call(*args)`` in the store's thread. Waited for even when cancelled (a
        commit is never left running while the store closes), as anyio's are."""
        with anyio.CancelScope(shield=True):
            result = await self._loop.run_in_executor(self._thread, call, *args)
        return result

    def close(self) -> None:
        """No more lookups or additions: ``run`` commits what is queued, then returns."""
        self._closed = self._adds_off = True
        self._queued.set()
        self._wake.set()

    @staticmethod
    def _closed_error() -> RuntimeError:
        return RuntimeError("the reply cache is closed")


def _lower_priority() -> None:
    """The store thread's first step: ``STORE_THREAD_NICE`` for it alone, on Linux
    (where a thread has a priority of its own; a thread cannot raise it back, so the
    thread is the store's only). Elsewhere, or where the system refuses, it stays."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), STORE_THREAD_NICE)


@asynccontextmanager
async def open_cache(config: CacheConfig) -> AsyncIterator[ReplyCache | None]:
    """The run's cache while the block runs (None when ``cache.dir`` is not set)."""
    if config.dir is None:
        yield None
        return
    folder = Path(config.dir)
    try:
        store = await anyio.to_thread.run_sync(
            lambda: ReplyStore(folder, read_only=config.mode == READ_ONLY)
        )
    except sqlite3.DatabaseError as exc:
        if _is_busy(exc):  # another run held it for all of busy_timeout
            problem = (
                f"cache.dir: {folder / STORE_NAME} stayed locked by another run for"
                f" {_BUSY_MS // 1000} s; run again once it is done with the store, or name"
                " another folder in cache.dir"
            )
        else:  # another file where the store should be
            problem = (
                f"cache.dir: {folder / STORE_NAME} is not a reply store this engine can"
                f" open ({exc}); name another folder in cache.dir, or move that file away"
            )
        raise ConfigError([problem]) from exc
    cache = ReplyCache(store)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(cache.run)
            try:
                yield cache
            finally:
                cache.close()  # the loops finish what was queued, then end
    finally:
        await anyio.to_thread.run_sync(store.close)
