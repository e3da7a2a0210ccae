"""The reply cache's key (pure) and its SQLite store: shared, read-only, batched."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import sqlite3
import sys
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest

from engine.cache.keys import request_key, stored_reply
from engine.cache.settings import CacheConfig
from engine.cache.store import (
    _PUT_BYTES,
    _PUT_ROWS,
    STORE_THREAD_NICE,
    ReplyCache,
    ReplyStore,
    _when_free,
    open_cache,
    slot_of,
)
from engine.errors import ConfigError
from engine.tasks.asking import Rating, Sample, Try, Turn, generation_of

MESSAGES = [{"role": "user", "content": "hello"}]
ADDED = _PUT_ROWS + 300  # more additions than one commit takes


async def put(cache: ReplyCache, key: bytes, reply: bytearray) -> None:
    """An addition, waited for while the store's backlog is full (as Context.ask does)."""
    room = cache.add(key, reply)
    if room is not None:
        await room


def k(name: object) -> bytes:
    """A store key (a sha256 digest, as request_key makes) named for a test."""
    return hashlib.sha256(str(name).encode()).digest()


def test_the_key_changes_with_what_defines_a_reply() -> None:
    base = request_key("gpt", {"temperature": 0.0}, MESSAGES)
    assert isinstance(base, bytes) and len(base) == 32
    assert request_key("gpt", {"temperature": 0.0}, MESSAGES) == base
    others = {
        request_key("gpt-2", {"temperature": 0.0}, MESSAGES),
        request_key("gpt", {"temperature": 0.5}, MESSAGES),
        request_key("gpt", {"temperature": 0.0, "seed": 1}, MESSAGES),
        request_key(
            "gpt", {"temperature": 0.0, "response_format": {"type": "json_object"}}, MESSAGES
        ),
        request_key("gpt", {"temperature": 0.0}, [{"role": "user", "content": "hello!"}]),
        request_key("gpt", {"temperature": 0.0}, [*MESSAGES, *MESSAGES]),
        request_key("gpt", {"temperature": 0.0}, MESSAGES, 1),
    }
    assert base not in others and len(others) == 7


def test_the_key_ignores_where_the_request_goes_and_key_order() -> None:
    # URLs, replicas, API keys and timeouts are not arguments: nothing of them can count.
    a = request_key("m", {"temperature": 0.0, "max_tokens": 10}, MESSAGES)
    b = request_key("m", {"max_tokens": 10, "temperature": 0.0}, MESSAGES)
    assert a == b


def test_generations_tell_a_rows_same_requests_apart() -> None:
    assert generation_of(Turn(0)) == generation_of(Turn(3)) == 0  # the history differs
    assert generation_of(Sample(0)) != generation_of(Sample(1))
    assert generation_of(Try(0, 0)) != generation_of(Try(0, 1)) != generation_of(Try(1, 0))
    assert generation_of(Rating(0)) != generation_of(Rating(1))
    assert generation_of("a") != generation_of("b")


