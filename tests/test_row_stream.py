"""The row stream between the feeder and the workers: refilled by halves."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
from anyio import wait_all_tasks_blocked
from anyio.lowlevel import checkpoint

from engine._runner import _send_rows, _Workers
from engine.input.base import Row


class _Ctx:
    stopping = False


async def _rows(count: int) -> AsyncIterator[Row]:
    for line in range(count):
        await checkpoint()
        yield Row(line, line, {"prompt": f"p{line}"})


def _take(receive: Any, pool: _Workers) -> Row:
    row: Row = receive.receive_nowait()
    pool.took()
    return row


async def test_a_full_stream_is_refilled_once_the_workers_took_half_of_it() -> None:
    send, receive = anyio.create_memory_object_stream[Row](4)
    async with anyio.create_task_group() as group:
        pool = _Workers(group, receive, 4, None, None, _Ctx())  # type: ignore[arg-type]
        pool.started = pool.most  # no workers: the test takes the rows itself
        group.start_soon(_send_rows, _rows(10), _Ctx(), send, pool)
        await wait_all_tasks_blocked()
        assert receive.statistics().current_buffer_used == 4 and pool.queued == 4

        assert _take(receive, pool).line == 0
        await wait_all_tasks_blocked()
        assert receive.statistics().current_buffer_used == 3  # not refilled for one row

        assert _take(receive, pool).line == 1
        await wait_all_tasks_blocked()
        assert receive.statistics().current_buffer_used == 4  # half taken: filled again
        taken = [_take(receive, pool).line for _ in range(4)]
        await wait_all_tasks_blocked()
        taken += [_take(receive, pool).line for _ in range(4)]
        assert taken == list(range(2, 10))  # in order, none lost or sent twice
        assert pool.queued == 0
        group.cancel_scope.cancel()
