"""Sharded runs as local processes (``executor: processes``, no Ray), against the mock
server: the same plan, done markers, resume and merge as on Ray, the caps shared by
the same quota rule (served by the driver down each shard's pipe)."""

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
    conversations,
    kill_after,
    read_jsonl,
    start_turnstile,
    turnstile,
    write_config,
    write_jsonl,
)
from tests.test_distill_run import expected_turns

pytestmark = pytest.mark.timeout(180)


def processes_config(
    folder: Path, mock: MockServer, *, cap: int = 8, shards: int = 4, **executor: Any
) -> str:
    section = {"kind": "processes", "shards": shards, **executor}
    return str(write_config(folder, mock.base_url, cap=cap, executor=section))


async def reference(folder: Path, mock: MockServer, source: list[Any]) -> list[dict[str, Any]]:
    """A single-process run's rows, in input order."""
    folder.mkdir()
    write_jsonl(folder / "in.jsonl", source)
    done = await turnstile("run", str(write_config(folder, mock.base_url)), "--quiet")
    assert done.returncode == 0, done.stderr
    order = {row["id"]: i for i, row in enumerate(source)}
    return sorted(read_jsonl(folder / "out" / "distilled.jsonl"), key=lambda r: order[r["id"]])


def repeated(mock: MockServer) -> int:
    return sum(n - 1 for n in mock.stats.requests_by_key.values() if n > 1)


def holder(checkpoint: Path) -> int:
    """The process holding ``checkpoint``'s lock (or that held it last): ``pid N``."""
    return int((checkpoint / "lock").read_text().split()[1])


def replies(folder: Path) -> int:
    total = 0
    for _, path in segments(folder):
        try:
            total += path.read_bytes().count(b'"k":"t"')
        except FileNotFoundError:  # dropped by a snapshot since it was listed
            pass
    return total


async def stdout(*args: str) -> str:
    proc = await start_turnstile(*args)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return bytes(out).decode()


async def test_four_shard_processes_give_the_single_process_rows_in_input_order(
    tmp_path: Path, mock: MockServer
) -> None:
    source = conversations(120, max_turns=4)
    want = await reference(tmp_path / "reference", mock, source)
    mock.reset()
    write_jsonl(tmp_path / "in.jsonl", source)
    config = processes_config(tmp_path, mock)

    done = await turnstile("run", config)

    assert done.returncode == 0, done.stderr
    assert "shards: 4/4 done" in done.stderr
    assert read_jsonl(tmp_path / "out" / "distilled.jsonl") == want  # in input order
    assert len(mock.stats.requests_by_key) == sum(expected_turns(s) for s in source)
    assert repeated(mock) == 0
    plan = read_plan(tmp_path / "ck")
    assert plan is not None and len(plan.shards) == 4
    listing = await stdout("status", config)
    assert "shards:     4 (4 done)" in listing
    # A rerun of a finished run runs nothing and writes the same output.
    again = await turnstile("run", config, "--quiet")
    assert again.returncode == 0, again.stderr
    assert read_jsonl(tmp_path / "out" / "distilled.jsonl") == want
    assert repeated(mock) == 0


async def test_the_cap_holds_across_shard_processes(tmp_path: Path, mock: MockServer) -> None:
    mock.latency_ms = 20
    write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "prompt": f"q {i}"} for i in range(300)])
    config = processes_config(tmp_path, mock, cap=5, shards=3, max_concurrent_shards=3)

    done = await turnstile("run", config, "--quiet")

    assert done.returncode == 0, done.stderr
    assert mock.stats.peak_in_flight <= 5
    assert len(read_jsonl(tmp_path / "out" / "distilled.jsonl")) == 300


async def test_the_cli_flags_choose_processes_and_the_shard_count(
    tmp_path: Path, mock: MockServer
) -> None:
    write_jsonl(tmp_path / "in.jsonl", conversations(30))
    config = str(write_config(tmp_path, mock.base_url))  # executor: local

    done = await turnstile("run", config, "--quiet", "--executor", "processes", "--shards", "3")

    assert done.returncode == 0, done.stderr
    plan = read_plan(tmp_path / "ck")
    assert plan is not None and len(plan.shards) == 3
    assert len(read_jsonl(tmp_path / "out" / "distilled.jsonl")) == 30