def test_two_stores_on_one_folder_write_at_once(tmp_path: Path) -> None:
    stores = [ReplyStore(tmp_path) for _ in range(2)]

    def fill(store: ReplyStore, which: int) -> None:
        for batch in range(20):
            store.insert(
                {
                    k(f"{which}-{batch}-{i}"): stored_reply(f"r{i}", "stop", 1, 2, 0, None)
                    for i in range(50)
                }
            )
            store.insert({k("shared"): stored_reply(f"from {which}", "stop", 1, 1, 0, None)})

    threads = [threading.Thread(target=fill, args=(s, n)) for n, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stores[0].count() == 2 * 20 * 50 + 1
    assert stores[1].get_many([k("0-3-7")])[k("0-3-7")]["c"] == "r7"
    assert (tmp_path / "replies.sqlite3-wal").exists() or stores[0].count()
    for s in stores:
        s.close()


OPENERS = 8  # runs opening one new store at once


def open_when_all_are_ready(folder: Path, ready: Any) -> None:
    ready.wait()
    ReplyStore(folder).close()  # an error fails the process


@pytest.mark.skipif(sys.platform != "linux", reason="forked processes")
def test_runs_that_make_one_new_store_at_once_all_open_it(tmp_path: Path) -> None:
    # Each switches the new file to WAL, which SQLite refuses at once (busy_timeout or
    # not: waiting could deadlock) to all but one; they try again. Before they did, about
    # one round in twenty had a run fail ("database is locked").
    fork = multiprocessing.get_context("fork")
    for round_ in range(40):
        folder = tmp_path / str(round_)
        ready = fork.Barrier(OPENERS)
        runs = [
            fork.Process(target=open_when_all_are_ready, args=(folder, ready))
            for _ in range(OPENERS)
        ]
        for run in runs:
            run.start()
        for run in runs:
            run.join()
        assert [run.exitcode for run in runs] == [0] * OPENERS, f"round {round_}"
        store = ReplyStore(folder)
        assert store.count() == 0  # one store, whole
        store.close()


def test_only_a_busy_database_is_tried_again() -> None:
    answers: list[object] = [busy_error(), busy_error(), "done"]

    def call() -> object:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert _when_free(call) == "done"  # after two refusals
    calls = []

    def broken() -> object:
        calls.append(1)
        raise sqlite3.OperationalError("no such table: reply")

    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        _when_free(broken)
    assert len(calls) == 1  # another error is raised at once


def busy_error() -> sqlite3.OperationalError:
    """The error SQLite's refusal of a lock raises (sqlite3 sets its code)."""
    error = sqlite3.OperationalError("database is locked")
    error.sqlite_errorcode = sqlite3.SQLITE_BUSY  # type: ignore[attr-defined]
    return error


def test_a_read_only_store_reads_and_never_writes(tmp_path: Path) -> None:
    assert ReplyStore(tmp_path / "none", read_only=True).get_many([k("x")]) == {}
    assert not (tmp_path / "none").exists()
    writer = ReplyStore(tmp_path)
    writer.insert({k("x"): stored_reply("kept", "stop", 1, 1, 0, None)})
    reader = ReplyStore(tmp_path, read_only=True)
    reader.insert({k("y"): stored_reply("not kept", "stop", 1, 1, 0, None)})
    assert reader.get_many([k("x"), k("y")]) == {k("x"): {"c": "kept", "f": "stop", "p": 1, "o": 1}}
    assert writer.count() == 1
    reader.close()
    writer.close()


async def test_the_cache_batches_lookups_and_additions(tmp_path: Path) -> None:
    async with open_cache(CacheConfig(tmp_path)) as cache:
        assert cache is not None
        async with anyio.create_task_group() as tg:
            for i in range(300):
                tg.start_soon(put, cache, k(i), stored_reply(f"r{i}", "stop", 1, 1, 0, None))
        found: dict[int, object] = {}

        async def get(i: int) -> None:
            assert cache is not None
            found[i] = await cache.get(k(i))

        async with anyio.create_task_group() as tg:
            for i in range(310):
                tg.start_soon(get, i)
    assert sum(v is not None for v in found.values()) == 300
    async with open_cache(CacheConfig(tmp_path, "read_only")) as cache:
        assert cache is not None
        await put(cache, k("new"), stored_reply("x", "stop", 1, 1, 0, None))
        assert await cache.get(k("new")) is None
        assert await cache.get(k(5)) == {"c": "r5", "f": "stop", "p": 1, "o": 1}
    async with open_cache(CacheConfig()) as off:
        assert off is None


@pytest.mark.parametrize("small", [True, False], ids=["lookups-on-the-loop", "lookups-in-a-thread"])
async def test_additions_are_seen_at_once_and_all_committed_at_close(
    tmp_path: Path, small: bool
) -> None:
    store = ReplyStore(tmp_path)
    store.small = small  # a big store's lookups go through the worker thread, batched
    cache = ReplyCache(store)
    async with anyio.create_task_group() as tg:
        tg.start_soon(cache.run)
        for i in range(ADDED):  # past a batch: one round commits while others queue
            await put(cache, k(i), stored_reply(f"r{i}", "stop", 1, 1, 0, None))
        # Seen before their commit; an unknown key is None.
        last = ADDED - 1
        assert await cache.get(k(last)) == {"c": f"r{last}", "f": "stop", "p": 1, "o": 1}
        assert await cache.get(k("nope")) is None
        cache.close()
    assert store.count() == ADDED
    with pytest.raises(RuntimeError, match="closed"):
        await cache.get(k(1))
    # Committed: a later run's cache finds them in the store.
    again = ReplyCache(store)
    async with anyio.create_task_group() as tg:
        tg.start_soon(again.run)
        assert await again.get(k(3)) == {"c": "r3", "f": "stop", "p": 1, "o": 1}
        assert await again.get(k("nope")) is None
        again.close()
    store.close()


async def test_long_replies_are_committed_a_bounded_number_of_bytes_at_a_time(
    tmp_path: Path,
) -> None:
    store = ReplyStore(tmp_path)
    commits: list[str] = []
    assert store._db is not None
    store._db.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    cache = ReplyCache(store)
    trace = "t" * (_PUT_BYTES // 8)  # eight of these fill a commit
    async with anyio.create_task_group() as tg:
        tg.start_soon(cache.run)
        for i in range(40):  # past the backlog: additions wait for rounds, none is lost
            await put(cache, k(i), stored_reply(f"r{i}", "stop", 1, 1, 0, trace))
        cache.close()
    assert store.count() == 40
    assert len(commits) >= 40 // 8  # never one commit of all of them
    assert store.get_many([k(39)])[k(39)]["r"] == trace
    store.close()


def test_a_commit_is_a_few_inserts_each_of_a_power_of_two_rows(tmp_path: Path) -> None:
    store = ReplyStore(tmp_path)
    assert store._db is not None
    assert store._db.execute("PRAGMA page_size").fetchone()[0] == 16384  # a new store's
    statements: list[str] = []
    assert store._db is not None
    store._db.set_trace_callback(statements.append)
    store.insert({k(i): stored_reply(f"r{i}", "stop", 1, 1, 0, None) for i in range(2250)})
    inserts = [sql.count("),(") + 1 for sql in statements if sql.startswith("INSERT")]
    assert inserts == [1024, 1024, 128, 64, 8, 2]  # statements SQLite compiled once
    assert statements[0] == "BEGIN IMMEDIATE" and statements[-1] == "COMMIT"  # one commit
    store._rows_per_insert = 256  # as under SQLite's old limit of 999 parameters
    statements.clear()
    store.insert({k(f"b{i}"): stored_reply(f"b{i}", "stop", 1, 1, 0, None) for i in range(600)})
    inserts = [sql.count("),(") + 1 for sql in statements if sql.startswith("INSERT")]
    assert inserts == [256, 256, 64, 16, 8]
    assert store.count() == 2250 + 600
    assert store._db is not None
    rows = store._db.execute("SELECT slot, key FROM reply").fetchall()
    assert all(slot == slot_of(key) for slot, key in rows)  # each row's own key's slot
    with pytest.raises(ValueError, match="32 bytes"):  # never a row under another's slot
        store.insert({k("c"): stored_reply("c", "stop", 1, 1, 0, None), b"short": bytearray()})
    assert store.count() == 2250 + 600
    assert store.get_many([k(2249), k("b599")]) == {
        k(2249): {"c": "r2249", "f": "stop", "p": 1, "o": 1},
        k("b599"): {"c": "b599", "f": "stop", "p": 1, "o": 1},
    }
    store.close()


@pytest.mark.skipif(sys.platform != "linux", reason="a thread's own priority is Linux's")
async def test_the_store_commits_from_a_thread_of_lower_priority(tmp_path: Path) -> None:
    store = ReplyStore(tmp_path)
    cache = ReplyCache(store)
    niceness: list[int] = []

    def note() -> None:
        niceness.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    async with anyio.create_task_group() as tg:
        tg.start_soon(cache.run)
        await cache._in_thread(note)
        await put(cache, k(1), stored_reply("r1", "stop", 1, 1, 0, None))
        cache.close()
    assert niceness == [min(19, os.getpriority(os.PRIO_PROCESS, 0) + STORE_THREAD_NICE)]
    assert store.count() == 1
    store.close()


async def test_the_lookups_of_one_loop_pass_are_one_query(tmp_path: Path) -> None:
    store = ReplyStore(tmp_path)
    store.insert({k(i): stored_reply(f"r{i}", "stop", 1, 1, 0, None) for i in range(0, 64, 2)})
    queries: list[str] = []
    assert store._reader is not None
    store._reader.set_trace_callback(queries.append)
    cache = ReplyCache(store)
    found: dict[int, object] = {}

    async def get(i: int) -> None:
        found[i] = await cache.get(k(i))

    async with anyio.create_task_group() as tg:
        tg.start_soon(cache.run)
        async with anyio.create_task_group() as askers:
            for i in range(64):
                askers.start_soon(get, i)
        cache.close()
    assert len([q for q in queries if q.startswith("SELECT")]) == 1
    assert {i for i, reply in found.items() if reply is not None} == set(range(0, 64, 2))
    store.close()


def test_two_keys_sharing_a_slot_never_answer_for_each_other(tmp_path: Path) -> None:
    first, second = k("a"), k("a")[:8] + k("b")[8:]  # the same first 8 bytes: one slot
    store = ReplyStore(tmp_path)
    store.insert({first: stored_reply("first", "stop", 1, 1, 0, None)})
    store.insert({second: stored_reply("second", "stop", 1, 1, 0, None)})
    assert store.get_many([first, second]) == {first: {"c": "first", "f": "stop", "p": 1, "o": 1}}
    assert store.lookup([second]) == {}
    store.close()


def test_a_store_of_the_first_layout_is_moved_once_and_read(tmp_path: Path) -> None:
    import sqlite3

    import orjson

    old = sqlite3.connect(tmp_path / "replies.sqlite3")
    old.execute("CREATE TABLE replies (key TEXT PRIMARY KEY, reply BLOB NOT NULL) WITHOUT ROWID")
    kept = {"c": "kept", "f": "stop", "p": 1, "o": 2}
    old.execute("INSERT INTO replies VALUES (?, ?)", (k("x").hex(), orjson.dumps(kept)))
    old.execute("INSERT INTO replies VALUES (?, ?)", ("not a key", orjson.dumps(kept)))
    old.commit()
    old.close()
    # Read-only cannot move it: nothing is found, nothing fails.
    assert ReplyStore(tmp_path, read_only=True).get_many([k("x")]) == {}
    store = ReplyStore(tmp_path)
    assert store.get_many([k("x")]) == {k("x"): kept}
    assert store.count() == 1
    store.close()
    assert ReplyStore(tmp_path, read_only=True).get_many([k("x")]) == {k("x"): kept}


async def test_a_run_alone_on_its_store_queries_nothing_for_a_miss_and_sees_another_runs_adds(
    tmp_path: Path,
) -> None:
    store = ReplyStore(tmp_path)
    store.insert({k(1): stored_reply("r1", "stop", 1, 1, 0, None)})
    queries: list[str] = []
    assert store._reader is not None
    store._reader.set_trace_callback(queries.append)
    cache = ReplyCache(store)
    other = ReplyStore(tmp_path)  # another run on the same folder
    async with anyio.create_task_group() as tg:
        await tg.start(cache.run)  # it knows the store's slots now
        assert cache.missing(k(2)) and not cache.missing(k(1))
        assert await cache.get(k(2)) is None
        assert cache.missing(k(3)) and cache.claim(k(3))  # a request about to be sent
        assert not cache.missing(k(3)) and not cache.claim(k(3))  # known from now on
        assert cache.add(k(3), stored_reply("r3", "stop", 1, 1, 0, None)) is None  # no backlog
        assert await cache.get(k(3)) is not None  # its own, queued
        assert queries == []  # a miss and an own addition: no query
        assert await cache.get(k(1)) == {"c": "r1", "f": "stop", "p": 1, "o": 1}
        assert len(queries) == 1  # a slot the store holds is read
        other.insert({k(4): stored_reply("r4", "stop", 1, 1, 0, None)})
        # A round (each commit of additions, or every second when idle) notices the
        # other run's commit...
        await cache._round([], {})
        # ...and from then on every lookup asks the store: the other run's reply is found.
        assert not cache.missing(k(5))
        assert await cache.get(k(4)) == {"c": "r4", "f": "stop", "p": 1, "o": 1}
        cache.close()
    assert store.count() == 3
    other.close()
    store.close()


async def test_a_file_that_is_not_a_store_is_refused_naming_cache_dir(tmp_path: Path) -> None:
    (tmp_path / "replies.sqlite3").write_bytes(b"not sqlite " * 500)
    with pytest.raises(ConfigError, match=r"cache\.dir: .*replies\.sqlite3 is not a reply store"):
        async with open_cache(CacheConfig(tmp_path)):
            pass
    assert (tmp_path / "replies.sqlite3").read_bytes() == b"not sqlite " * 500  # left as it was
