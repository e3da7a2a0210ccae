"""Shared fixtures: the mock server on loopback, configs, inputs, and `turnstile` runs."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from anyio.from_thread import start_blocking_portal

from engine.testing.mock_server import MockServer


@pytest.fixture
async def mock() -> AsyncIterator[MockServer]:
    """A real mock OpenAI-compatible server on a free loopback port."""
    async with MockServer() as server:
        yield server


@pytest.fixture
def threaded_mock() -> Iterator[MockServer]:
    """The mock server on an event loop of its own, for sync tests that run Turnstile in
    this process (``engine.run``, or the CLI, which only the main thread may run)."""
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(MockServer()) as server,
    ):
        yield server


def conversations(n: int, *, max_turns: int = 4, system_every: int = 3) -> list[dict[str, Any]]:
    """Conversations of 1..max_turns user turns, in the three input formats."""
    rows: list[dict[str, Any]] = []
    for i in range(n):
        turns = 1 + i % max_turns
        if i % 7 == 6:
            rows.append({"id": f"c{i}", "prompt": f"a single question number {i}"})
            continue
        if i % 5 == 4:
            convo = []
            for t in range(turns):
                convo.append({"from": "human", "value": f"sharegpt {i} turn {t}"})
                convo.append({"from": "gpt", "value": "an old answer to be replaced"})
            rows.append({"id": f"c{i}", "conversations": convo, "source": "sharegpt"})
            continue
        messages: list[dict[str, str]] = []
        if i % system_every == 0:
            messages.append({"role": "system", "content": f"system prompt {i}"})
        for t in range(turns):
            messages.append({"role": "user", "content": f"conversation {i} asks question {t}"})
            messages.append({"role": "assistant", "content": "an old answer"})
        rows.append({"id": f"c{i}", "messages": messages, "topic": f"t{i % 3}"})
    return rows


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    with path.open("wb") as f:
        for row in rows:
            f.write(row.encode() if isinstance(row, str) else orjson.dumps(row))
            f.write(b"\n")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def write_config(
    folder: Path, base_url: str, *, cap: int = 8, name: str = "run", **extra: Any
) -> Path:
    """A distillation config against ``base_url``; ``extra`` overrides top-level keys."""
    config: dict[str, Any] = {
        "task": "distill",
        "input": "in.jsonl",
        "output": "out/distilled.jsonl",
        "checkpoint_dir": "ck",
        "models": {
            "teacher": {
                "base_url": base_url,
                "model": "mock",
                "max_concurrency": cap,
                "timeout_s": 10,
                "max_retries": 6,
                "params": {"temperature": 0.0},
            }
        },
        "distill": {"model": "teacher"},
        "progress_interval_s": 60,
    }
    config.update(extra)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@dataclass
class Proc:
    returncode: int
    stderr: str


async def turnstile(*args: str, env: dict[str, str] | None = None) -> Proc:
    """Run `turnstile ARGS` to its end in a real subprocess."""
    proc = await start_turnstile(*args, env=env)
    _, err = await proc.communicate()
    assert proc.returncode is not None
    return Proc(proc.returncode, err.decode())


async def start_turnstile(*args: str, env: dict[str, str] | None = None) -> Any:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "engine",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )


async def kill_after(
    mock: MockServer, requests: int, *args: str, sig: int = signal.SIGKILL
) -> Proc:
    """Start `turnstile ARGS`, send ``sig`` once the mock has seen ``requests`` requests."""
    proc = await start_turnstile(*args)
    waiter = asyncio.ensure_future(mock.wait_for_requests(requests))
    exited = asyncio.ensure_future(proc.wait())
    done, _ = await asyncio.wait({waiter, exited}, return_when=asyncio.FIRST_COMPLETED)
    assert waiter in done, "the run ended before it could be interrupted"
    proc.send_signal(sig)
    _, err = await proc.communicate()
    assert proc.returncode is not None
    return Proc(proc.returncode, err.decode())


def by_id(rows: list[dict[str, Any]]) -> dict[Any, dict[str, Any]]:
    out: dict[Any, dict[str, Any]] = {}
    for row in rows:
        assert row["id"] not in out, f"row {row['id']} appears twice"
        out[row["id"]] = row
    return out


Check = Callable[[dict[str, Any]], None]
