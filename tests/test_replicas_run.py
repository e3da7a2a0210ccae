"""End to end: one model on several mock servers: spread, caps, affinity, failover, outages.

Replicas that a test kills run as real `turnstile mock-server` processes on
loopback; the others run in the test's own loop. A test acts at a known point of
a run by waiting on a server's request count (``wait_for_requests``, or the
process mock's ``GET /wait``), never by polling.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from engine.testing.mock_server import MockServer, request_key
from tests.conftest import by_id, read_jsonl, start_turnstile, turnstile, write_jsonl
from tests.test_turn_rules_run import A, expected_messages, u

pytestmark = pytest.mark.timeout(180)


class MockProcess:
    """`turnstile mock-server` in a process of its own, so a test can SIGKILL it."""

    def __init__(self, port: int = 0, latency_ms: float = 0) -> None:
        self.port = port
        self.latency_ms = latency_ms
        self.proc: asyncio.subprocess.Process | None = None
        self.base_url = ""

    async def start(self) -> MockProcess:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "engine",
            "mock-server",
            "--port",
            str(self.port),
            "--latency-ms",
            str(self.latency_ms),
            stdout=asyncio.subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        line = (await self.proc.stdout.readline()).decode()
        assert "listening on" in line, line
        self.base_url = line.split()[-1]
        self.port = int(self.base_url.rsplit(":", 1)[1].split("/")[0])
        return self

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()

    async def get(self, path: str) -> dict[str, Any]:
        root = self.base_url.removesuffix("/v1")
        async with aiohttp.ClientSession() as session, session.get(f"{root}{path}") as response:
            data: dict[str, Any] = await response.json()
            return data

    async def wait_for_requests(self, count: int) -> dict[str, Any]:
        return await self.get(f"/wait?requests={count}")


@asynccontextmanager
async def mock_processes(n: int, latency_ms: float) -> AsyncIterator[list[MockProcess]]:
    procs = [MockProcess(latency_ms=latency_ms) for _ in range(n)]
    try:
        for proc in procs:
            await proc.start()
        yield procs
    finally:
        for proc in procs:
            await proc.stop()


def user_only_rows(n: int, *, max_turns: int = 6) -> list[dict[str, Any]]:
    return [
        {"id": f"r{i}", "messages": [u(f"row {i} asks {t}") for t in range(1 + i % max_turns)]}
        for i in range(n)
    ]


def expected_for(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, str]]]:
    return {
        row["id"]: expected_messages([m for msg in row["messages"] for m in (msg, A)])
        for row in rows
    }


def turn_keys(expected: list[dict[str, str]]) -> list[str]:
    """The mock's request key of each turn of a finished conversation."""
    return [
        request_key("mock", expected[:i])
        for i, m in enumerate(expected)
        if m["role"] == "assistant"
    ]


def replicas_config(
    folder: Path, urls: list[str], *, cap: int = 4, retries: int = 6, **model: Any
) -> Path:
    config = {
        "task": "distill",
        "input": "in.jsonl",
        "output": "out/distilled.jsonl",
        "checkpoint_dir": "ck",
        "models": {
            "teacher": {
                "base_url": urls,
                "model": "mock",
                "max_concurrency": cap,
                "timeout_s": 10,
                "max_retries": retries,
                **model,
            }
        },
        "distill": {"model": "teacher"},
        "progress_interval_s": 60,
    }
    path = folder / "replicas.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def assert_exact(folder: Path, expected: dict[str, list[dict[str, str]]]) -> None:
    rows = by_id(read_jsonl(folder / "out" / "distilled.jsonl"))
    assert {rid: row["messages"] for rid, row in rows.items()} == expected
    assert not read_jsonl(folder / "out" / "distilled.failed.jsonl")


async def test_requests_spread_over_replicas_under_each_cap_and_turns_stay_together(
    tmp_path: Path,
) -> None:
    rows = user_only_rows(120)
    expected = expected_for(rows)
    write_jsonl(tmp_path / "in.jsonl", rows)
    cap = 4
    async with MockServer(latency_ms=5) as a, MockServer(latency_ms=5) as b:
        async with MockServer(latency_ms=5) as c:
            servers = [a, b, c]
            config = replicas_config(tmp_path, [s.base_url for s in servers], cap=cap)

            result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 0, result.stderr
    assert_exact(tmp_path, expected)
    total = sum(s.stats.completed for s in servers)
    assert total == sum(len(turn_keys(e)) for e in expected.values())  # none repeated
    for server in servers:
        peak = server.stats.peak_in_flight
        assert peak <= cap, f"{peak} in flight on one replica, above its cap of {cap}"
        assert peak == cap, "the load should have filled every replica"
        assert server.stats.completed >= 0.2 * total, "a replica served under 20%"
    whole = 0
    for conversation in expected.values():
        keys = turn_keys(conversation)
        homes = {i for i, s in enumerate(servers) for k in keys if s.stats.requests_by_key[k]}
        whole += len(homes) == 1
    # The target (>= 90%) is measured in bench/ (99% there); here, on a loaded machine,
    # a margin below it still fails if affinity is broken (random placement: ~10%).
    assert whole >= 0.8 * len(expected), f"only {whole}/{len(expected)} stayed on one replica"


