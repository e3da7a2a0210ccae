"""Sharded runs on a real local Ray cluster (``executor: ray``), against the mock server.

Marked ``ray``: they start Ray, so they run inside a loopback-only network
namespace (``make test`` does it; tests/ray_support.py skips them elsewhere).
Every run here starts its own local cluster and stops it, as `turnstile run` does.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from engine.checkpoint.journal import segments
from engine.executors.shards import read_plan, shard_dir
from engine.testing.mock_server import MockServer
from tests.conftest import (
    Proc,
    conversations,
    kill_after,
    read_jsonl,
    start_turnstile,
    turnstile,
    write_config,
    write_jsonl,
)
from tests.ray_support import require_loopback_only
from tests.test_distill_run import expected_turns

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


@pytest.fixture(autouse=True)
def _isolated() -> None:
    require_loopback_only()


def ray_config(
    folder: Path, mock: MockServer, *, cap: int = 8, shards: int = 4, **extra: Any
) -> str:
    executor = {
        "kind": "ray",
        "shards": shards,
        "num_cpus_per_shard": 0.5,
        **extra.pop("executor", {}),
    }
    return str(write_config(folder, mock.base_url, cap=cap, executor=executor, **extra))


async def reference(folder: Path, mock: MockServer, source: list[Any]) -> list[dict[str, Any]]:
    """A single-process run's rows, in input order."""
    folder.mkdir()
    write_jsonl(folder / "in.jsonl", source)
    done = await turnstile("run", str(write_config(folder, mock.base_url)), "--quiet")
    assert done.returncode == 0, done.stderr
    order = {row["id"]: i for i, row in enumerate(source)}
    return sorted(read_jsonl(folder / "out" / "distilled.jsonl"), key=lambda r: order[r["id"]])


async def kill_shard_worker(mock: MockServer, folder: Path, *, replies: int) -> int:
    """SIGKILL the worker running the shard in ``folder`` once its journal holds
    ``replies`` replies (looked at every 5 requests the mock sees); its pid."""
    seen = 0
    while True:
        seen += 5
        await mock.wait_for_requests(seen)
        if sum(_replies(path) for _, path in segments(folder)) >= replies:
            pid = holder(folder)
            os.kill(pid, signal.SIGKILL)
            return pid


def _replies(segment: Path) -> int:
    try:
        return segment.read_bytes().count(b'"k":"t"')
    except FileNotFoundError:  # dropped by a snapshot since it was listed
        return 0


def holder(checkpoint: Path) -> int:
    """The process holding ``checkpoint``'s lock (or that held it last): ``pid N``."""
    return int((checkpoint / "lock").read_text().split()[1])


def repeated(mock: MockServer) -> int:
    return sum(n - 1 for n in mock.stats.requests_by_key.values() if n > 1)


async def test_four_shards_give_the_single_process_rows_in_input_order(
    tmp_path: Path, mock: MockServer
) -> None:
    source = conversations(120, max_turns=4)
    want = await reference(tmp_path / "reference", mock, source)
    mock.reset()
    write_jsonl(tmp_path / "in.jsonl", source)
    config = ray_config(tmp_path, mock)

    done = await turnstile("run", config)

    assert done.returncode == 0, done.stderr
    assert read_jsonl(tmp_path / "out" / "distilled.jsonl") == want  # in input order
    assert len(mock.stats.requests_by_key) == sum(expected_turns(s) for s in source)
    assert repeated(mock) == 0
    plan = read_plan(tmp_path / "ck")
    assert plan is not None and len(plan.shards) == 4
    listing = await stdout("status", config)
    assert "shards:     4 (4 done)" in listing
    assert all(f"shard {i:04d}: done" in listing for i in range(4))


async def test_the_cap_holds_across_shards_and_the_tail_gets_all_of_it(
    tmp_path: Path, mock: MockServer
) -> None:
    mock.latency_ms = 20
    source = [{"id": f"r{i}", "prompt": f"question {i}"} for i in range(600)]
    write_jsonl(tmp_path / "in.jsonl", source)
    config = ray_config(tmp_path, mock, cap=6, shards=4)

    done = await turnstile("run", config, "--quiet")

    assert done.returncode == 0, done.stderr
    assert mock.stats.peak_in_flight <= 6
    assert mock.stats.peak_in_flight >= 4  # the shards together ran near the cap
    assert len(read_jsonl(tmp_path / "out" / "distilled.jsonl")) == 600


