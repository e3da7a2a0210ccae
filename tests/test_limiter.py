"""The per-model limiter: hard cap, FIFO hand-off, cancellation, and the adaptive limit."""

from __future__ import annotations

import asyncio

import anyio
import pytest
from anyio import wait_all_tasks_blocked
from anyio.lowlevel import checkpoint

from engine.limiter import Limiter
from engine.stats import ModelStats


def make(cap: int) -> tuple[Limiter, ModelStats]:
    stats = ModelStats(name="m", cap=cap)
    return Limiter(cap, stats), stats


def test_cap_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Limiter(0, ModelStats(name="m", cap=0))


def test_stats_start_at_the_cap() -> None:
    limiter, stats = make(5)
    assert limiter.limit == 5 and stats.limit == 5
    assert limiter.in_flight == 0 and stats.in_flight == 0


# --- the cap -----------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [1, 3, 8])
async def test_never_more_holders_than_the_limit(limit: int) -> None:
    limiter, stats = make(limit)
    holders = 0
    most = 0
    finished = 0

    async def worker() -> None:
        nonlocal holders, most, finished
        async with limiter.slot():
            holders += 1
            most = max(most, holders)
            assert stats.in_flight == limiter.in_flight <= limit
            for _ in range(3):
                await checkpoint()  # let every other task try to get in meanwhile
            holders -= 1
        finished += 1

    async with anyio.create_task_group() as tg:
        for _ in range(10 * limit):
            tg.start_soon(worker)

    assert finished == 10 * limit
    assert most == limit  # reached, never exceeded
    assert limiter.in_flight == 0 and stats.in_flight == 0


async def test_stats_in_flight_mirror_the_limiter() -> None:
    limiter, stats = make(4)
    async with limiter.slot():
        async with limiter.slot():
            assert limiter.in_flight == stats.in_flight == 2
        assert limiter.in_flight == stats.in_flight == 1
    assert limiter.in_flight == stats.in_flight == 0


# --- FIFO hand-off -----------------------------------------------------------------------------


async def test_waiters_get_the_slot_in_arrival_order() -> None:
    limiter, _ = make(1)
    order: list[int] = []

    async def waiter(i: int) -> None:
        async with limiter.slot():
            order.append(i)

    async with anyio.create_task_group() as tg:
        async with limiter.slot():
            for i in range(6):
                tg.start_soon(waiter, i)
                await wait_all_tasks_blocked()  # i is queued before i + 1 starts
            assert order == []
    assert order == [0, 1, 2, 3, 4, 5]


async def test_a_released_slot_is_handed_over_not_raced_for() -> None:
    limiter, _ = make(1)
    order: list[str] = []

    async def take(name: str) -> None:
        async with limiter.slot():
            order.append(name)

    async with anyio.create_task_group() as tg:
        async with limiter.slot():
            tg.start_soon(take, "queued")
            await wait_all_tasks_blocked()
        # Released: the slot already belongs to the queued task, before it has run.
        assert limiter.in_flight == 1
        await take("newcomer")
    assert order == ["queued", "newcomer"]


# --- cancellation ------------------------------------------------------------------------------


async def test_a_cancelled_waiter_leaves_the_queue_without_a_slot() -> None:
    limiter, stats = make(1)
    scope = anyio.CancelScope()
    got: list[str] = []

    async def doomed() -> None:
        with scope:
            async with limiter.slot():
                got.append("doomed")

    async def later() -> None:
        async with limiter.slot():
            got.append("later")

    async with anyio.create_task_group() as tg:
        async with limiter.slot():
            tg.start_soon(doomed)
            await wait_all_tasks_blocked()
            tg.start_soon(later)
            await wait_all_tasks_blocked()
            scope.cancel()
            await wait_all_tasks_blocked()
            assert limiter.in_flight == 1  # only this holder
    assert got == ["later"]
    assert limiter.in_flight == 0 and stats.in_flight == 0
    async with limiter.slot():  # and the slot is free again at once
        assert limiter.in_flight == 1


async def test_a_waiter_cancelled_after_the_hand_off_passes_the_slot_on() -> None:
    # A plain asyncio task, so the cancellation lands while the hand-off is pending
    # (an anyio cancel scope waits for the woken task's next checkpoint instead).
    limiter, stats = make(1)
    got: list[str] = []

    async def take(name: str) -> None:
        async with limiter.slot():
            got.append(name)

    async with limiter.slot():
        doomed = asyncio.create_task(take("doomed"))
        await wait_all_tasks_blocked()
        later = asyncio.create_task(take("later"))
        await wait_all_tasks_blocked()
    assert limiter.in_flight == 1  # handed to `doomed`, which has not run yet
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    await later
    assert got == ["later"]
    assert limiter.in_flight == 0 and stats.in_flight == 0


