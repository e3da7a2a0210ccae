"""The task seam's proof: ``task: echo`` (tests/echo_task.py), defined outside the
engine and registered from here, runs end to end on the mock server, and a SIGKILLed
run resumes without asking any journaled reply again."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from engine.testing.mock_replies import request_key
from engine.testing.mock_server import MockServer
from tests.conftest import Proc, by_id, read_jsonl, write_jsonl
from tests.echo_task import KIND, register_echo

# The engine in a subprocess, with the echo task registered first.
LAUNCH = (
    "from tests.echo_task import register_echo; register_echo(); "
    "from engine.cli import main; raise SystemExit(main())"
)
ROWS, STEPS = 40, 3


def echo_config(folder: Path, base_url: str) -> Path:
    config = {
        "task": "echo",
        "input": "in.jsonl",
        "output": "out/echo.jsonl",
        "checkpoint_dir": "ck",
        "models": {"m": {"base_url": base_url, "model": "mock", "max_concurrency": 2}},
        "echo": {"model": "m", "steps": STEPS},
        "progress_interval_s": 60,
    }
    path = folder / "echo.yaml"
    path.write_text(yaml.safe_dump(config))
    write_jsonl(folder / "in.jsonl", [{"id": i, "text": f"row {i}"} for i in range(ROWS)])
    return path


async def start(*args: str) -> Any:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", LAUNCH, *args, stderr=asyncio.subprocess.PIPE, env=env
    )


async def run(*args: str) -> Proc:
    proc = await start(*args)
    _, err = await proc.communicate()
    return Proc(proc.returncode, err.decode())


def test_a_task_from_outside_the_package_is_registered_by_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import engine.tasks
    from engine.tasks import kind_of, names, register, registry

    monkeypatch.setattr(engine.tasks, "_REGISTERED", {})  # taken back after the test
    register_echo()
    register_echo()  # the same kind again is fine
    assert kind_of("echo") is KIND and "echo" in names() and registry()["echo"] is KIND
    clash = type("Clash", (type(KIND),), {"name": "distill"})()
    with pytest.raises(ValueError, match="built-in"):
        register(clash)


async def test_echo_runs_end_to_end_and_resumes_after_sigkill_asking_nothing_twice(
    tmp_path: Path, mock: MockServer
) -> None:
    reference = tmp_path / "reference"
    reference.mkdir()
    done = await run("run", str(echo_config(reference, mock.base_url)), "--quiet")
    assert done.returncode == 0, done.stderr
    expected = by_id(read_jsonl(reference / "out" / "echo.jsonl"))
    assert len(expected) == ROWS and all(len(r["replies"]) == STEPS for r in expected.values())
    mock.reset()

    config = echo_config(tmp_path, mock.base_url)
    proc = await start("run", str(config), "--quiet")
    await mock.wait_for_requests(ROWS * STEPS // 3)
    proc.send_signal(signal.SIGKILL)
    await proc.communicate()
    journal = read_jsonl(tmp_path / "ck" / "journal.jsonl")
    killed_with = {(r["l"], r["key"]) for r in journal if r.get("k") == "a"}
    assert killed_with, "the run was killed before it journaled a reply"
    mock.reset()

    resumed = await run("run", str(config), "--quiet")

    assert resumed.returncode == 0, resumed.stderr
    assert by_id(read_jsonl(tmp_path / "out" / "echo.jsonl")) == expected
    # No reply journaled before the kill was asked for again.
    asked = mock.stats.requests_by_key
    for line, key in killed_with:
        step = int(key.removeprefix("step "))
        assert asked[request_key("mock", messages(expected[line]["replies"], line, step))] == 0
    assert sum(asked.values()) <= ROWS * STEPS - len(killed_with)


def messages(replies: list[str], line: int, step: int) -> list[dict[str, str]]:
    """What the echo task sends for ``step`` of row ``line``."""
    sent = [{"role": "user", "content": f"row {line}"}]
    for i in range(step):
        sent += [
            {"role": "assistant", "content": replies[i]},
            {"role": "user", "content": f"again ({i + 1})"},
        ]
    return sent