async def test_a_replica_sigkilled_mid_run_and_restarted_serves_again(tmp_path: Path) -> None:
    rows = user_only_rows(400)
    expected = expected_for(rows)
    write_jsonl(tmp_path / "in.jsonl", rows)
    async with MockServer(latency_ms=10) as a, MockServer(latency_ms=10) as b:
        async with mock_processes(1, latency_ms=10) as [victim]:
            config = replicas_config(tmp_path, [a.base_url, b.base_url, victim.base_url], cap=2)
            run = await start_turnstile("run", str(config), "--quiet")
            await victim.wait_for_requests(20)
            await victim.kill()
            before = a.stats.total_requests + b.stats.total_requests
            await a.wait_for_requests(a.stats.total_requests + 40)  # the run goes on without it
            restarted = await MockProcess(port=victim.port, latency_ms=10).start()
            try:
                after_restart = await restarted.wait_for_requests(10)  # it serves again
                _, err = await run.communicate()
            finally:
                await restarted.stop()

    assert run.returncode == 0, err.decode()
    assert_exact(tmp_path, expected)
    assert after_restart["completed"] + after_restart["faults"].get("drop", 0) >= 1
    assert a.stats.total_requests + b.stats.total_requests > before
    assert "outage: teacher " in err.decode()  # the summary names the outage


async def test_every_replica_down_for_a_while_then_back_fails_no_row(tmp_path: Path) -> None:
    rows = user_only_rows(200)
    expected = expected_for(rows)
    write_jsonl(tmp_path / "in.jsonl", rows)
    async with mock_processes(2, latency_ms=10) as servers:
        config = replicas_config(tmp_path, [s.base_url for s in servers], cap=2, retries=2)
        run = await start_turnstile("run", str(config), "--quiet")
        await servers[0].wait_for_requests(30)
        for server in servers:
            await server.kill()
        await asyncio.sleep(10)  # the outage itself: ten seconds with no server at all
        restarted = [await MockProcess(port=s.port, latency_ms=10).start() for s in servers]
        try:
            _, err = await run.communicate()
        finally:
            for server in restarted:
                await server.stop()

    assert run.returncode == 0, err.decode()
    assert_exact(tmp_path, expected)


async def test_a_model_down_past_down_after_s_stops_resumable_then_finishes(
    tmp_path: Path,
) -> None:
    rows = user_only_rows(200)
    expected = expected_for(rows)
    write_jsonl(tmp_path / "in.jsonl", rows)
    async with mock_processes(1, latency_ms=10) as [server]:
        config = replicas_config(tmp_path, [server.base_url], cap=2, down_after_s=1)
        run = await start_turnstile("run", str(config), "--quiet")
        await server.wait_for_requests(30)
        await server.kill()
        _, err = await run.communicate()
        assert run.returncode == 3, err.decode()
        assert "models.teacher down for 1 s" in err.decode()
        assert server.base_url in err.decode()
        restarted = await MockProcess(port=server.port).start()
        try:
            rerun = await turnstile("run", str(config), "--quiet")
        finally:
            await restarted.stop()

    assert rerun.returncode == 0, rerun.stderr
    assert "resuming" in rerun.stderr
    assert_exact(tmp_path, expected)