async def test_a_shard_running_alone_gets_the_whole_cap(tmp_path: Path, mock: MockServer) -> None:
    # One shard at a time: each runs at the whole cap, not at cap / shards.
    mock.latency_ms = 20
    write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": f"q {i}"} for i in range(300)])
    config = ray_config(tmp_path, mock, cap=6, shards=3, executor={"max_concurrent_shards": 1})

    done = await turnstile("run", config, "--quiet")

    assert done.returncode == 0, done.stderr
    assert mock.stats.peak_in_flight == 6
    assert len(read_jsonl(tmp_path / "out" / "distilled.jsonl")) == 300


async def test_a_worker_killed_mid_shard_is_retried_from_its_journal(
    tmp_path: Path, mock: MockServer
) -> None:
    source = conversations(120, max_turns=4)
    want = await reference(tmp_path / "reference", mock, source)
    mock.reset()
    mock.latency_ms = 5
    write_jsonl(tmp_path / "in.jsonl", source)
    config = ray_config(tmp_path, mock, cap=4)
    folder = shard_dir(tmp_path / "ck", 1)

    run = await start_turnstile("run", config, "--quiet")
    killer = asyncio.ensure_future(kill_shard_worker(mock, folder, replies=15))
    exited = asyncio.ensure_future(run.wait())
    finished, _ = await asyncio.wait({killer, exited}, return_when=asyncio.FIRST_COMPLETED)
    assert killer in finished, "the run ended before shard 1's worker could be killed"
    killed = killer.result()
    (folder / ".test-killed").touch()
    _, err = await run.communicate()
    done = Proc(run.returncode, err.decode())

    assert done.returncode == 0, done.stderr
    assert (shard_dir(tmp_path / "ck", 1) / ".test-killed").exists()
    assert holder(folder) != killed  # the shard finished in another worker
    assert read_jsonl(tmp_path / "out" / "distilled.jsonl") == want
    assert repeated(mock) <= 4  # at most what was in flight in the killed worker


async def test_a_driver_sigkilled_twice_resumes_exactly(tmp_path: Path, mock: MockServer) -> None:
    source = conversations(160, max_turns=4)
    want = await reference(tmp_path / "reference", mock, source)
    mock.reset()
    mock.latency_ms = 10
    write_jsonl(tmp_path / "in.jsonl", source)
    cap = 4
    config = ray_config(tmp_path, mock, cap=cap)
    for at in (60, 200):
        killed = await kill_after(mock, at, "run", config, "--quiet")
        assert killed.returncode == -signal.SIGKILL

    done = await turnstile("run", config, "--quiet")

    assert done.returncode == 0, done.stderr
    assert read_jsonl(tmp_path / "out" / "distilled.jsonl") == want
    assert len(mock.stats.requests_by_key) == sum(expected_turns(s) for s in source)
    assert repeated(mock) <= 2 * cap  # only what was in flight at each kill


async def test_a_failing_shard_is_recorded_the_others_finish_and_a_rerun_retries_it(
    tmp_path: Path, mock: MockServer
) -> None:
    source = conversations(80, max_turns=3)
    want = await reference(tmp_path / "reference", mock, source)
    mock.reset()
    write_jsonl(tmp_path / "in.jsonl", source)
    config = ray_config(tmp_path, mock)
    broken = shard_dir(tmp_path / "ck", 2) / "manifest.json"
    broken.parent.mkdir(parents=True)
    broken.write_text("{not json")  # shard 2 cannot read its checkpoint

    first = await turnstile("run", config, "--quiet")

    assert first.returncode == 3, first.stderr
    assert "shard 2 failed" in first.stderr
    assert "unreadable manifest" in (shard_dir(tmp_path / "ck", 2) / "error.txt").read_text()
    assert all((shard_dir(tmp_path / "ck", i) / "done.json").exists() for i in (0, 1, 3))
    assert not (tmp_path / "out" / "distilled.jsonl").exists()  # no merge with a shard missing
    listing = await stdout("status", config)
    assert "shard 0002: failed" in listing and "shard 0001: done" in listing

    broken.unlink()
    rerun = await turnstile("run", config, "--quiet")

    assert rerun.returncode == 0, rerun.stderr
    assert read_jsonl(tmp_path / "out" / "distilled.jsonl") == want
    assert repeated(mock) == 0  # the finished shards were not run again


