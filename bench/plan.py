"""How big and how many: the sizes and repeats of a full run and of ``--quick``.

A full run is sized to finish in about 30 minutes on a 2-core machine, with every
measured run long enough (several seconds) that process start-up is a small part of
it. ``--quick`` is a smoke run of about two minutes: small sizes, one or two repeats,
no 10^6 run, and no peers unless their venv is already installed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Plan:
    quick: bool
    repeats: int  # interleaved repeats of each A/B comparison
    overhead_single: int  # prompts, 0 ms
    overhead_multi: int  # conversations of 1-6 turns, 0 ms
    overhead_cap: int
    latencies_ms: tuple[float, ...]
    caps: tuple[int, ...]
    latency_seconds: float  # aim for runs this long in the latency grid...
    latency_waves: int  # ...and at least this many rounds of `cap` requests
    latency_repeats: int
    cpu_rate: float  # turns/s this machine manages at most (sizes CPU-bound runs)
    durability_single: int
    durability_repeats: int
    memory_rows: tuple[int, ...]
    memory_cap: int
    resume_kill_fraction: float  # SIGKILL the resumed runs once this much is written
    resume_rows: tuple[int, ...]  # sizes (of memory_rows) SIGKILLed near the end, resumed
    peer_single: int
    peer_multi: int
    peer_caps: tuple[int, ...]  # Distilabel at 50 ms, single-turn
    peer_latency_rows: int
    peer_repeats: int
    peer_latency_repeats: int
    install_peers: bool
    real_prompts: int
    real_repeats: int
    replica_counts: tuple[int, ...]  # replicas in the scaling runs (multi-turn)
    replica_cap: int  # max_concurrency of each replica
    replica_latency_ms: float
    replica_seconds: float  # scaling and affinity runs sized for this long at the ideal rate
    replica_repeats: int
    affinity_replicas: int
    rate429_rows: int  # single-turn rows against a mock answering 2% with 429
    rate429_latency_ms: float
    rate429_repeats: int
    outage_turns: int  # multi-turn run whose 2 replicas are SIGKILLed a third of the way in
    outage_s: float  # ...and restarted this long after
    # caps (bench/caps.py): four systems side by side; about 7 minutes in a full run
    caps_points: tuple[tuple[float, int], ...]  # (mock latency ms, cap), single-turn
    caps_repeats: int
    caps_seconds: float  # runs sized for this long at the point's rate...
    caps_rate: float  # ...taken as at most this (turns/s) where the cap allows more
    caps_zero_turns: int  # turns of the 0 ms runs
    caps_mock_uvloop: bool
    caps_null_writer: tuple[tuple[float, int], ...]  # points that also run bench.nullwriter
    caps_memory_rows: tuple[int, ...]  # memory against input size, in the same run
    caps_resume_rows: tuple[int, ...]  # of those, the sizes SIGKILLed and resumed
    # shards (bench/shards.py): one process against 1 and 2 Ray shards, 0 ms
    shard_rows: int
    shard_cap: int
    shard_repeats: int


FULL = Plan(
    quick=False,
    repeats=5,
    overhead_single=20_000,
    overhead_multi=6_000,
    overhead_cap=64,
    latencies_ms=(50.0, 200.0),
    caps=(16, 64, 256, 1024),
    latency_seconds=3.0,
    latency_waves=30,
    latency_repeats=2,
    cpu_rate=2_500.0,
    durability_single=20_000,
    durability_repeats=3,
    memory_rows=(10_000, 100_000, 1_000_000),
    memory_cap=1024,
    resume_kill_fraction=0.99,
    resume_rows=(1_000_000,),
    peer_single=3_000,
    peer_multi=600,
    peer_caps=(16, 64, 256),
    peer_latency_rows=1_500,
    peer_repeats=2,
    peer_latency_repeats=1,
    install_peers=True,
    real_prompts=24,
    real_repeats=3,
    replica_counts=(1, 2, 4),
    replica_cap=32,
    replica_latency_ms=50.0,
    replica_seconds=8.0,
    replica_repeats=2,
    affinity_replicas=3,
    rate429_rows=4_000,
    rate429_latency_ms=40.0,
    rate429_repeats=3,
    outage_turns=12_000,
    outage_s=10.0,
    caps_points=((0.0, 64), (50.0, 16), (50.0, 64), (50.0, 256), (50.0, 512), (50.0, 1024)),
    caps_repeats=3,
    caps_seconds=2.5,
    caps_rate=6_000.0,
    caps_zero_turns=20_000,
    caps_mock_uvloop=True,
    caps_null_writer=((0.0, 64), (50.0, 16), (50.0, 1024)),
    caps_memory_rows=(10_000, 100_000, 1_000_000, 10_000_000),
    caps_resume_rows=(1_000_000, 10_000_000),
    shard_rows=60_000,
    shard_cap=512,
    shard_repeats=2,
)

QUICK = Plan(
    quick=True,
    repeats=2,
    overhead_single=3_000,
    overhead_multi=1_000,
    overhead_cap=64,
    latencies_ms=(50.0, 200.0),
    caps=(16, 64, 256, 1024),
    latency_seconds=1.0,
    latency_waves=5,
    latency_repeats=1,
    cpu_rate=2_500.0,
    durability_single=3_000,
    durability_repeats=1,
    memory_rows=(10_000, 100_000),
    memory_cap=1024,
    resume_kill_fraction=0.99,
    resume_rows=(100_000,),
    peer_single=1_000,
    peer_multi=150,
    peer_caps=(64,),
    peer_latency_rows=500,
    peer_repeats=1,
    peer_latency_repeats=1,
    install_peers=False,
    real_prompts=8,
    real_repeats=1,
    replica_counts=(1, 2, 4),
    replica_cap=32,
    replica_latency_ms=50.0,
    replica_seconds=2.0,
    replica_repeats=1,
    affinity_replicas=3,
    rate429_rows=1_000,
    rate429_latency_ms=40.0,
    rate429_repeats=1,
    outage_turns=4_000,
    outage_s=4.0,
    caps_points=((0.0, 64), (50.0, 16), (50.0, 256), (50.0, 1024)),
    caps_repeats=1,
    caps_seconds=1.0,
    caps_rate=6_000.0,
    caps_zero_turns=5_000,
    caps_mock_uvloop=True,
    caps_null_writer=((0.0, 64),),
    caps_memory_rows=(10_000, 30_000),
    caps_resume_rows=(30_000,),
    shard_rows=8_000,
    shard_cap=512,
    shard_repeats=1,
)
