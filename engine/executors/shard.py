"""One shard of a sharded run: the single-process engine on its slice, wherever the
executor's backend runs it (a Ray worker, a local process).

A shard is a run like any other (engine._runner), with its own checkpoint under
``checkpoint_dir/shards/NNNN/``, reading only its slice of the input, and with its
caps leased from the run's quota (engine.executors.quota) instead of taken whole:
its pools start at 0 and take the share each lease grants. Nothing here imports
Ray: the lease is a blocking call handed in (an actor method, in a Ray worker; a
request to the driver down a pipe, in a local process).

A retried shard (its worker or node died) resumes from its journal, as a rerun of
a local run does. When it finishes, it writes its done marker.
"""

from __future__ import annotations

import functools
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio

from engine import progress
from engine._runner import execute, prepare, run_loop
from engine.checkpoint.snapshotter import SNAPSHOT_EVERY_ROWS
from engine.config import RunConfig
from engine.errors import ExecutorError
from engine.executors.shards import check_storage, mark_done, shard_config
from engine.http.endpoint import ModelEndpoint
from engine.input.sources import Slice
from engine.stats import RunStats, progress_of

log = logging.getLogger("turnstile")


# (shard, claims per model, progress) -> (share per model, seconds to the next lease)
LeaseCall = Callable[[int, dict[str, int], dict[str, Any]], tuple[dict[str, int], float]]


@dataclass(slots=True)
class Lease:
    """A shard's share of each model's cap, leased from the run's quota while it runs."""

    index: int
    call: LeaseCall
    clients: dict[str, ModelEndpoint] | None = None
    stats: RunStats | None = None
    next_s: float = 1.0

    async def start(self, clients: dict[str, ModelEndpoint], stats: RunStats) -> None:
        self.clients, self.stats = clients, stats
        for client in clients.values():
            # Nothing goes out before the first share, but that is no limit of 0 to show
            # (the driver's first progress line did): no limit until a lease grants one.
            client.set_share(None)
        for _ in range(60):  # a quota that is not there yet: keep asking, a while
            if await self._lease():
                return
            await anyio.sleep(self.next_s)
        raise ExecutorError(f"shard {self.index}: the run's quota does not answer; rerun")

    async def run(self) -> None:
        while True:
            await anyio.sleep(self.next_s)
            await self._lease()

    async def _lease(self) -> bool:
        assert self.clients is not None and self.stats is not None
        # What each may have in flight on any replica until it applies its next share.
        claims = {name: client.statistics().claim for name, client in self.clients.items()}
        try:
            grants, self.next_s = await anyio.to_thread.run_sync(
                self.call, self.index, claims, progress_of(self.stats)
            )
        except Exception as exc:  # the quota actor restarting: keep the shares we have
            log.warning(f"shard {self.index}: lease failed ({exc}); keeping its current shares")
            self.next_s = 1.0
            return False
        for name, share in grants.items():
            self.clients[name].set_share(share)
        return True


def run_shard(
    config: RunConfig,
    piece: Slice,
    *,
    token: str,
    known_input: dict[str, Any],
    lease: LeaseCall | None,
    snapshot_every_rows: int = SNAPSHOT_EVERY_ROWS,
) -> dict[str, Any]:
    """Run (or resume) one shard to its end; its counts and its final counters.

    Raises what the run raises (a TurnstileError: the shard failed, and is recorded
    as failed by the driver).
    """
    check_storage(config.checkpoint_dir, token, socket.gethostname())
    shard = shard_config(config, piece)
    task = shard.kind.build(shard)
    lock, state, resumed, source = prepare(shard, fresh=False, known_input=known_input)
    try:
        display = progress.Display(shard.progress_interval_s, live=False, quiet=True)
        companion = Lease(piece.index, lease) if lease else None
        main = functools.partial(
            execute,
            shard,
            task,
            state,
            source=source,
            resumed=resumed,
            display=display,
            companion=companion,
            snapshot_every_rows=snapshot_every_rows,
        )
        outcome = run_loop(main, uvloop=shard.uvloop)
    finally:
        lock.close()
    stats = outcome.stats
    counts = {
        "ok": stats.rows_done - stats.rows_failed - stats.rows_filtered,
        "failed": stats.rows_failed,
        "filtered": stats.rows_filtered,
        "rows": stats.rows_done,
    }
    mark_done(config.checkpoint_dir, piece.index, counts)
    return {"counts": counts, "progress": progress_of(stats)}
