"""The run scaffold's pure decisions."""

from __future__ import annotations

from pathlib import Path

from engine._runner import local_servers
from engine.config import parse_config


def test_local_models_with_the_same_settings_share_one_server(tmp_path: Path) -> None:
    raw = {
        "task": "preference",
        "input": "in.jsonl",
        "output": "out.jsonl",
        "models": {
            "a": {"base_url": "local", "max_concurrency": 4},
            "b": {"base_url": "local", "max_concurrency": 3},
            "judge": {"base_url": "local", "max_concurrency": 2, "local": {"ctx_size": 2048}},
            "remote": {"base_url": "http://127.0.0.1:1/v1", "model": "m"},
        },
        "preference": {"generators": ["a", "b", "remote"], "judge": "judge"},
    }
    config = parse_config(raw, tmp_path / "c.yaml", env={})

    servers = {g.members: g.server for g in local_servers(config)}

    assert set(servers) == {("a", "b"), ("judge",)}
    assert servers["a", "b"].local.parallel == 7
    assert servers["judge",].local.parallel == 2
    assert servers["judge",].local.ctx_size == 2048


def test_a_shared_server_lists_its_models_by_name_not_by_a_joined_string(tmp_path: Path) -> None:
    raw = {
        "task": "preference",
        "input": "in.jsonl",
        "output": "out.jsonl",
        "models": {
            "gen-1.a": {"base_url": "local", "max_concurrency": 2},
            "gen_2": {"base_url": "local", "max_concurrency": 2},
        },
        "preference": {"generators": ["gen-1.a", "gen_2"]},
    }
    config = parse_config(raw, tmp_path / "c.yaml", env={})

    [group] = local_servers(config)

    assert group.members == ("gen-1.a", "gen_2")
    assert group.server.name == "gen-1.a"


def test_runs_use_uvloop_unless_the_config_turns_it_off() -> None:
    import asyncio

    import pytest

    from engine._runner import run_loop

    pytest.importorskip("uvloop")

    async def loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert run_loop(loop_module, uvloop=True).startswith("uvloop")
    assert run_loop(loop_module, uvloop=False).startswith("asyncio")


def test_uvloop_key_parses(tmp_path: Path) -> None:
    import pytest

    from engine.errors import ConfigError

    raw = {
        "task": "distill",
        "input": "in.jsonl",
        "output": "out.jsonl",
        "models": {"t": {"base_url": "http://127.0.0.1:1/v1", "model": "m"}},
        "distill": {"model": "t"},
    }
    assert parse_config(raw, tmp_path / "c.yaml", env={}).uvloop is True
    assert parse_config({**raw, "uvloop": False}, tmp_path / "c.yaml", env={}).uvloop is False
    with pytest.raises(ConfigError, match="uvloop: must be true or false"):
        parse_config({**raw, "uvloop": "yes"}, tmp_path / "c.yaml", env={})
