"""How big and how many: the sizes and repeats of a full run and of ``--quick``, and how
long each suite of them should take.

A full run is sized to finish in about 35 minutes on a quiet 2-core machine (``estimate_s``
says how that splits over the suites), with every measured run long enough (several
seconds) that process start-up is a small part of it. Memory and resume are measured
once, up to 10^6 rows; ``with_big`` adds the 10^7-row run (about 20 minutes more, the
``--big`` flag). ``--quick`` is a smoke run of a few minutes: small sizes, one or two
repeats, no 10^6 run, and no peers unless their venv is already installed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

BIG_ROWS = 10_000_000  # the opt-in memory/resume size (``--big``)


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
    # cache (bench/cache.py): cache on against off at 0 ms; the cost (7-10% measured,
    # the target allows 5%) is smaller than one pair of runs varies by on this shared
    # machine (+-15%): more pairs
    cache_repeats: int
    caps_mock_uvloop: bool
    caps_null_writer: tuple[tuple[float, int], ...]  # points that also run bench.nullwriter
    caps_memory_rows: tuple[int, ...]  # memory against input size, in the same run
    caps_resume_rows: tuple[int, ...]  # of those, the sizes SIGKILLed and resumed
    # shards (bench/shards.py): one process against 1 and 2 Ray shards, 0 ms
    shard_rows: int
    shard_cap: int
    shard_repeats: int
    # chaos (bench/chaos.py): faults and SIGKILLs, the output compared with a clean run's
    chaos_turns: int
    chaos_kills: int
    # batch (bench/batch.py): single-turn inputs through batches of 50,000, one running
    batch_sizes: tuple[int, ...]
    report_repeats: int  # bench/report_write.py: report.html of a day's history


FULL = Plan(
    quick=False,
    repeats=5,
    overhead_single=20_000,
    overhead_multi=6_000,
    overhead_cap=64,
    latencies_ms=(50.0, 200.0),
    caps=(16, 64, 256, 1024),
    latency_seconds=3.0,
    latency_waves=15,  # 30 made the 200 ms runs 6 s each: 2 minutes more in all
    latency_repeats=1,
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
    peer_latency_rows=1_000,  # Distilabel runs 1,500 rows at 50 ms in 10-20 s a cap
    peer_repeats=1,
    peer_latency_repeats=1,
    install_peers=True,
    real_prompts=24,
    real_repeats=2,
    replica_counts=(1, 2, 4),
    replica_cap=32,
    replica_latency_ms=50.0,
    replica_seconds=5.0,
    replica_repeats=1,
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
    cache_repeats=6,  # 9 took 211 s of a run that then passed 40 minutes
    caps_mock_uvloop=True,
    caps_null_writer=((0.0, 64), (50.0, 16), (50.0, 1024)),
    # Memory and resume are measured once, by the memory/resume suite (memory_rows,
    # resume_rows above); caps would run the same runs again (and did, up to 10^7 rows:
    # 20 minutes), so it measures only its four systems here.
    caps_memory_rows=(),
    caps_resume_rows=(),
    shard_rows=60_000,
    shard_cap=512,
    shard_repeats=1,
    chaos_turns=10_000,
    chaos_kills=10,
    batch_sizes=(100_000, 1_000_000),
    report_repeats=15,
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
    cache_repeats=3,
    caps_mock_uvloop=True,
    caps_null_writer=((0.0, 64),),
    caps_memory_rows=(),
    caps_resume_rows=(),
    shard_rows=8_000,
    shard_cap=512,
    shard_repeats=1,
    chaos_turns=1_000,
    chaos_kills=3,
    batch_sizes=(10_000, 20_000),
    report_repeats=5,
)


def with_big(plan: Plan) -> Plan:
    """``plan`` with the 10^7-row memory and resume run added (``--big``)."""
    return replace(
        plan,
        memory_rows=(*plan.memory_rows, BIG_ROWS),
        resume_rows=(*plan.resume_rows, BIG_ROWS),
    )


# -- how long: a rough estimate of each suite on a quiet 2-core machine ------------
# Rates from the full runs of 2026-12 (bench/RESULTS.md then): Turnstile and the bare
# loop at 0 ms and cap 64 manage 6,000-10,000 turns/s, the memory runs (cap 1024,
# uvloop) about 9,000; a process's start and end cost about 0.6 s.
# Whole-process turns/s of this 2-core machine at 0 ms (measured 2026-12-06: the
# overhead, durability and memory suites took 1.6-2.8x what 8,000 and 9,000 gave).
_ZERO_RATE = 3_500.0
_BIG_RATE = 3_300.0
_START = 0.8


def _latency_s(plan: Plan) -> float:
    total = 0.0
    for latency_ms in plan.latencies_ms:
        for cap in plan.caps:
            ideal = cap / (latency_ms / 1000)
            turns = max(5 * cap, min(ideal, plan.cpu_rate) * plan.latency_seconds)
            if ideal <= plan.cpu_rate:
                turns = max(turns, plan.latency_waves * cap)
            # two shapes, two systems; CPU-bound runs reach about 3,500 turns/s
            total += 4 * (turns / min(0.9 * ideal, 3_500.0) + _START)
    return total * plan.latency_repeats


def _memory_s(plan: Plan) -> float:
    total = 0.0
    for n in sorted(set(plan.memory_rows) | set(plan.resume_rows)):
        total += n / _BIG_RATE + n * 5e-6 + _START  # the run, and writing its input
        if n in plan.resume_rows:
            total += 5.0 + n * (1 - plan.resume_kill_fraction) / _BIG_RATE
    return total


def _caps_s(plan: Plan) -> float:
    total = 0.0
    for latency_ms, cap in plan.caps_points:
        if latency_ms <= 0:
            turns, rate = plan.caps_zero_turns, 4_000.0
        else:
            ideal = cap / (latency_ms / 1000)
            rate = min(0.95 * ideal, 8_000.0)
            turns = int(max(5 * cap, min(ideal, plan.caps_rate) * plan.caps_seconds))
        systems = 5 if (latency_ms, cap) in plan.caps_null_writer else 4
        total += systems * plan.caps_repeats * (turns / rate + _START)
    big = replace(plan, memory_rows=plan.caps_memory_rows, resume_rows=plan.caps_resume_rows)
    return total + (_memory_s(big) if plan.caps_memory_rows else 0.0)


def _replicas_s(plan: Plan) -> float:
    per_run = plan.replica_seconds + 1.0 + _START
    scaling = len(plan.replica_counts) * plan.replica_repeats * per_run
    affinity = 4 * plan.replica_repeats * per_run  # on/off, equal and uneven latencies
    rate429 = 0.76 * plan.replica_cap / (plan.rate429_latency_ms / 1000)
    retries = 2 * plan.rate429_repeats * (plan.rate429_rows / rate429 + 1.0 + _START)
    outage = plan.outage_turns / 1_180 + plan.outage_s + 5.0
    return scaling + affinity + retries + outage


def _peers_s(plan: Plan) -> float:
    # Distilabel and Curator: about 250 single-turn and 150 multi-turn turns/s at 0 ms,
    # 200/s at 50 ms, and a few seconds to start each run.
    zero = 2 * (plan.peer_single / 250 + 3.5 * plan.peer_multi / 150) + 16 * 3.0
    latency = len(plan.peer_caps) * (2 * plan.peer_latency_rows / 200 + 4 * 3.0)
    return plan.peer_repeats * zero + plan.peer_latency_repeats * latency


def _zero_ab_s(plan: Plan, rate: float = _ZERO_RATE, repeats: int | None = None) -> float:
    """Two systems at 0 ms over ``caps_zero_turns``, ``repeats`` times (default
    ``caps_repeats + 2``)."""
    repeats = plan.caps_repeats + 2 if repeats is None else repeats
    return repeats * 2 * (plan.caps_zero_turns / rate + _START)


def estimate_s(plan: Plan, suite: str) -> float:
    """About how many seconds ``suite`` (a ``python -m bench --only`` name) takes."""
    single = plan.overhead_single / _ZERO_RATE
    multi = 3.5 * plan.overhead_multi / _ZERO_RATE
    seconds = {
        "overhead": plan.repeats * 2 * (single + multi + 2 * _START),
        "durability": plan.durability_repeats * 4 * (plan.durability_single / _ZERO_RATE + _START),
        "latency": _latency_s(plan),
        "peers": _peers_s(plan),
        "real": 40.0 + plan.real_repeats * 2 * (plan.real_prompts * 37 / 88 + _START),
        "memory": _memory_s(plan),
        "resume": _memory_s(plan),
        "replicas": _replicas_s(plan),
        "caps": _caps_s(plan),
        "shards": 10.0 + plan.shard_repeats * 3 * (plan.shard_rows / 10_000 + _START) + 13.0,
        "metrics": _zero_ab_s(plan),
        "checksums": _zero_ab_s(plan),
        "reasoning": _zero_ab_s(plan, 3_000.0) + (12_000 if plan.quick else 110_000) / 2_500,
        "startup": 20.0 + (2 if plan.quick else max(3, plan.repeats)) * 12.0,
        "simulate": 5.0 + (1 if plan.quick else 3) * (4 if plan.quick else 19.0),
        # ~250 us a row (10^5 rows: 24 s), each size once, and the first again at 2 batches
        "batch": 250e-6 * (sum(plan.batch_sizes) + plan.batch_sizes[0]) + 10.0,
        "judging": (2 if plan.quick else 3) * 4 * (1_000 if plan.quick else 5_000) / 1_000,
        # 0 ms pairs, the rerun and the estimate, then 50 ms pairs of 4,000 rows (1,000 quick)
        "cache": _zero_ab_s(plan, repeats=plan.cache_repeats)
        + (6 if plan.quick else 20)
        + (2 if plan.quick else 6) * ((1_000 if plan.quick else 4_000) / 1_280 + _START),
        "report": 5.0,
        "chaos": plan.chaos_turns / 200 + plan.chaos_kills,
    }
    return seconds[suite]
