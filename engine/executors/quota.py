"""One model's cap shared by the shards of a run: leases that never add up past it.

``max_concurrency`` is a per-replica cap for the whole run, however many shards
run at once on however many machines. Each running shard leases its share from
one ``Quota`` (a ``QuotaServer`` in a small Ray actor, or in the processes
executor's driver) every second
or so, and sets its replica pools to it; a shard that finishes releases its
share, and the others take it over at their next lease, so the tail of a run is
not left at a fraction of the cap.

Why leases and not a static split: ``cap // shards`` is simple, but once shards
start finishing, the last ones run at a fraction of the cap for as long as they
take (the slowest shard decides the run's end). And why not a semaphore actor per
request: that is ~2 ms and one actor call per request, a ceiling of ~700
requests/s (measured here, shared/design/ray.md).

The rule that keeps the sum under the cap, whatever the timing: a shard reports
a *claim*, ``max(its current limit, its requests in flight)``, which bounds what
it can have in flight until it applies the answer. The quota records
``holding = max(grant, claim)`` and grants at most ``cap - sum(others' holdings)``.
A shrinking shard keeps holding its old share until its next lease shows it
under the new one; a growing shard gets only what the others have let go of.
Targets are fair shares of the running shards (``cap // n``, the remainder to the
lowest shard numbers).

After the actor restarts (its state is gone) it grants no more than a shard
already claims for ``RECOVERY_S``, long enough for every running shard to report.
``Quota`` is pure state (the clock is passed in); ``QuotaServer`` reads the clock.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

LEASE_S = 1.0  # how often a shard leases at its share
WAITING_LEASE_S = 0.2  # how often while it holds less than its fair share
RECOVERY_S = 3 * LEASE_S


@dataclass(slots=True)
class Quota:
    """Shares of each model's cap among running shards."""

    caps: Mapping[str, int]  # model -> per-replica cap for the whole run
    started: float = 0.0  # when this quota was created (a restarted actor: recently)
    recovering: bool = False
    holdings: dict[str, dict[int, int]] = field(default_factory=dict)  # model -> shard -> n
    running: set[int] = field(default_factory=set)

    def lease(self, shard: int, claims: Mapping[str, int], now: float) -> dict[str, int]:
        """The shard's share of each model it claims for, given what it claims now."""
        self.running.add(shard)
        grants = {}
        for model, claim in claims.items():
            cap = self.caps.get(model)
            if cap is None:
                continue
            holding = self.holdings.setdefault(model, {})
            others = sum(n for s, n in holding.items() if s != shard)
            grant = max(0, min(self.target(shard, cap), cap - others))
            if self.recovering and now - self.started < RECOVERY_S:
                grant = min(grant, claim)
            holding[shard] = max(grant, claim)
            grants[model] = grant
        return grants

    def release(self, shard: int) -> None:
        """The shard is finished (or failed): its share goes to the others."""
        self.running.discard(shard)
        for holding in self.holdings.values():
            holding.pop(shard, None)

    def target(self, shard: int, cap: int) -> int:
        """The shard's fair share of ``cap`` among the running shards."""
        order = sorted(self.running)
        if shard not in self.running:
            return 0
        base, extra = divmod(cap, len(order))
        return base + (1 if order.index(shard) < extra else 0)

    def held(self, model: str) -> int:
        """The sum of the holdings of ``model``: never more than its cap."""
        return sum(self.holdings.get(model, {}).values())


class QuotaServer:
    """The quota as a sharded run's driver serves it: leases, and each shard's counters
    as it reported them with its last lease (what the driver shows). Ray holds one in
    an actor (num_cpus 0, restarted for ever); the processes executor in the driver."""

    def __init__(self, caps: dict[str, int], created: float) -> None:
        # Constructed again after a crash: then it is late, and it must not grant
        # what it cannot know is free until every shard has told it what it holds.
        restarted = time.time() - created > 5.0
        self.quota = Quota(caps=caps, started=time.monotonic(), recovering=restarted)
        self.progress: dict[int, dict[str, Any]] = {}

    def lease(
        self, shard: int, claims: dict[str, int], counters: dict[str, Any]
    ) -> tuple[dict[str, int], float]:
        self.progress[shard] = counters
        grants = self.quota.lease(shard, claims, time.monotonic())
        short = any(
            grant < self.quota.target(shard, self.quota.caps[model])
            for model, grant in grants.items()
        )
        return grants, WAITING_LEASE_S if short else LEASE_S

    def release(self, shard: int, counters: dict[str, Any] | None = None) -> None:
        self.quota.release(shard)
        if counters is not None:
            self.progress[shard] = counters

    def snapshot(self) -> dict[int, dict[str, Any]]:
        return dict(self.progress)
