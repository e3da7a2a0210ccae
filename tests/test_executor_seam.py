"""The executor seam: executors by name, each parsing its own keys, and a test-only
executor (tests/threads_executor.py) registered from here, run by engine.run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import engine
from engine.config import RunConfig, parse_config
from engine.errors import ConfigError, ExecutorError
from engine.executors.ray_run import RayOptions
from engine.executors.registry import names, register, unregister
from engine.executors.sharded import ShardedOptions
from engine.executors.shards import read_plan, shard_dir
from engine.testing.mock_server import MockServer
from tests.conftest import conversations, read_jsonl, write_jsonl
from tests.threads_executor import ThreadsExecutor


def raw_config(folder: Path, base_url: str, executor: object) -> dict[str, object]:
    return {
        "task": "distill",
        "input": str(folder / "in.jsonl"),
        "output": str(folder / "out" / "distilled.jsonl"),
        "checkpoint_dir": str(folder / "ck"),
        "models": {"teacher": {"base_url": base_url, "model": "mock", "max_concurrency": 4}},
        "distill": {"model": "teacher"},
        "executor": executor,
    }


@pytest.fixture
def threads() -> Iterator[type[ThreadsExecutor]]:
    register(ThreadsExecutor)
    ThreadsExecutor.backends = []
    try:
        yield ThreadsExecutor
    finally:
        unregister("threads")


def parse(tmp_path: Path, executor: object) -> RunConfig:
    return parse_config(
        raw_config(tmp_path, "http://127.0.0.1:1/v1", executor), tmp_path / "x.yaml"
    )


def test_each_executor_parses_its_own_keys(tmp_path: Path) -> None:
    assert {"local", "processes", "ray"} <= set(names())
    ray = parse(tmp_path, {"kind": "ray", "shards": 3, "address": "auto"}).executor
    assert ray.options == RayOptions(shards=3, address="auto")
    processes = parse(tmp_path, {"kind": "processes", "max_concurrent_shards": 2}).executor
    assert processes.options == ShardedOptions(shards=8, max_concurrent_shards=2)
    # Another executor's key is no error for this one (--executor may switch to it).
    assert parse(tmp_path, {"kind": "local", "address": "auto"}).executor.options is None


def test_the_ray_address_is_checked_by_the_ray_executor(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"executor.address: must be null"):
        parse(tmp_path, {"kind": "ray", "address": "not an address"})
    with pytest.raises(ConfigError, match=r"executor.nodes: unknown key"):
        parse(tmp_path, {"kind": "ray", "nodes": 3})


def test_an_override_parses_the_section_again_for_the_new_kind(tmp_path: Path) -> None:
    section = parse(tmp_path, {"address": "auto"}).executor
    assert section.kind == "local"
    ray = section.override(kind="ray", shards=2)
    assert ray.options == RayOptions(shards=2, address="auto")


def test_an_executor_unknown_until_registered(
    tmp_path: Path, threads: type[ThreadsExecutor]
) -> None:
    unregister("threads")
    with pytest.raises(ConfigError, match=r"executor.kind: must be one of"):
        parse(tmp_path, {"kind": "threads"})
    register(threads)
    assert parse(tmp_path, {"kind": "threads", "shards": 2}).executor.kind == "threads"


def test_a_registered_executor_runs_a_sharded_run_from_python(
    tmp_path: Path, threaded_mock: MockServer, threads: type[ThreadsExecutor]
) -> None:
    source = conversations(40, max_turns=3)
    write_jsonl(tmp_path / "in.jsonl", source)
    config = raw_config(tmp_path, threaded_mock.base_url, {"kind": "threads", "shards": 3})

    summary = engine.run(config)

    assert (summary.rows_ok, summary.rows_failed) == (40, 0)
    rows = read_jsonl(tmp_path / "out" / "distilled.jsonl")
    assert [row["id"] for row in rows] == [row["id"] for row in source]  # merged in order
    plan = read_plan(tmp_path / "ck")
    assert plan is not None and len(plan.shards) == 3
    [backend] = threads.backends
    assert sorted(backend.submitted) == [0, 1, 2]

    # A rerun of the finished run submits nothing and keeps the output.
    again = engine.run(config)
    assert again.rows_ok == 40 and len(threads.backends) == 1
    assert read_jsonl(tmp_path / "out" / "distilled.jsonl") == rows


def test_a_failed_shard_raises_and_a_rerun_retries_only_it(
    tmp_path: Path, threaded_mock: MockServer, threads: type[ThreadsExecutor]
) -> None:
    write_jsonl(tmp_path / "in.jsonl", conversations(30))
    config = raw_config(tmp_path, threaded_mock.base_url, {"kind": "threads", "shards": 3})
    broken = shard_dir(tmp_path / "ck", 1) / "manifest.json"
    broken.parent.mkdir(parents=True)
    broken.write_text("{not json")

    with pytest.raises(ExecutorError, match="shards failed: 1"):
        engine.run(config)

    broken.unlink()
    summary = engine.run(config)
    assert summary.rows_ok == 30
    assert threads.backends[-1].submitted == [1]
