"""The replica pool: spread, affinity, hand-off order, the adaptive limit, health and down.

Everything here is plain state: time is passed as ``now`` floats, and tasks are let run
with ``wait_all_tasks_blocked`` (never a sleep), so every test is instant and exact.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import anyio.lowlevel
import pytest
from anyio.abc import TaskGroup

from engine.errors import ModelError
from engine.http.replicas import BURST_MIN, BURST_WINDOW, OUT_AFTER_FAILURES, Replica, ReplicaPool
from engine.stats import ModelStats, Outage

URLS = ["http://a:1/v1", "http://b:2/v1", "http://c:3/v1"]


def make_pool(
    replicas: int = 3, cap: int = 2, *, down_after_s: float = 300.0, affinity: bool = True
) -> ReplicaPool:
    stats = ModelStats(name="m", cap=0)
    return ReplicaPool(
        "m", URLS[:replicas], cap, stats, down_after_s=down_after_s, affinity=affinity
    )


@dataclass(eq=False)
class Waiter:
    """One ``acquire`` running in a task: what it got, or why it failed."""

    prefer: int | None
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    replica: Replica | None = None
    error: ModelError | None = None

    @property
    def waiting(self) -> bool:
        return self.replica is None and self.error is None


async def spawn(tg: TaskGroup, pool: ReplicaPool, prefer: int | None = None) -> Waiter:
    """Start ``acquire(prefer)`` and let it run until it holds a slot or waits in line."""
    waiter = Waiter(prefer)

    async def run() -> None:
        with waiter.scope:
            try:
                waiter.replica = await pool.acquire(prefer)
            except ModelError as exc:
                waiter.error = exc

    tg.start_soon(run)
    await anyio.wait_all_tasks_blocked()
    return waiter


@asynccontextmanager
async def tasks() -> AsyncIterator[TaskGroup]:
    """A task group whose leftover waiters are cancelled at the end (a failed test must
    not hang on them)."""
    async with anyio.create_task_group() as tg:
        yield tg
        tg.cancel_scope.cancel()


async def acquire_now(pool: ReplicaPool, prefer: int | None = None) -> Replica:
    """``acquire`` that must not wait: fails the test instead of hanging."""
    async with tasks() as tg:
        waiter = await spawn(tg, pool, prefer)
    assert waiter.error is None
    assert waiter.replica is not None, "acquire waited, but a slot was free"
    return waiter.replica


def in_flight(pool: ReplicaPool) -> list[int]:
    return [r.in_flight for r in pool.replicas]


def assert_stats_mirror(pool: ReplicaPool) -> None:
    assert pool.stats.in_flight == sum(r.in_flight for r in pool.replicas)
    for replica in pool.replicas:
        assert replica.stats.in_flight == replica.in_flight
        assert replica.stats.limit == replica.limit
        assert replica.stats.live == replica.live
    assert pool.stats.limit == sum(r.limit for r in pool.replicas)


# -- construction ------------------------------------------------------------------------


@pytest.mark.parametrize("cap", [0, -1])
def test_a_cap_below_one_is_refused(cap: int) -> None:
    with pytest.raises(ValueError, match="cap must be positive"):
        ReplicaPool("m", URLS, cap, ModelStats(name="m", cap=0))


def test_a_model_without_urls_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one URL"):
        ReplicaPool("m", [], 4, ModelStats(name="m", cap=0))


def test_a_new_pool_fills_in_its_stats() -> None:
    pool = make_pool(3, cap=4)
    stats = pool.stats
    assert stats.cap == 12
    assert stats.limit == 12
    assert [r.url for r in stats.replicas] == URLS
    assert [(r.cap, r.limit, r.live) for r in stats.replicas] == [(4, 4, True)] * 3
    assert [r.stats for r in pool.replicas] == stats.replicas
    assert [(r.index, r.limit, r.room) for r in pool.replicas] == [(0, 4, 4), (1, 4, 4), (2, 4, 4)]
    assert pool.live_count == 3
    assert not pool.down
    assert pool.unreachable_since is None


# -- pick and other_than -----------------------------------------------------------------


async def test_pick_goes_to_the_replica_with_the_most_free_room() -> None:
    pool = make_pool(3, cap=4)
    for index, count in ((0, 3), (1, 1), (2, 2)):
        for _ in range(count):
            assert await acquire_now(pool, index) is pool.replicas[index]
    assert [r.room for r in pool.replicas] == [1, 3, 2]
    assert pool.pick(None) is pool.replicas[1]


async def test_pick_honours_prefer_while_it_has_room_even_with_less_than_others() -> None:
    pool = make_pool(3, cap=4)
    for _ in range(3):
        await acquire_now(pool, 0)
    assert pool.pick(0) is pool.replicas[0]


async def test_pick_ignores_prefer_when_that_replica_is_full() -> None:
    pool = make_pool(3, cap=2)
    for _ in range(2):
        assert await acquire_now(pool, 0) is pool.replicas[0]
    await acquire_now(pool, 1)
    assert pool.pick(0) is pool.replicas[2]


def test_pick_ignores_prefer_when_that_replica_is_out() -> None:
    pool = make_pool(3, cap=2)
    pool.take_out(pool.replicas[0], now=1.0)
    assert pool.replicas[0].room == 0
    assert pool.pick(0) is not pool.replicas[0]
    assert pool.pick(0) in pool.replicas[1:]


async def test_pick_ignores_prefer_without_affinity() -> None:
    pool = make_pool(3, cap=4, affinity=False)
    await acquire_now(pool, 0)
    assert pool.pick(0) is not pool.replicas[0]
    # And acquire follows pick: spread, not affinity.
    assert await acquire_now(pool, 0) is not pool.replicas[0]


async def test_pick_is_none_when_no_live_replica_has_room() -> None:
    pool = make_pool(2, cap=1)
    await acquire_now(pool)
    pool.take_out(pool.replicas[1], now=1.0)
    assert pool.pick(None) is None
    assert pool.pick(0) is None
    assert pool.pick(1) is None


def test_pick_ignores_a_prefer_that_names_no_replica() -> None:
    pool = make_pool(2, cap=1)
    assert pool.pick(7) in pool.replicas
    assert pool.pick(-1) in pool.replicas


async def test_other_than_is_the_live_other_replica_with_the_most_room() -> None:
    pool = make_pool(3, cap=4)
    a, b, c = pool.replicas
    await acquire_now(pool, 1)
    assert pool.other_than(a) is c
    pool.take_out(c, now=1.0)
    assert pool.other_than(a) is b
    for _ in range(3):
        await acquire_now(pool, 1)
    assert b.room == 0
    assert pool.other_than(a) is b  # live though full: acquire will wait for it
    pool.take_out(b, now=2.0)
    assert pool.other_than(a) is None


def test_other_than_with_a_single_replica_is_none() -> None:
    pool = make_pool(1)
    assert pool.other_than(pool.replicas[0]) is None


# -- spread and the hard cap -------------------------------------------------------------


async def test_acquisitions_without_preference_spread_evenly() -> None:
    pool = make_pool(3, cap=4)
    held = [await acquire_now(pool) for _ in range(12)]
    assert sorted(r.index for r in held) == [0] * 4 + [1] * 4 + [2] * 4
    assert in_flight(pool) == [4, 4, 4]
    assert pool.stats.in_flight == 12
    assert_stats_mirror(pool)
    async with tasks() as tg:
        extra = await spawn(tg, pool)
        assert extra.waiting  # the cap is hard: a 13th waits
        pool.release(held[5])
        await anyio.wait_all_tasks_blocked()
        assert extra.replica is held[5]
    assert in_flight(pool) == [4, 4, 4]
    for replica in [*held[:5], *held[6:], held[5]]:
        pool.release(replica)
    assert in_flight(pool) == [0, 0, 0]
    assert_stats_mirror(pool)


async def test_the_cap_holds_under_many_concurrent_tasks() -> None:
    pool = make_pool(3, cap=3)
    rng = random.Random(20240611)
    active = [0, 0, 0]
    peak = [0, 0, 0]
    rounds = 0

    async def worker() -> None:
        nonlocal rounds
        prefer: int | None = None
        for _ in range(25):
            replica = await pool.acquire(prefer)
            assert replica.live
            active[replica.index] += 1
            peak[replica.index] = max(peak[replica.index], active[replica.index])
            assert active[replica.index] <= replica.cap
            assert all(0 <= r.in_flight <= r.cap for r in pool.replicas)
            assert_stats_mirror(pool)
            for _ in range(rng.randrange(4)):
                await anyio.lowlevel.checkpoint()
            active[replica.index] -= 1
            pool.release(replica)
            rounds += 1
            prefer = rng.choice([None, replica.index, rng.randrange(3)])
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(worker)

    assert rounds == 20 * 25
    assert peak == [3, 3, 3]
    assert active == [0, 0, 0]
    assert in_flight(pool) == [0, 0, 0]
    assert pool.stats.in_flight == 0
    assert [r.stats.in_flight for r in pool.replicas] == [0, 0, 0]


# -- hand-off order ----------------------------------------------------------------------


async def test_a_freed_slot_goes_to_the_oldest_of_its_own_and_no_preference_then_any() -> None:
    pool = make_pool(3, cap=1)
    r0, r1, r2 = [await acquire_now(pool, i) for i in range(3)]
    assert in_flight(pool) == [1, 1, 1]
    async with tasks() as tg:
        other_old = await spawn(tg, pool, 1)  # the oldest, for another replica
        anyone_1 = await spawn(tg, pool, None)
        own_1 = await spawn(tg, pool, 0)
        own_2 = await spawn(tg, pool, 0)
        anyone_2 = await spawn(tg, pool, None)
        other_new = await spawn(tg, pool, 2)
        line = [other_old, anyone_1, own_1, own_2, anyone_2, other_new]
        assert all(w.waiting for w in line)

        served = []
        for _ in line:
            pool.release(r0)
            await anyio.wait_all_tasks_blocked()
            now_served = [w for w in line if w.replica is not None and w not in served]
            assert len(now_served) == 1
            assert now_served[0].replica is r0
            served.append(now_served[0])
        # First come, first served among those that can use r0: a conversation's next
        # turn (own_*) does not jump ahead of a first turn that waited longer (anyone_1).
        assert served == [anyone_1, own_1, own_2, anyone_2, other_old, other_new]
    assert in_flight(pool) == [1, 1, 1]
    assert_stats_mirror(pool)
    del r1, r2


async def test_a_new_request_queues_behind_waiters_and_does_not_jump_the_line() -> None:
    pool = make_pool(1, cap=1)
    held = await acquire_now(pool)
    async with tasks() as tg:
        first = await spawn(tg, pool)
        second = await spawn(tg, pool)
        pool.release(held)
        await anyio.wait_all_tasks_blocked()
        assert first.replica is held
        assert second.waiting
        pool.release(held)
        await anyio.wait_all_tasks_blocked()
        assert second.replica is held
    assert in_flight(pool) == [1]


async def test_one_server_serves_first_turns_and_next_turns_in_arrival_order() -> None:
    # One replica: every continuing conversation prefers it, new ones prefer nothing.
    # Serving the continuing ones first would start the input's last conversations
    # late, all their turns still ahead when the others are done (an idle tail).
    pool = make_pool(1, cap=1)
    held = await acquire_now(pool)
    async with tasks() as tg:
        first_turn = await spawn(tg, pool, None)
        next_turn = await spawn(tg, pool, 0)
        later_first_turn = await spawn(tg, pool, None)
        served = []
        for _ in range(3):
            pool.release(held)
            await anyio.wait_all_tasks_blocked()
            waiters = (first_turn, next_turn, later_first_turn)
            served += [w for w in waiters if w.replica is not None and w not in served]
        assert served == [first_turn, next_turn, later_first_turn]
    assert in_flight(pool) == [1]


# -- cancellation -----------------------------------------------------------------------


async def test_a_cancelled_waiter_leaves_the_line() -> None:
    pool = make_pool(1, cap=1)
    held = await acquire_now(pool)
    async with tasks() as tg:
        gone = await spawn(tg, pool)
        kept = await spawn(tg, pool)
        gone.scope.cancel()
        await anyio.wait_all_tasks_blocked()
        assert gone.waiting and gone.scope.cancelled_caught
        pool.release(held)
        await anyio.wait_all_tasks_blocked()
        assert kept.replica is held
    pool.release(held)
    assert in_flight(pool) == [0]
    # Nobody is counted as waiting any more: a request gets the free slot at once.
    assert await acquire_now(pool) is held
    assert pool.stats.in_flight == 1


async def test_a_waiter_cancelled_after_being_handed_a_slot_passes_it_on() -> None:
    pool = make_pool(1, cap=1)
    held = await acquire_now(pool)
    async with tasks() as tg:
        handed = await spawn(tg, pool)
        next_in_line = await spawn(tg, pool)
        # The cancellation lands first, then the slot is handed over, before the
        # waiter runs again: it wakes up cancelled holding a slot it will not use.
        handed.scope.cancel()
        pool.release(held)
        await anyio.wait_all_tasks_blocked()
        assert handed.replica is None and handed.scope.cancelled_caught
        assert next_in_line.replica is held
        assert in_flight(pool) == [1]
        assert_stats_mirror(pool)
    pool.release(held)
    assert in_flight(pool) == [0]
    assert pool.stats.in_flight == 0


async def test_a_waiter_cancelled_after_being_handed_the_last_slot_frees_it() -> None:
    pool = make_pool(1, cap=1)
    held = await acquire_now(pool)
    async with tasks() as tg:
        handed = await spawn(tg, pool)
        handed.scope.cancel()
        pool.release(held)
        await anyio.wait_all_tasks_blocked()
        assert handed.replica is None
    assert in_flight(pool) == [0]
    assert pool.stats.in_flight == 0
    assert await acquire_now(pool) is held


# -- adaptive limit ----------------------------------------------------------------------


def test_sporadic_backpressure_does_not_shrink() -> None:
    pool = make_pool(1, cap=8)
    replica = pool.replicas[0]
    for _ in range(BURST_MIN - 1):
        pool.backpressure(replica, replica.epoch, now=1.0, burst=False)
    assert replica.limit == 8
    # Spread out over more than a window, backpressure never makes a burst.
    for _ in range(5):
        for _ in range(BURST_WINDOW - BURST_MIN + 1):
            pool.succeeded(replica, replica.epoch, now=2.0)
        for _ in range(BURST_MIN - 1):
            assert not replica.backpressure(replica.epoch)
    assert replica.limit == 8
    assert pool.stats.limit == 8


def test_the_burst_window_slides() -> None:
    replica = make_pool(1, cap=8).replicas[0]
    for _ in range(BURST_MIN - 1):
        replica.backpressure(replica.epoch)
    for _ in range(BURST_WINDOW - BURST_MIN + 1):
        replica.succeeded(replica.epoch)
    # The window is full; each new one pushes out the oldest, an old backpressure
    # answer at first (still BURST_MIN - 1 in the window), then successes.
    for _ in range(BURST_MIN - 1):
        assert not replica.backpressure(replica.epoch)
    assert replica.limit == 8
    assert replica.backpressure(replica.epoch)
    assert replica.limit == 4


def test_a_burst_halves_the_limit_once_per_epoch() -> None:
    pool = make_pool(2, cap=8)
    replica = pool.replicas[0]
    sent_under = replica.epoch
    results = [replica.backpressure(sent_under) for _ in range(BURST_MIN)]
    assert results == [False] * (BURST_MIN - 1) + [True]
    assert replica.limit == 4
    assert replica.epoch != sent_under
    # Answers to requests sent under the old limit do not count again.
    for _ in range(3 * BURST_MIN):
        pool.backpressure(replica, sent_under, now=1.0, burst=False)
    pool.backpressure(replica, sent_under, now=1.0, burst=True)
    assert replica.limit == 4
    # A fresh burst under the new limit halves it again.
    for _ in range(BURST_MIN):
        pool.backpressure(replica, replica.epoch, now=2.0, burst=False)
    assert replica.limit == 2
    assert replica.stats.limit == 2
    assert pool.stats.limit == 2 + 8
    assert pool.replicas[1].limit == 8


def test_a_full_kv_cache_shrinks_at_once() -> None:
    pool = make_pool(1, cap=8)
    replica = pool.replicas[0]
    pool.backpressure(replica, replica.epoch, now=1.0, burst=True)
    assert replica.limit == 4
    assert pool.stats.limit == 4


@pytest.mark.parametrize("cap", [1, 2, 3, 5])
def test_the_limit_never_drops_below_one(cap: int) -> None:
    pool = make_pool(1, cap=cap)
    replica = pool.replicas[0]
    for _ in range(10):
        pool.backpressure(replica, replica.epoch, now=1.0, burst=True)
        for _ in range(BURST_MIN):
            pool.backpressure(replica, replica.epoch, now=1.0, burst=False)
    assert replica.limit == 1
    assert pool.stats.limit == 1
    assert not replica.backpressure(replica.epoch, burst=True)


def test_backpressure_and_successes_count_as_answers() -> None:
    pool = make_pool(1, cap=4)
    replica = pool.replicas[0]
    for _ in range(OUT_AFTER_FAILURES - 1):
        pool.failed(replica, now=1.0)
    pool.backpressure(replica, replica.epoch, now=2.0, burst=False)
    assert replica.failures_in_row == 0
    assert replica.last_answer == 2.0
    pool.failed(replica, now=3.0)
    pool.succeeded(replica, replica.epoch, now=4.0)
    assert replica.failures_in_row == 0
    assert replica.last_answer == 4.0
    assert replica.stats.ok == 1


def test_successes_grow_the_limit_by_one_per_limit_successes_up_to_the_cap() -> None:
    pool = make_pool(2, cap=8)
    replica = pool.replicas[0]
    pool.backpressure(replica, replica.epoch, now=0.0, burst=True)
    assert replica.limit == 4
    grew_at = []
    for n in range(1, 40):
        before = replica.limit
        pool.succeeded(replica, replica.epoch, now=float(n))
        if replica.limit != before:
            assert replica.limit == before + 1
            grew_at.append(n)
        assert pool.stats.limit == replica.limit + 8
    assert grew_at == [4, 4 + 5, 4 + 5 + 6, 4 + 5 + 6 + 7]
    assert replica.limit == 8  # the cap: never above it
    assert replica.stats.limit == 8


def test_backpressure_restarts_the_count_of_successes() -> None:
    replica = make_pool(1, cap=8).replicas[0]
    replica.backpressure(replica.epoch, burst=True)
    assert replica.limit == 4
    for _ in range(3):
        assert not replica.succeeded(replica.epoch)
    replica.backpressure(replica.epoch)  # sporadic: no shrink, but no growth either
    for _ in range(3):
        assert not replica.succeeded(replica.epoch)
    assert replica.succeeded(replica.epoch)
    assert replica.limit == 5


async def test_growing_the_limit_wakes_a_waiter() -> None:
    pool = make_pool(1, cap=2)
    replica = pool.replicas[0]
    first, second = await acquire_now(pool), await acquire_now(pool)
    pool.backpressure(replica, replica.epoch, now=1.0, burst=True)
    assert replica.limit == 1
    pool.release(second)
    async with tasks() as tg:
        waiter = await spawn(tg, pool)
        assert waiter.waiting  # one in flight, limit one: no room
        pool.succeeded(replica, replica.epoch, now=2.0)
        assert replica.limit == 2
        await anyio.wait_all_tasks_blocked()
        assert waiter.replica is replica
    assert replica.in_flight == 2
    assert_stats_mirror(pool)
    del first


async def test_a_shrunk_limit_holds_back_slots_until_in_flight_is_under_it() -> None:
    pool = make_pool(1, cap=4)
    replica = pool.replicas[0]
    held = [await acquire_now(pool) for _ in range(4)]
    pool.backpressure(replica, replica.epoch, now=1.0, burst=True)
    assert replica.limit == 2
    async with tasks() as tg:
        waiter = await spawn(tg, pool)
        for expected_in_flight in (3, 2):
            pool.release(held.pop())
            await anyio.wait_all_tasks_blocked()
            assert waiter.waiting
            assert replica.in_flight == expected_in_flight
        pool.release(held.pop())
        await anyio.wait_all_tasks_blocked()
        assert waiter.replica is replica
        assert replica.in_flight == 2
    assert_stats_mirror(pool)


# -- health ------------------------------------------------------------------------------


def test_failures_in_a_row_take_a_replica_out() -> None:
    pool = make_pool(2, cap=2)
    replica = pool.replicas[0]
    for n in range(OUT_AFTER_FAILURES - 1):
        assert not pool.failed(replica, now=float(n))
    replica.answered(now=5.0)  # an answer in between: the count starts again
    for n in range(OUT_AFTER_FAILURES - 1):
        assert not pool.failed(replica, now=6.0 + n)
    assert replica.live
    assert pool.failed(replica, now=10.0)
    assert not replica.live
    assert replica.room == 0
    assert pool.live_count == 1
    assert replica.stats.failures == 2 * OUT_AFTER_FAILURES - 1
    assert not replica.stats.live
    assert replica.stats.out_since == 10.0
    assert pool.stats.outages == [Outage(replica=0, url=URLS[0], started=10.0)]
    assert pool.unreachable_since is None  # another replica is live
    # More failures of an out replica are counted, but take nothing out again.
    assert not pool.failed(replica, now=11.0)
    pool.take_out(replica, now=12.0)
    assert len(pool.stats.outages) == 1
    assert replica.stats.failures == 2 * OUT_AFTER_FAILURES


def test_back_ends_the_outage_and_makes_the_replica_live_again() -> None:
    pool = make_pool(2, cap=2)
    replica = pool.replicas[0]
    for _ in range(OUT_AFTER_FAILURES):
        pool.failed(replica, now=10.0)
    pool.back(replica, now=25.0)
    assert replica.live
    assert replica.room == 2
    assert replica.failures_in_row == 0
    assert replica.last_answer == 25.0
    assert replica.stats.live
    assert replica.stats.out_since is None
    assert pool.stats.outages == [Outage(replica=0, url=URLS[0], started=10.0, ended=25.0)]
    pool.back(replica, now=30.0)  # already live: nothing changes
    assert pool.stats.outages[0].ended == 25.0
    # A second outage is a second record; back ends that one only.
    pool.take_out(replica, now=40.0)
    pool.back(replica, now=45.0)
    assert pool.stats.outages == [
        Outage(replica=0, url=URLS[0], started=10.0, ended=25.0),
        Outage(replica=0, url=URLS[0], started=40.0, ended=45.0),
    ]
    # A full count of failures is needed again after a return.
    for _ in range(OUT_AFTER_FAILURES - 1):
        assert not pool.failed(replica, now=50.0)
    assert replica.live


async def test_an_out_replicas_waiters_get_the_slots_of_the_others() -> None:
    pool = make_pool(3, cap=1)
    r0, r1, r2 = [await acquire_now(pool, i) for i in range(3)]
    async with tasks() as tg:
        older_for_2 = await spawn(tg, pool, 2)
        for_0 = await spawn(tg, pool, 0)
        for_0_gone = await spawn(tg, pool, 0)
        pool.take_out(r0, now=1.0)
        # Its waiters now wait for any replica: a cancelled one still leaves cleanly.
        for_0_gone.scope.cancel()
        await anyio.wait_all_tasks_blocked()
        # r1 has no own waiter: a no-preference one goes first, though not the oldest.
        pool.release(r1)
        await anyio.wait_all_tasks_blocked()
        assert for_0.replica is r1
        assert older_for_2.waiting
        pool.release(r1)
        await anyio.wait_all_tasks_blocked()
        assert older_for_2.replica is r1
        assert for_0_gone.replica is None
        # The out replica's slot, once freed, goes to nobody.
        pool.release(r0)
        assert r0.in_flight == 0
    assert in_flight(pool) == [0, 1, 1]
    assert_stats_mirror(pool)
    del r2


async def test_a_request_preferring_an_out_replica_waits_for_any() -> None:
    pool = make_pool(2, cap=1)
    r0, r1 = await acquire_now(pool, 0), await acquire_now(pool, 1)
    pool.take_out(r0, now=1.0)
    async with tasks() as tg:
        waiter = await spawn(tg, pool, 0)
        pool.release(r1)
        await anyio.wait_all_tasks_blocked()
        assert waiter.replica is r1
    pool.release(r0)
    assert in_flight(pool) == [0, 1]


# -- every replica out, and down ---------------------------------------------------------


async def test_with_every_replica_out_requests_wait_until_one_is_back() -> None:
    pool = make_pool(2, cap=2)
    a, b = pool.replicas
    pool.take_out(a, now=5.0)
    assert pool.unreachable_since is None
    pool.take_out(b, now=10.0)
    assert pool.unreachable_since == 10.0  # from the moment the last one went out
    async with tasks() as tg:
        waiters = [await spawn(tg, pool, p) for p in (None, 0, 1)]
        assert all(w.waiting for w in waiters)
        assert not pool.check_down(now=11.0)
        pool.back(b, now=12.0)
        await anyio.wait_all_tasks_blocked()
        assert [w.replica for w in waiters[:2]] == [b, b]
        assert waiters[2].waiting
        assert pool.unreachable_since == 10.0  # a probe's answer is not enough
        pool.succeeded(b, b.epoch, now=13.0)
        assert pool.unreachable_since is None
        pool.release(b)
        await anyio.wait_all_tasks_blocked()
        assert waiters[2].replica is b
    assert in_flight(pool) == [0, 2]


def test_check_down_is_false_while_a_replica_is_live() -> None:
    pool = make_pool(2, down_after_s=60.0)
    pool.take_out(pool.replicas[0], now=0.0)
    assert not pool.check_down(now=1e9)
    assert not pool.down


async def test_the_pool_goes_down_after_down_after_s_and_fails_every_waiter() -> None:
    pool = make_pool(2, cap=1, down_after_s=60.0)
    a, b = pool.replicas
    held = await acquire_now(pool, 0)
    for _ in range(OUT_AFTER_FAILURES):
        pool.failed(a, now=100.0)
    for _ in range(OUT_AFTER_FAILURES):
        pool.failed(b, now=110.0)
    assert pool.live_count == 0
    assert pool.unreachable_since == 110.0
    assert not pool.down
    async with tasks() as tg:
        waiters = [await spawn(tg, pool, p) for p in (None, 0, 1)]
        assert all(w.waiting for w in waiters)
        assert not pool.check_down(now=169.5)
        await anyio.wait_all_tasks_blocked()
        assert all(w.waiting for w in waiters)
        assert pool.check_down(now=170.0)
        assert pool.down
        await anyio.wait_all_tasks_blocked()
        for waiter in waiters:
            assert waiter.replica is None
            assert waiter.error is not None
            assert waiter.error.model_down
            assert not waiter.error.retryable
            assert "down for" in str(waiter.error)
            assert "models.m down for 60 s" in str(waiter.error)
            assert URLS[0] in str(waiter.error) and URLS[1] in str(waiter.error)
        # New requests fail at once; asking again changes nothing.
        late = await spawn(tg, pool)
        assert late.error is not None and late.error.model_down
        assert pool.check_down(now=171.0)
    # The request in flight when it went out still returns its slot.
    pool.release(held)
    assert in_flight(pool) == [0, 0]
    assert pool.stats.in_flight == 0


async def test_back_lifts_down_and_requests_are_served_again() -> None:
    pool = make_pool(2, cap=1, down_after_s=60.0)
    a, b = pool.replicas
    pool.take_out(a, now=0.0)
    pool.take_out(b, now=0.0)
    assert pool.check_down(now=60.0)
    with pytest.raises(ModelError) as info:
        await pool.acquire()
    assert info.value.model_down
    pool.back(b, now=70.0)
    assert not pool.down
    assert pool.stats.outages[1].ended == 70.0
    assert await acquire_now(pool) is b
    # Not reachable yet (no request has succeeded): out again, it is down at once.
    assert pool.unreachable_since == 0.0
    pool.take_out(b, now=80.0)
    assert pool.check_down(now=80.0)


def test_a_pool_with_no_delay_goes_down_on_the_last_failure() -> None:
    pool = make_pool(1, down_after_s=0.0)
    replica = pool.replicas[0]
    for _ in range(OUT_AFTER_FAILURES - 1):
        pool.failed(replica, now=1.0)
    assert not pool.down
    assert pool.failed(replica, now=2.0)
    assert pool.down


def test_a_success_clears_unreachable_since() -> None:
    pool = make_pool(2, down_after_s=60.0)
    a, b = pool.replicas
    pool.take_out(a, now=0.0)
    pool.take_out(b, now=0.0)
    pool.back(a, now=30.0)
    pool.succeeded(a, a.epoch, now=31.0)
    assert pool.unreachable_since is None
    pool.take_out(a, now=40.0)
    assert pool.unreachable_since == 40.0
    assert not pool.check_down(now=99.0)
    assert pool.check_down(now=100.0)


def test_a_late_success_while_every_replica_is_out_does_not_disarm_down() -> None:
    pool = make_pool(1, down_after_s=60.0)
    replica = pool.replicas[0]
    sent_under = replica.epoch
    for _ in range(OUT_AFTER_FAILURES):
        pool.failed(replica, now=0.0)
    assert pool.unreachable_since == 0.0
    pool.succeeded(replica, sent_under, now=1.0)  # answered, sent before it went out
    assert not replica.live  # still out: only a probe puts it back
    # The server is gone for good and the probe keeps failing: the model must go down.
    assert pool.check_down(now=1000.0)


async def test_a_prefer_that_names_no_replica_is_ignored_while_waiting_too() -> None:
    pool = make_pool(1, cap=1)
    held = await acquire_now(pool)
    async with tasks() as tg:
        waiter = await spawn(tg, pool, 5)
        pool.release(held)
        await anyio.wait_all_tasks_blocked()
        assert waiter.replica is held


# -- blame: whose a health failure is, settled by what its replica does next -------------------


def test_a_failure_on_a_replica_taken_out_right_after_is_the_servers() -> None:
    # A server SIGKILLed with requests in flight: the first failure is open until the
    # next ones, which take the replica out; its return after a restart changes nothing.
    pool = make_pool(2, cap=4)
    victim = pool.replicas[0]
    victim.answered(now=1.0)  # it was answering others a moment ago
    first = victim.ledger.hold()
    pool.failed(victim, now=2.0)
    assert first.charged is False  # it failed again: the server's
    second = victim.ledger.hold()
    for _ in range(OUT_AFTER_FAILURES - 1):
        pool.failed(victim, now=2.0)
    assert not victim.live and second.charged is False
    pool.back(victim, now=30.0)
    pool.succeeded(victim, victim.epoch, now=31.0)
    assert first.charged is False and second.charged is False


def test_a_failure_on_a_replica_that_answers_next_is_the_rows() -> None:
    pool = make_pool(2, cap=4)
    replica = pool.replicas[1]
    pool.failed(replica, now=1.0)
    verdict = replica.ledger.hold()
    pool.succeeded(replica, replica.epoch, now=2.0)
    assert verdict.charged is True


async def test_a_model_down_from_the_start_fails_requests_at_once_until_it_is_back() -> None:
    pool = make_pool(2, cap=1, down_after_s=300.0)
    a, b = pool.replicas
    pool.take_out(a, now=0.0)
    pool.take_out(b, now=0.0)
    assert not pool.check_down(now=1.0)  # mid-run, it would wait down_after_s
    pool.down_from_start()
    with pytest.raises(ModelError) as info:
        await pool.acquire()
    assert info.value.model_down
    assert "models.m unreachable since the run started" in str(info.value)
    pool.back(b, now=5.0)  # its probe finds it answering: used again
    assert await acquire_now(pool) is b


def test_urls_are_shown_without_credentials() -> None:
    stats = ModelStats(name="m", cap=0)
    pool = ReplicaPool("m", ["http://user:PASSWORD@h:1/v1?api_key=QSECRET"], 1, stats)
    replica = pool.replicas[0]
    assert replica.url == "http://user:PASSWORD@h:1/v1?api_key=QSECRET"  # requests go here
    assert replica.stats.url == "http://h:1/v1?api_key=***"  # what is shown
    pool.take_out(replica, now=0.0)
    assert stats.outages[0].url == "http://h:1/v1?api_key=***"
    assert "PASSWORD" not in str(pool.down_error()) and "QSECRET" not in str(pool.down_error())
