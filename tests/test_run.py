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