async def test_the_shard_count_is_fixed_by_the_first_run(tmp_path: Path, mock: MockServer) -> None:
    write_jsonl(tmp_path / "in.jsonl", conversations(20))
    config = ray_config(tmp_path, mock, shards=2)
    assert (await turnstile("run", config, "--quiet")).returncode == 0

    changed = await turnstile("run", config, "--quiet", "--shards", "3")
    assert changed.returncode == 2
    assert "executor.shards: 2" in changed.stderr
    local = await turnstile("run", config, "--quiet", "--executor", "local")
    assert local.returncode == 2
    assert "sharded run" in local.stderr


async def stdout(*args: str) -> str:
    proc = await start_turnstile(*args)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return bytes(out).decode()


async def test_engine_run_drives_a_sharded_run_from_python(
    tmp_path: Path, mock: MockServer
) -> None:
    import anyio

    import engine

    write_jsonl(tmp_path / "in.jsonl", conversations(30))
    config = ray_config(tmp_path, mock, shards=2)

    summary = await anyio.to_thread.run_sync(engine.run, config)

    assert (summary.rows_ok, summary.rows_failed) == (30, 0)
    assert summary.output == tmp_path / "out" / "distilled.jsonl"
    assert len(read_jsonl(summary.output)) == 30


async def test_the_driver_serves_every_shards_metrics_and_keeps_the_history(
    tmp_path: Path, mock: MockServer
) -> None:
    import aiohttp
    import anyio
    import orjson

    from engine.history import HISTORY_NAME
    from tests.test_metrics_run import metrics_url, scraped, value

    mock.hold = "HOLD ME"
    rows = [{"id": f"r{i}", "prompt": f"question {i}"} for i in range(60)]
    write_jsonl(tmp_path / "in.jsonl", [*rows, {"id": "held", "prompt": "HOLD ME please"}])
    config = ray_config(tmp_path, mock, cap=4, shards=3)
    proc = await start_turnstile("run", config, "--metrics-port", "0")
    url = await metrics_url(proc)
    await mock.wait_for_requests(61)
    async with aiohttp.ClientSession() as session:
        with anyio.fail_after(60):
            while True:  # until the shards' reports show the 60 answered rows
                async with session.get(url) as response:
                    during = scraped(await response.text())
                if during.get(("turnstile_rows_total", (("state", "ok"),))) == 60:
                    break
                await anyio.sleep(0.1)
    mock.release()
    _, err = await proc.communicate()

    assert proc.returncode == 0, err.decode()
    replica = {"model": "teacher", "replica": mock.base_url}
    assert value(during, "turnstile_requests_total", **replica, outcome="ok") == 60
    assert value(during, "turnstile_in_flight", **replica) == 1
    assert value(during, "turnstile_request_seconds_count", model="teacher") == 60
    last = orjson.loads((tmp_path / "ck" / HISTORY_NAME).read_bytes().splitlines()[-1])
    assert last["event"] == "end" and last["rows_ok"] == 61


async def test_a_stopped_sharded_run_reports_the_rows_its_shards_wrote(
    tmp_path: Path, mock: MockServer
) -> None:
    source = conversations(200, max_turns=3)
    write_jsonl(tmp_path / "in.jsonl", source)
    mock.latency_ms = 10
    config = ray_config(tmp_path, mock, cap=4)

    stopped = await kill_after(mock, 150, "run", config, "--quiet", sig=signal.SIGINT)

    assert stopped.returncode == 128 + signal.SIGINT, stderr_tail(stopped.stderr)
    [summary] = [line for line in stopped.stderr.splitlines() if line.startswith("rows: ")]
    ok, failed = (int(word) for word in summary.split()[1:4:2])
    written = sum(
        len(read_jsonl(shard_dir(tmp_path / "ck", i) / name))
        for i in range(4)
        for name in ("rows.jsonl", "rows.failed.jsonl")
    )
    assert 0 < ok + failed == written < len(source)


def stderr_tail(text: str) -> str:
    return "\n".join(text.splitlines()[-20:])