# --- the adaptive limit ------------------------------------------------------------------------


async def test_a_burst_of_429s_halves_the_limit_once() -> None:
    limiter, stats = make(8)
    async with limiter.slot() as epoch:
        pass
    limiter.rate_limited(epoch)
    assert limiter.limit == 4 and stats.limit == 4
    for _ in range(5):
        limiter.rate_limited(epoch)  # the rest of the same burst
    assert limiter.limit == 4 and stats.limit == 4


async def test_each_new_epoch_can_halve_again_but_never_below_one() -> None:
    limiter, stats = make(8)
    seen = []
    for _ in range(6):
        async with limiter.slot() as epoch:
            pass
        limiter.rate_limited(epoch)
        seen.append(limiter.limit)
    assert seen == [4, 2, 1, 1, 1, 1]
    assert stats.limit == 1


def test_odd_limits_round_down_but_stay_positive() -> None:
    limiter, _ = make(7)
    limiter.rate_limited(limiter.epoch)
    assert limiter.limit == 3
    limiter.rate_limited(limiter.epoch)
    assert limiter.limit == 1


def test_successes_grow_the_limit_by_one_per_window() -> None:
    limiter, stats = make(8)
    limiter.rate_limited(limiter.epoch)
    assert limiter.limit == 4
    for _ in range(3):
        limiter.succeeded()
    assert limiter.limit == 4
    limiter.succeeded()
    assert limiter.limit == 5 and stats.limit == 5
    for _ in range(4):
        limiter.succeeded()
    assert limiter.limit == 5  # the window is now 5 long
    limiter.succeeded()
    assert limiter.limit == 6


def test_successes_never_grow_past_the_cap() -> None:
    limiter, stats = make(4)
    limiter.rate_limited(limiter.epoch)
    for _ in range(1000):
        limiter.succeeded()
    assert limiter.limit == 4 and stats.limit == 4


def test_a_429_breaks_the_streak_of_successes() -> None:
    limiter, _ = make(8)
    stale = limiter.epoch
    limiter.rate_limited(stale)
    assert limiter.limit == 4
    for _ in range(3):
        limiter.succeeded()
    limiter.rate_limited(stale)  # from the old burst: no shrink, but the streak restarts
    assert limiter.limit == 4
    for _ in range(3):
        limiter.succeeded()
    assert limiter.limit == 4
    limiter.succeeded()
    assert limiter.limit == 5


def test_a_429_from_before_a_growth_does_not_shrink() -> None:
    limiter, _ = make(8)
    limiter.rate_limited(limiter.epoch)
    before_growth = limiter.epoch
    for _ in range(4):
        limiter.succeeded()
    assert limiter.limit == 5
    limiter.rate_limited(before_growth)
    assert limiter.limit == 5


async def test_a_smaller_limit_holds_back_new_requests() -> None:
    limiter, _ = make(2)
    started: list[int] = []

    async def worker(i: int) -> None:
        async with limiter.slot():
            started.append(i)

    async with anyio.create_task_group() as tg:
        async with limiter.slot() as epoch:
            limiter.rate_limited(epoch)
            assert limiter.limit == 1
            tg.start_soon(worker, 1)
            await wait_all_tasks_blocked()
            assert started == []  # one in flight already fills the new limit
    assert started == [1]


async def test_growing_the_limit_wakes_a_waiter() -> None:
    limiter, _ = make(2)
    limiter.rate_limited(limiter.epoch)
    assert limiter.limit == 1
    entered = anyio.Event()
    leave = anyio.Event()

    async def waiter() -> None:
        async with limiter.slot():
            entered.set()
            await leave.wait()

    async with anyio.create_task_group() as tg:
        async with limiter.slot():
            tg.start_soon(waiter)
            await wait_all_tasks_blocked()
            assert not entered.is_set()
            limiter.succeeded()  # a window of 1 success: the limit grows to 2
            assert limiter.limit == 2
            await entered.wait()  # while the first slot is still held
            assert limiter.in_flight == 2
            leave.set()
    assert limiter.in_flight == 0