async def test_a_shard_process_sigkilled_fails_alone_and_a_rerun_gives_the_exact_output(
    tmp_path: Path, mock: MockServer
) -> None:
    source = conversations(120, max_turns=4)
    want = await reference(tmp_path / "reference", mock, source)
    mock.reset()
    mock.latency_ms = 5
    write_jsonl(tmp_path / "in.jsonl", source)
    cap = 4
    config = processes_config(tmp_path, mock, cap=cap, max_concurrent_shards=4)
    folder = shard_dir(tmp_path / "ck", 1)

    run = await start_turnstile("run", config, "--quiet")
    killed = asyncio.ensure_future(_kill_shard(mock, folder, at_replies=15))
    exited = asyncio.ensure_future(run.wait())
    finished, _ = await asyncio.wait({killed, exited}, return_when=asyncio.FIRST_COMPLETED)
    assert killed in finished, "the run ended before shard 1's process could be killed"
    _, err = await run.communicate()
    first = err.decode()

    assert run.returncode == 3, first
    assert "shard 1 failed" in first and "SIGKILL" in first
    assert "SIGKILL" in (folder / "error.txt").read_text()
    assert all((shard_dir(tmp_path / "ck", i) / "done.json").exists() for i in (0, 2, 3))
    assert not (tmp_path / "out" / "distilled.jsonl").exists()  # no merge with a shard missing

    rerun = await turnstile("run", config, "--quiet")

    assert rerun.returncode == 0, rerun.stderr
    assert holder(folder) != killed.result()
    assert read_jsonl(tmp_path / "out" / "distilled.jsonl") == want
    assert len(mock.stats.requests_by_key) == sum(expected_turns(s) for s in source)
    assert repeated(mock) <= cap  # at most what was in flight in the killed process


async def _kill_shard(mock: MockServer, folder: Path, *, at_replies: int) -> int:
    """SIGKILL the process running the shard in ``folder`` once its journal holds
    ``at_replies`` replies (looked at every 5 requests the mock sees); its pid."""
    seen = 0
    while True:
        seen += 5
        await mock.wait_for_requests(seen)
        if replies(folder) >= at_replies:
            pid = holder(folder)
            os.kill(pid, signal.SIGKILL)
            return pid


async def test_a_driver_sigkilled_resumes_exactly(tmp_path: Path, mock: MockServer) -> None:
    source = conversations(160, max_turns=4)
    want = await reference(tmp_path / "reference", mock, source)
    mock.reset()
    mock.latency_ms = 10
    write_jsonl(tmp_path / "in.jsonl", source)
    cap = 4
    config = processes_config(tmp_path, mock, cap=cap)

    killed = await kill_after(mock, 100, "run", config, "--quiet")
    assert killed.returncode == -signal.SIGKILL

    done = await turnstile("run", config, "--quiet")

    assert done.returncode == 0, done.stderr
    assert read_jsonl(tmp_path / "out" / "distilled.jsonl") == want
    assert len(mock.stats.requests_by_key) == sum(expected_turns(s) for s in source)
    assert repeated(mock) <= cap  # only what was in flight at the kill


async def test_a_stopped_run_reports_what_its_shards_wrote(
    tmp_path: Path, mock: MockServer
) -> None:
    write_jsonl(tmp_path / "in.jsonl", conversations(200, max_turns=3))
    mock.latency_ms = 10
    config = processes_config(tmp_path, mock, cap=4)

    stopped = await kill_after(mock, 150, "run", config, "--quiet", sig=signal.SIGINT)

    assert stopped.returncode == 128 + signal.SIGINT, stopped.stderr
    [summary] = [line for line in stopped.stderr.splitlines() if line.startswith("rows: ")]
    ok, failed = (int(word) for word in summary.split()[1:4:2])
    written = sum(
        len(read_jsonl(shard_dir(tmp_path / "ck", i) / name))
        for i in range(4)
        for name in ("rows.jsonl", "rows.failed.jsonl")
        if (shard_dir(tmp_path / "ck", i) / name).exists()
    )
    assert 0 < ok + failed == written < 200


def test_engine_run_drives_shard_processes_from_python(
    tmp_path: Path, threaded_mock: MockServer
) -> None:
    import engine

    write_jsonl(tmp_path / "in.jsonl", conversations(30))
    config = processes_config(tmp_path, threaded_mock, shards=2)

    summary = engine.run(config)

    assert (summary.rows_ok, summary.rows_failed) == (30, 0)
    assert len(read_jsonl(summary.output)) == 30