async def test_a_generator_down_from_the_start_leaves_pairs_from_the_others(
    tmp_path: Path, mock: MockServer
) -> None:
    prompts = [{"id": f"p{i}", "prompt": f"question {i}"} for i in range(6)]
    write_jsonl(tmp_path / "in.jsonl", prompts)
    nowhere = "http://127.0.0.1:9/v1"  # nothing listens on the discard port

    def model(name: str, url: str) -> dict[str, Any]:
        return {
            "base_url": url,
            "model": name,
            "max_concurrency": 2,
            "down_after_s": 1,
        }

    config = tmp_path / "prefs.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "task": "preference",
                "input": "in.jsonl",
                "output": "out/prefs.jsonl",
                "checkpoint_dir": "ck",
                "models": {
                    "a": model("gen-a", mock.base_url),
                    "b": model("gen-b", nowhere),
                    "c": model("gen-c", mock.base_url),
                    "judge": model("judge-m", mock.base_url),
                },
                "preference": {"generators": ["a", "b", "c"], "judge": "judge"},
            }
        )
    )

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 0, result.stderr
    assert "warning: models.b is unreachable" in result.stderr
    rows = by_id(read_jsonl(tmp_path / "out" / "prefs.jsonl"))
    assert set(rows) == {p["id"] for p in prompts}
    for row in rows.values():
        assert row["generation_models"] == ["gen-a", "gen-c"]
        [error] = row["generation_errors"]
        assert error["model"] == "gen-b"
        assert "models.b unreachable since the run started" in error["error"]
    paired = [row for row in rows.values() if row["pair_error"] is None]
    assert paired, "no row got a pair from the generators that answer"
    for row in paired:
        assert {row["chosen_model"], row["rejected_model"]} == {"gen-a", "gen-c"}


@pytest.mark.timeout(60)
async def test_a_generator_with_no_server_holds_no_row_for_down_after_s(
    tmp_path: Path, mock: MockServer
) -> None:
    # down_after_s is 300 s and the test's timeout 60 s: had the rows waited for the
    # generator that never answered, the run could not have finished in time.
    prompts = [{"id": f"p{i}", "prompt": f"question {i}"} for i in range(30)]
    write_jsonl(tmp_path / "in.jsonl", prompts)

    def model(name: str, url: str) -> dict[str, Any]:
        return {"base_url": url, "model": name, "max_concurrency": 4, "down_after_s": 300}

    config = tmp_path / "prefs.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "task": "preference",
                "input": "in.jsonl",
                "output": "out/prefs.jsonl",
                "checkpoint_dir": "ck",
                "models": {
                    "a": model("gen-a", mock.base_url),
                    "b": model("gen-b", mock.base_url),
                    "c": model("gen-c", "http://127.0.0.1:9/v1"),  # nothing listens there
                    "judge": model("judge-m", mock.base_url),
                },
                "preference": {"generators": ["a", "b", "c"], "judge": "judge"},
            }
        )
    )

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 0, result.stderr
    rows = by_id(read_jsonl(tmp_path / "out" / "prefs.jsonl"))
    assert set(rows) == {p["id"] for p in prompts}
    for row in rows.values():
        assert row["generation_models"] == ["gen-a", "gen-b"]
        assert [e["model"] for e in row["generation_errors"]] == ["gen-c"]
    assert any(row["pair_error"] is None for row in rows.values())


async def test_a_replica_sigkilled_mid_request_and_restarted_spends_no_rows_retry(
    tmp_path: Path,
) -> None:
    # max_retries 0: a single retry charged to a row would fail it. The victim was
    # answering others until the kill; its requests in flight fail, then it is out.
    rows = user_only_rows(150)
    expected = expected_for(rows)
    write_jsonl(tmp_path / "in.jsonl", rows)
    async with mock_processes(3, latency_ms=40) as servers:
        victim = servers[0]
        config = replicas_config(tmp_path, [s.base_url for s in servers], cap=8, retries=0)
        run = await start_turnstile("run", str(config), "--quiet")
        await victim.wait_for_requests(60)  # mid-run: it holds several requests now
        await victim.kill()
        restarted = await MockProcess(port=victim.port, latency_ms=40).start()
        try:
            _, err = await run.communicate()
        finally:
            await restarted.stop()

    assert run.returncode == 0, err.decode()
    assert_exact(tmp_path, expected)


async def test_a_teacher_unreachable_at_start_stops_at_once(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", user_only_rows(3))
    config = replicas_config(tmp_path, ["http://127.0.0.1:9/v1"], down_after_s=300)

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 3, result.stderr
    assert "cannot reach models.teacher: http://127.0.0.1:9/v1" in result.stderr


async def test_one_replica_unreachable_at_start_warns_and_the_others_serve(
    tmp_path: Path, mock: MockServer
) -> None:
    rows = user_only_rows(20)
    write_jsonl(tmp_path / "in.jsonl", rows)
    config = replicas_config(tmp_path, [mock.base_url, "http://127.0.0.1:9/v1"])

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 0, result.stderr
    assert "warning: models.teacher: cannot reach http://127.0.0.1:9/v1/models" in result.stderr
    assert_exact(tmp_path, expected_for(rows))
