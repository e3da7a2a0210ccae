"""``executor: ray``: a sharded run's shards as Ray tasks on a Ray cluster.

The Ray backend of engine.executors.sharded (which plans, drives, merges and
counts). It starts a local Ray cluster on loopback or joins one
(engine.executors.cluster), and runs each shard as one Ray task
(engine.executors.shard.run_shard). Ray retries a shard whose worker or node died
(``SHARD_RETRIES``); the retry resumes from the shard's journal. An error of the
shard itself (a disk full, a model down) is not retried: the run records it and
the next run retries it.

Caps: one small actor holds the run's ``QuotaServer`` (engine.executors.quota);
every running shard leases its share of each model's cap from it, and reports its
counters with each lease, which the driver reads for the progress display.

A SIGKILL of the driver takes its shard tasks with it (and a local cluster: the
cluster module ties it to the driver); the next run finds the done shards by their
markers and resumes the others from their journals.

Its keys of ``executor:``: ``address`` (None starts a local cluster on loopback for
this run and stops it at the end; ``auto`` or ``ray://host:10001`` joins a running
one) and ``num_cpus_per_shard``, besides the sharded ``shards`` and
``max_concurrent_shards`` (None: every shard at once).
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar

import anyio

from engine.executors.quota import QuotaServer
from engine.executors.registry import register
from engine.executors.sharded import (
    SHARDED_KEYS,
    ShardBackend,
    ShardedExecutor,
    ShardEnd,
    ShardJob,
    parse_sharded,
)
from engine.executors.shards import Plan
from engine.problems import Problems

SHARD_RETRIES = 3  # attempts after a worker or node died, per shard and run
_ADDRESS = re.compile(r"(ray://)?[A-Za-z0-9_.\[\]:-]+:\d+")


@dataclass(frozen=True, slots=True)
class RayOptions:
    shards: int = 8
    max_concurrent_shards: int | None = None
    address: str | None = None
    num_cpus_per_shard: float = 1.0


class RayBackend(ShardBackend):
    """Shards as Ray tasks, the quota in an actor."""

    def __init__(self, executor: RayExecutor) -> None:
        self.options: RayOptions = executor.options
        self.config = executor.config
        self.caps = {name: m.max_concurrency for name, m in self.config.models.items()}
        self.ray: Any = None
        self.quota: Any = None
        self.task: Any = None

    def place(self) -> AbstractContextManager[Any]:
        from engine.executors.cluster import ray_cluster

        return ray_cluster(self.options.address, num_cpus=None, work_dir=self.config.checkpoint_dir)

    async def start(self, group: Any) -> None:
        from engine.executors.cluster import import_ray
        from engine.executors.shard import run_shard

        self.ray = ray = import_ray()
        actor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(QuotaServer)
        self.quota = actor.remote(self.caps, time.time())
        self.task = ray.remote(run_shard).options(
            num_cpus=self.options.num_cpus_per_shard,
            max_retries=SHARD_RETRIES,
            retry_exceptions=False,
        )

    async def submit(self, job: ShardJob) -> Any:
        ray, quota = self.ray, self.quota

        def lease(shard: int, claims: dict[str, int], counters: dict[str, Any]) -> Any:
            return ray.get(quota.lease.remote(shard, claims, counters), timeout=30)

        return self.task.remote(
            job.config,
            job.piece,
            token=job.token,
            known_input=job.known_input,
            lease=lease,
            snapshot_every_rows=job.snapshot_every_rows,
        )

    async def wait(self, handles: list[Any], timeout_s: float) -> list[Any]:
        ready, _ = await anyio.to_thread.run_sync(
            lambda: self.ray.wait(handles, num_returns=1, timeout=timeout_s)
        )
        return list(ready)

    async def result(self, handle: Any) -> ShardEnd:
        ray = self.ray
        try:
            result = await anyio.to_thread.run_sync(ray.get, handle)
        except ray.exceptions.TaskCancelledError:
            return ShardEnd(cancelled=True)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            return ShardEnd(error=f"{type(cause).__name__}: {cause}")
        except ray.exceptions.RayError as exc:  # its worker or node died, retries spent
            return ShardEnd(error=f"{type(exc).__name__}: {exc}")
        return ShardEnd(progress=result["progress"])

    def cancel(self, handle: Any) -> None:
        self.ray.cancel(handle, force=True)

    async def counters(self) -> dict[int, dict[str, Any]] | None:
        ray = self.ray
        try:
            live: dict[int, dict[str, Any]] = await anyio.to_thread.run_sync(
                lambda: ray.get(self.quota.snapshot.remote(), timeout=10)
            )
        except ray.exceptions.RayError:
            return None  # the quota actor restarting
        return live

    async def release(self, index: int) -> None:
        await anyio.to_thread.run_sync(lambda: self.ray.get(self.quota.release.remote(index)))


@register
class RayExecutor(ShardedExecutor):
    """``executor: {kind: ray}``: the shards on a Ray cluster."""

    kind = "ray"
    keys: ClassVar[tuple[str, ...]] = (*SHARDED_KEYS, "address", "num_cpus_per_shard")

    @classmethod
    def parse(cls, p: Problems, body: Mapping[str, Any]) -> RayOptions:
        sharded = parse_sharded(p, body)
        address = body.get("address")
        if address is not None and not (
            isinstance(address, str)
            and (address in ("auto", "local") or _ADDRESS.fullmatch(address))
        ):
            p.add(
                "executor.address",
                "must be null (start a local cluster), auto, ray://HOST:10001 or HOST:6379; "
                f"got {address!r}",
            )
            address = None
        cpus = p.positive_float("executor.num_cpus_per_shard", body.get("num_cpus_per_shard"), 1.0)
        return RayOptions(
            shards=sharded.shards,
            max_concurrent_shards=sharded.max_concurrent_shards,
            address=address,
            num_cpus_per_shard=cpus,
        )

    def backend(self, plan: Plan) -> ShardBackend:
        return RayBackend(self)

    def where(self) -> str:
        return f"on {self.options.address or 'a local Ray cluster on 127.0.0.1'}"
