"""The shared cap of a sharded run: leases never add up past it, and the tail gets it all."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from engine.executors.quota import RECOVERY_S, Quota


@dataclass
class Shard:
    index: int
    limit: int = 0  # the grant it applied last
    in_flight: int = 0
    pending: dict[str, int] | None = None  # a lease answer not applied yet

    def claim(self) -> dict[str, int]:
        return {"m": max(self.limit, self.in_flight)}


def test_fair_shares_with_the_remainder_to_the_lowest_shards() -> None:
    quota = Quota(caps={"m": 10})
    for shard in (0, 1, 2):
        quota.lease(shard, {"m": 0}, now=0)
    assert [quota.lease(s, {"m": 0}, now=1)["m"] for s in (0, 1, 2)] == [4, 3, 3]
    assert quota.held("m") == 10


def test_a_finished_shard_hands_its_share_on() -> None:
    quota = Quota(caps={"m": 8})
    quota.lease(0, {"m": 0}, now=0)
    quota.lease(1, {"m": 0}, now=0)
    assert quota.lease(0, {"m": 8}, now=1)["m"] == 4  # two running: half each
    assert quota.lease(0, {"m": 4}, now=2)["m"] == 4
    assert quota.lease(1, {"m": 0}, now=2)["m"] == 4
    quota.release(1)
    assert quota.lease(0, {"m": 4}, now=3)["m"] == 8  # the tail runs at the whole cap


def test_a_newcomer_gets_only_what_the_others_let_go_of() -> None:
    quota = Quota(caps={"m": 6})
    assert quota.lease(0, {"m": 0}, now=0)["m"] == 6
    assert quota.lease(1, {"m": 0}, now=0)["m"] == 0  # shard 0 still holds all six
    assert quota.lease(0, {"m": 6}, now=1)["m"] == 3  # told to shrink...
    assert quota.lease(1, {"m": 0}, now=1)["m"] == 0  # ...but it has not yet
    assert quota.lease(0, {"m": 3}, now=2)["m"] == 3  # now it is under its share
    assert quota.lease(1, {"m": 0}, now=2)["m"] == 3


def test_models_it_does_not_know_get_nothing() -> None:
    assert Quota(caps={"m": 4}).lease(0, {"other": 3}, now=0) == {}


def test_a_restarted_quota_grants_no_more_than_claimed_until_everyone_reported() -> None:
    quota = Quota(caps={"m": 8}, started=100.0, recovering=True)
    assert quota.lease(0, {"m": 4}, now=100.5)["m"] == 4  # not the 8 it would get alone
    assert quota.lease(1, {"m": 4}, now=100.6)["m"] == 4
    assert quota.lease(0, {"m": 4}, now=100 + RECOVERY_S)["m"] == 4
    quota.release(1)
    assert quota.lease(0, {"m": 4}, now=100 + RECOVERY_S + 1)["m"] == 8


@pytest.mark.parametrize("seed", range(30))
def test_in_flight_never_adds_up_past_the_cap_whatever_the_timing(seed: int) -> None:
    rng = random.Random(seed)
    cap = rng.choice([1, 3, 8, 64])
    quota = Quota(caps={"m": cap})
    shards = [Shard(i) for i in range(rng.randint(1, 6))]
    live = list(shards)
    now = 0.0
    for _ in range(3000):
        now += rng.random() / 10
        shard = rng.choice(live)
        event = rng.random()
        if event < 0.25 and shard.pending is None:
            shard.pending = quota.lease(shard.index, shard.claim(), now)
        elif event < 0.45 and shard.pending is not None:
            shard.limit, shard.pending = shard.pending["m"], None
        elif event < 0.75:
            shard.in_flight += rng.randint(0, max(0, shard.limit - shard.in_flight))
        elif event < 0.995:
            shard.in_flight -= rng.randint(0, shard.in_flight)
        elif len(live) > 1 and shard.pending is None:
            shard.in_flight = 0  # finished: its requests are done
            quota.release(shard.index)
            live.remove(shard)
        assert sum(s.in_flight for s in shards) <= cap
        assert quota.held("m") <= cap

    # Quiet now: a few rounds of leases settle on the fair shares of what is left.
    for _ in range(3):
        for shard in live:
            shard.in_flight = min(shard.in_flight, shard.limit)
            if shard.pending is not None:
                shard.limit, shard.pending = shard.pending["m"], None
            shard.limit = quota.lease(shard.index, shard.claim(), now)["m"]
            shard.in_flight = min(shard.in_flight, shard.limit)
    assert sum(s.limit for s in live) == cap
    assert max(s.limit for s in live) - min(s.limit for s in live) <= 1
