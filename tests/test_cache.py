"""The reply cache's key (pure) and its SQLite store: shared, read-only, batched."""

from __future__ import annotations

import threading
from pathlib import Path

import anyio
import pytest

from engine.cache.keys import generation_of, reply_value, request_key
from engine.cache.settings import CacheConfig
from engine.cache.store import ReplyCache, ReplyStore, open_cache
from engine.tasks.asking import Rating, Sample, Try, Turn

MESSAGES = [{"role": "user", "content": "hello"}]


def test_the_key_changes_with_what_defines_a_reply() -> None:
    base = request_key("gpt", {"temperature": 0.0}, MESSAGES)
    assert len(base) == 64
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
            store.put_many(
                (f"k{which}-{batch}-{i}", reply_value(f"r{i}", "stop", 1, 2, 0, None))
                for i in range(50)
            )
            store.put_many([("shared", reply_value(f"from {which}", "stop", 1, 1, 0, None))])

    threads = [threading.Thread(target=fill, args=(s, n)) for n, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stores[0].count() == 2 * 20 * 50 + 1
    assert stores[1].get_many(["k0-3-7"])["k0-3-7"]["c"] == "r7"
    assert (tmp_path / "replies.sqlite3-wal").exists() or stores[0].count()
    for s in stores:
        s.close()


def test_a_read_only_store_reads_and_never_writes(tmp_path: Path) -> None:
    assert ReplyStore(tmp_path / "none", read_only=True).get_many(["x"]) == {}
    assert not (tmp_path / "none").exists()
    writer = ReplyStore(tmp_path)
    writer.put_many([("x", reply_value("kept", "stop", 1, 1, 0, None))])
    reader = ReplyStore(tmp_path, read_only=True)
    reader.put_many([("y", reply_value("not kept", "stop", 1, 1, 0, None))])
    assert reader.get_many(["x", "y"]) == {"x": {"c": "kept", "f": "stop", "p": 1, "o": 1}}
    assert writer.count() == 1
    reader.close()
    writer.close()


async def test_the_cache_batches_lookups_and_additions(tmp_path: Path) -> None:
    async with open_cache(CacheConfig(tmp_path)) as cache:
        assert cache is not None
        async with anyio.create_task_group() as tg:
            for i in range(300):
                tg.start_soon(cache.put, f"k{i}", reply_value(f"r{i}", "stop", 1, 1, 0, None))
        found: dict[int, object] = {}

        async def get(i: int) -> None:
            assert cache is not None
            found[i] = await cache.get(f"k{i}")

        async with anyio.create_task_group() as tg:
            for i in range(310):
                tg.start_soon(get, i)
    assert sum(v is not None for v in found.values()) == 300
    async with open_cache(CacheConfig(tmp_path, "read_only")) as cache:
        assert cache is not None
        await cache.put("new", reply_value("x", "stop", 1, 1, 0, None))
        assert await cache.get("new") is None
        assert await cache.get("k5") == {"c": "r5", "f": "stop", "p": 1, "o": 1}
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
        for i in range(700):  # past a batch: some rounds commit while others queue
            await cache.put(f"k{i}", reply_value(f"r{i}", "stop", 1, 1, 0, None))
        # Seen before their commit, and after it; an unknown key is None.
        assert await cache.get("k699") == {"c": "r699", "f": "stop", "p": 1, "o": 1}
        assert await cache.get("k3") == {"c": "r3", "f": "stop", "p": 1, "o": 1}
        assert await cache.get("nope") is None
        cache.close()
    assert store.count() == 700
    with pytest.raises(RuntimeError, match="closed"):
        await cache.get("k1")
    store.close()
