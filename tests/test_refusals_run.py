"""End to end: a model that refuses every request (a key refused, a wrong URL or model name)
stops the run, resumable, and fails no row; a generator that does is one failing model of a
pool, which never stops the others."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from engine.testing.mock_server import Faults, MockServer
from tests.conftest import by_id, conversations, read_jsonl, turnstile, write_config, write_jsonl
from tests.test_preference_run import prefs_config, prompts

KEY = "sk-refusals-run-0123456789abcdef"
KEY_ENV = "TURNSTILE_REFUSALS_TEST_KEY"


@pytest.mark.parametrize(
    ("status", "named", "fix"),
    [
        (401, "HTTP 401", f"check the key in {KEY_ENV}"),
        (403, "HTTP 403", f"check the key in {KEY_ENV}"),
        (404, "HTTP 404", "fix models.teacher.base_url"),
    ],
    ids=["an_expired_key", "a_forbidden_key", "a_wrong_model_name"],
)
async def test_a_model_refusing_every_request_stops_the_run_and_fails_no_row(
    tmp_path: Path, mock: MockServer, status: int, named: str, fix: str
) -> None:
    source = conversations(20)
    write_jsonl(tmp_path / "in.jsonl", source)
    mock.faults = Faults(fail_models={"mock": status}, echo_authorization=True)
    teacher = {
        "base_url": mock.base_url,
        "model": "mock",
        "api_key_env": KEY_ENV,
        "max_concurrency": 4,
        "max_retries": 0,
    }
    config = write_config(tmp_path, mock.base_url, models={"teacher": teacher})

    stopped = await turnstile("run", str(config), "--quiet", env={KEY_ENV: KEY})

    assert stopped.returncode == 3, stopped.stderr
    assert f"models.teacher: {named}: model 'mock' is set to fail" in stopped.stderr
    assert fix in stopped.stderr and "run the same command to resume" in stopped.stderr
    assert KEY not in stopped.stderr and "Bearer ***" in stopped.stderr
    assert read_jsonl(tmp_path / "out" / "distilled.failed.jsonl") == []
    # The key is fixed (here: the server accepts it again), and the same command finishes.
    mock.faults = Faults()
    rerun = await turnstile("run", str(config), "--quiet", env={KEY_ENV: KEY})
    assert rerun.returncode == 0, rerun.stderr
    assert set(by_id(read_jsonl(tmp_path / "out" / "distilled.jsonl"))) == {
        row["id"] for row in source
    }
    assert read_jsonl(tmp_path / "out" / "distilled.failed.jsonl") == []
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


async def test_a_generator_whose_key_is_refused_is_left_out_and_the_others_pair(
    tmp_path: Path, mock: MockServer
) -> None:
    # The pool's rule: one failing model never stops the others. A refused generator's
    # generations are recorded failed with the server's message, never journaled (a
    # rerun with the key fixed asks again for rows not finished).
    mock.faults = Faults(fail_models={"gen-b": 401}, echo_authorization=True)
    source = prompts(8)
    write_jsonl(tmp_path / "in.jsonl", source)
    config = prefs_config(tmp_path, mock.base_url, retries=0)
    raw = yaml.safe_load(config.read_text())
    raw["models"]["b"]["api_key_env"] = KEY_ENV
    raw["preference"]["generators"] = ["a", "b", "c"]
    raw["models"]["c"] = {**raw["models"]["a"], "model": "gen-c"}
    config.write_text(yaml.safe_dump(raw))

    result = await turnstile("run", str(config), "--quiet", env={KEY_ENV: KEY})

    assert result.returncode == 0, result.stderr
    assert "warning: models.b: HTTP 401" in result.stderr
    rows = by_id(read_jsonl(tmp_path / "out" / "prefs.jsonl"))
    assert set(rows) == {p["id"] for p in source}
    for row in rows.values():
        assert row["generation_models"] == ["gen-a", "gen-c"]
        [error] = row["generation_errors"]
        assert error["model"] == "gen-b" and "the server refuses the key" in error["error"]
        assert KEY not in error["error"]
    # One 401 was enough: the generator was not asked again.
    assert mock.stats.faults["fail_model"] <= raw["models"]["b"]["max_concurrency"]


async def test_every_generator_refused_stops_the_run_instead_of_failing_rows(
    tmp_path: Path, mock: MockServer
) -> None:
    mock.faults = Faults(fail_models={"gen-a": 403, "gen-b": 404})
    source = prompts(6)
    write_jsonl(tmp_path / "in.jsonl", source)
    config = prefs_config(tmp_path, mock.base_url, retries=0)

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 3, result.stderr
    assert "no generator answers" in result.stderr
    assert read_jsonl(tmp_path / "out" / "prefs.failed.jsonl") == []
    mock.faults = Faults()
    rerun = await turnstile("run", str(config), "--quiet")
    assert rerun.returncode == 0, rerun.stderr
    rows = read_jsonl(tmp_path / "out" / "prefs.jsonl")
    assert len(rows) == len(source)
    assert all(row["generation_errors"] == [] for row in rows)
