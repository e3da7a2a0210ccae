"""``executor: {kind: threads}``, test-only: a sharded run's shards as threads of the driver.

Written against the executor seam alone (engine.executors.sharded's ShardedExecutor
and ShardBackend, engine.executors.shard.run_shard, engine.executors.quota's
QuotaServer): the size of a new job-array backend. It cannot stop a running
thread, so a stopped run waits for its shards to end (fine for a test).
"""

from __future__ import annotations

import functools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import anyio
from anyio.abc import TaskGroup

from engine.errors import TurnstileError
from engine.executors.quota import QuotaServer
from engine.executors.shard import run_shard
from engine.executors.sharded import ShardBackend, ShardedExecutor, ShardEnd, ShardJob
from engine.executors.shards import Plan


@dataclass(eq=False)
class Handle:
    index: int
    ended: anyio.Event = field(default_factory=anyio.Event)
    result: dict[str, Any] | None = None
    error: str | None = None


class ThreadBackend(ShardBackend):
    def __init__(self, caps: dict[str, int]) -> None:
        self.quota = QuotaServer(caps, time.time())
        self.lock = threading.Lock()  # leases come from the shards' threads
        self.changed = anyio.Event()
        self.group: TaskGroup | None = None
        self.submitted: list[int] = []

    async def start(self, group: TaskGroup) -> None:
        self.group = group

    async def submit(self, job: ShardJob) -> Handle:
        assert self.group is not None
        handle = Handle(job.piece.index)
        self.submitted.append(job.piece.index)
        self.group.start_soon(self._run, handle, job)
        return handle

    async def _run(self, handle: Handle, job: ShardJob) -> None:
        def lease(shard: int, claims: dict[str, int], counters: dict[str, Any]) -> Any:
            with self.lock:
                return self.quota.lease(shard, claims, counters)

        shard = functools.partial(
            run_shard,
            job.config,
            job.piece,
            token=job.token,
            known_input=job.known_input,
            lease=lease,
            snapshot_every_rows=job.snapshot_every_rows,
        )
        try:
            handle.result = await anyio.to_thread.run_sync(shard)
        except TurnstileError as exc:
            handle.error = f"{type(exc).__name__}: {exc}"
        handle.ended.set()
        self.changed.set()

    async def wait(self, handles: list[Any], timeout_s: float) -> list[Any]:
        with anyio.move_on_after(timeout_s):
            while not any(h.ended.is_set() for h in handles):
                await self.changed.wait()
                self.changed = anyio.Event()
        return [h for h in handles if h.ended.is_set()]

    async def result(self, handle: Any) -> ShardEnd:
        if handle.error is not None:
            return ShardEnd(error=handle.error)
        return ShardEnd(progress=handle.result["progress"])

    def cancel(self, handle: Any) -> None:
        pass  # a thread cannot be stopped from outside: it runs to its end

    async def counters(self) -> dict[int, dict[str, Any]] | None:
        with self.lock:
            return self.quota.snapshot()

    async def release(self, index: int) -> None:
        with self.lock:
            self.quota.release(index)


class ThreadsExecutor(ShardedExecutor):
    kind = "threads"
    backends: ClassVar[list[ThreadBackend]] = []  # what each run submitted, for the tests

    def backend(self, plan: Plan) -> ShardBackend:
        backend = ThreadBackend({n: m.max_concurrency for n, m in self.config.models.items()})
        self.backends.append(backend)
        return backend

    def where(self) -> str:
        return "as threads of this process"
