"""The Python API: engine.run, engine.arun, engine.export and the public error tree."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

import engine
from engine.testing.mock_server import MockServer
from tests.conftest import by_id, conversations, read_jsonl, write_jsonl
from tests.test_distill_run import assert_each_turn_answers_its_history


def config_dict(folder: Path, base_url: str, **extra: Any) -> dict[str, Any]:
    return {
        "task": "distill",
        "input": str(folder / "in.jsonl"),
        "output": str(folder / "out" / "distilled.jsonl"),
        "checkpoint_dir": str(folder / "ck"),
        "models": {"teacher": {"base_url": base_url, "model": "mock", "max_concurrency": 4}},
        "distill": {"model": "teacher"},
        **extra,
    }


def test_the_public_names_are_declared_and_show_the_public_path() -> None:
    assert set(engine.__all__) >= {"run", "arun", "export", "ConfigError", "Summary"}
    assert all(hasattr(engine, name) for name in engine.__all__)
    assert engine.ConfigError.__module__ == "engine"
    assert issubclass(engine.ConfigError, engine.TurnstileError)
    assert callable(engine.run) and callable(engine.export)  # not shadowed by submodules


def test_run_a_dict_config_gives_exact_output_and_counts(
    tmp_path: Path, threaded_mock: MockServer
) -> None:
    source = conversations(12)
    write_jsonl(tmp_path / "in.jsonl", source)

    summary = engine.run(config_dict(tmp_path, threaded_mock.base_url))

    assert isinstance(summary, engine.Summary)
    assert (summary.rows_ok, summary.rows_failed, summary.rows_filtered) == (12, 0, 0)
    assert summary.turns == threaded_mock.stats.completed
    assert summary.output == tmp_path / "out" / "distilled.jsonl"
    assert summary.failed_output == tmp_path / "out" / "distilled.failed.jsonl"
    rows = by_id(read_jsonl(summary.output))
    assert set(rows) == {s["id"] for s in source}
    for row in rows.values():
        assert_each_turn_answers_its_history(row)

    again = engine.run(config_dict(tmp_path, threaded_mock.base_url))  # resumes: nothing left
    assert again.resumed and again.turns == 0 and again.rows_ok == 12


def test_run_a_yaml_path_and_relative_paths_in_a_dict_resolve_against_the_cwd(
    tmp_path: Path, threaded_mock: MockServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_jsonl(tmp_path / "in.jsonl", conversations(3))
    monkeypatch.chdir(tmp_path)
    raw = config_dict(tmp_path, threaded_mock.base_url)
    raw.update(input="in.jsonl", output="out/rel.jsonl")
    del raw["checkpoint_dir"]

    summary = engine.run(raw)

    assert summary.output == tmp_path / "out" / "rel.jsonl"
    assert (tmp_path / "checkpoints" / "rel" / "journal.jsonl").exists()
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config_dict(tmp_path, threaded_mock.base_url)))
    assert engine.run(path, fresh=True).rows_ok == 3


def test_a_bad_config_raises_config_error_with_every_problem(tmp_path: Path) -> None:
    raw = config_dict(tmp_path, "htp://nowhere")
    raw["models"]["teacher"]["max_concurrency"] = 0
    raw["bogus"] = 1

    with pytest.raises(engine.ConfigError) as caught:
        engine.run(raw)

    problems = caught.value.problems
    assert len(problems) == 3, problems
    assert any(p.startswith("models.teacher.base_url: ") for p in problems)
    assert any(p.startswith("models.teacher.max_concurrency: ") for p in problems)
    assert any(p.startswith("bogus: unknown key") for p in problems)


def test_a_changed_config_raises_instead_of_exiting(
    tmp_path: Path, threaded_mock: MockServer
) -> None:
    write_jsonl(tmp_path / "in.jsonl", conversations(2))
    engine.run(config_dict(tmp_path, threaded_mock.base_url))
    changed = config_dict(tmp_path, threaded_mock.base_url)
    changed["models"]["teacher"]["params"] = {"temperature": 0.9}

    with pytest.raises(engine.CheckpointError, match="--fresh"):
        engine.run(changed)


def test_an_unreachable_teacher_raises_model_down(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", conversations(2))
    with pytest.raises(engine.ModelDown, match="cannot reach"):
        engine.run(config_dict(tmp_path, "http://127.0.0.1:9/v1"))


async def test_arun_inside_a_running_loop(
    tmp_path: Path, mock: MockServer, caplog: pytest.LogCaptureFixture
) -> None:
    write_jsonl(tmp_path / "in.jsonl", conversations(5))

    with caplog.at_level(logging.INFO, logger="turnstile"):
        summary = await engine.arun(config_dict(tmp_path, mock.base_url))

    assert summary.rows_ok == 5 and summary.turns == mock.stats.completed
    assert any("starting" in r.getMessage() for r in caplog.records if r.name == "turnstile")


async def test_the_summary_hands_out_a_frozen_snapshot_of_the_counters(
    tmp_path: Path, mock: MockServer
) -> None:
    write_jsonl(tmp_path / "in.jsonl", conversations(3))

    summary = await engine.arun(config_dict(tmp_path, mock.base_url))

    stats = summary.stats
    assert stats.rows_done == 3 and stats.turns_done == summary.turns
    teacher = stats.models["teacher"]
    assert stats.prompt_tokens == teacher.prompt_tokens > 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.rows_done = 0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        teacher.requests = 0  # type: ignore[misc]
    with pytest.raises(TypeError):
        stats.models["other"] = teacher  # type: ignore[index]


def test_export_from_python(tmp_path: Path, threaded_mock: MockServer) -> None:
    write_jsonl(tmp_path / "in.jsonl", conversations(4))
    raw = config_dict(tmp_path, threaded_mock.base_url)
    engine.run(raw)

    dest = engine.export(raw, format="jsonl", to=tmp_path / "sorted.jsonl")

    assert dest == tmp_path / "sorted.jsonl"
    assert [r["id"] for r in read_jsonl(dest)] == [f"c{i}" for i in range(4)]


async def test_arun_installs_no_signal_handlers(tmp_path: Path, mock: MockServer) -> None:
    import signal

    import anyio

    write_jsonl(tmp_path / "in.jsonl", conversations(30))
    mock.latency_ms = 5
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    seen: dict[int, object] = {}

    async def look_mid_run() -> None:
        await mock.wait_for_requests(10)
        seen.update({sig: signal.getsignal(sig) for sig in before})

    async with anyio.create_task_group() as group:
        group.start_soon(look_mid_run)
        summary = await engine.arun(config_dict(tmp_path, mock.base_url))

    assert summary.rows_ok == 30
    assert seen == before  # the caller's Ctrl-C is still the caller's
