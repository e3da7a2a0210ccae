"""End to end: `task: generate` on the mock server, from a template over columns.

Every generation must be exactly what the mock answers to the prompt the row
rendered; JSON replies are the mock's value for the request's schema.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
import yaml

from engine.testing.mock_replies import count_words, json_reply, prompt_tokens
from engine.testing.mock_server import Faults, MockServer, reply_for, request_key
from tests.conftest import by_id, kill_after, read_jsonl, turnstile, write_jsonl

TEMPLATE = "Write a {{ difficulty }} question about {{ topic }}."
SYSTEM = "You write exam questions."
SCHEMA = {
    "type": "object",
    "properties": {
        "question": {"type": "string"},
        "difficulty": {"type": "string", "enum": ["easy", "hard"]},
        "points": {"type": "integer", "minimum": 1},
    },
    "required": ["question", "difficulty", "points"],
}


def topics(n: int) -> list[dict[str, Any]]:
    """Rows with columns and no messages; every third has no id (its line is its id)."""
    rows: list[dict[str, Any]] = []
    for i in range(n):
        row: dict[str, Any] = {"topic": f"topic number {i}", "difficulty": ("easy", "hard")[i % 2]}
        if i % 3:
            row["id"] = f"q{i}"
        if i % 4 == 0:
            row["source"] = {"book": i}
        rows.append(row)
    return rows


def row_id(source: dict[str, Any], line: int) -> Any:
    return source.get("id", line)


def gen_config(
    folder: Path,
    base_url: str,
    *,
    cap: int = 4,
    params: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    **section: Any,
) -> Path:
    generate: dict[str, Any] = {"model": "writer", "template": TEMPLATE, **section}
    generate = {k: v for k, v in generate.items() if v is not None}
    config: dict[str, Any] = {
        "task": "generate",
        "input": "topics.jsonl",
        "output": "out/questions.jsonl",
        "checkpoint_dir": "ck",
        "models": {
            "writer": {
                "base_url": base_url,
                "model": "mock",
                "max_concurrency": cap,
                "timeout_s": 10,
                "params": params if params is not None else {"temperature": 0.7, "seed": 11},
                **(model or {}),
            }
        },
        "generate": generate,
        "progress_interval_s": 60,
    }
    path = folder / "gen.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def expected_prompt(source: dict[str, Any], system: str | None = SYSTEM) -> list[dict[str, str]]:
    user = {
        "role": "user",
        "content": f"Write a {source['difficulty']} question about {source['topic']}.",
    }
    return [{"role": "system", "content": system}, user] if system else [user]


def json_answer(prompt: list[dict[str, str]]) -> Any:
    """What the mock answers a request for ``SCHEMA`` with."""
    return json_reply(SCHEMA, reply_for("mock", prompt))


async def test_each_generation_is_the_models_reply_to_the_rendered_template(
    tmp_path: Path, mock: MockServer
) -> None:
    source = topics(12)
    source[1]["prompt"] = "an input column named like an own key"  # overridden
    write_jsonl(tmp_path / "topics.jsonl", source)
    config = gen_config(tmp_path, mock.base_url, system_prompt=SYSTEM, num_generations=2)

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 0, result.stderr
    rows = by_id(read_jsonl(tmp_path / "out" / "questions.jsonl"))
    assert set(rows) == {row_id(s, i) for i, s in enumerate(source)}
    for line, src in enumerate(source):
        row = rows[row_id(src, line)]
        prompt = expected_prompt(src)
        reply = reply_for("mock", prompt)
        assert row["prompt"] == prompt
        assert row["generations"] == [reply, reply]
        assert row["model"] == "mock"
        assert row["usage"] == {
            "prompt_tokens": 2 * prompt_tokens(prompt),
            "completion_tokens": 2 * count_words(reply),
            "reasoning_tokens": 0,
        }
        assert row["topic"] == src["topic"] and row["difficulty"] == src["difficulty"]
        assert row.get("source") == src.get("source")
        assert list(row)[-5:] == ["id", "prompt", "generations", "model", "usage"]
        assert "truncated_generations" not in row
        assert mock.stats.requests_by_key[request_key("mock", prompt)] == 2
    assert mock.stats.total_requests == mock.stats.completed == 2 * len(source)


async def test_a_row_missing_a_column_fails_alone(tmp_path: Path, mock: MockServer) -> None:
    source = topics(6)
    del source[2]["topic"]
    del source[4]["difficulty"]
    write_jsonl(tmp_path / "topics.jsonl", source)
    config = gen_config(tmp_path, mock.base_url)

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 1, result.stderr
    done = by_id(read_jsonl(tmp_path / "out" / "questions.jsonl"))
    assert set(done) == {row_id(s, i) for i, s in enumerate(source) if i not in (2, 4)}
    failed = {f["line"]: f for f in read_jsonl(tmp_path / "out" / "questions.failed.jsonl")}
    assert sorted(failed) == [2, 4]
    assert failed[2]["id"] == "q2"
    assert failed[2]["error"] == "input: the template uses 'topic', which this row does not have"
    assert failed[4]["error"] == (
        "input: the template uses 'difficulty', which this row does not have"
    )
    assert mock.stats.total_requests == 4  # nothing was asked for the failed rows


async def test_a_template_that_does_not_compile_stops_before_any_request(
    tmp_path: Path, mock: MockServer
) -> None:
    write_jsonl(tmp_path / "topics.jsonl", topics(3))
    config = gen_config(tmp_path, mock.base_url, template="About {{ topic }}\nand {% if x %}")

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 2
    assert "generate.template: the template does not compile: line 2:" in result.stderr
    assert mock.stats.total_requests == 0
    assert not (tmp_path / "out" / "questions.jsonl").exists()


async def test_a_template_file_is_read_beside_the_config(tmp_path: Path, mock: MockServer) -> None:
    source = topics(3)
    write_jsonl(tmp_path / "topics.jsonl", source)
    (tmp_path / "q.j2").write_text(TEMPLATE + "\n")
    config = gen_config(tmp_path, mock.base_url, template=None, template_file="q.j2")

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 0, result.stderr
    rows = by_id(read_jsonl(tmp_path / "out" / "questions.jsonl"))
    assert {k: r["prompt"] for k, r in rows.items()} == {
        row_id(s, i): expected_prompt(s, None) for i, s in enumerate(source)
    }


async def test_json_replies_are_parsed_objects(tmp_path: Path, mock: MockServer) -> None:
    source = topics(8)
    write_jsonl(tmp_path / "topics.jsonl", source)
    config = gen_config(tmp_path, mock.base_url, json_schema=SCHEMA, num_generations=2)

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 0, result.stderr
    rows = by_id(read_jsonl(tmp_path / "out" / "questions.jsonl"))
    assert len(rows) == len(source)
    for line, src in enumerate(source):
        row = rows[row_id(src, line)]
        # The mock answers JSON only when the request carries the schema as response_format.
        answer = json_answer(expected_prompt(src, None))
        assert isinstance(answer, dict) and set(answer) == set(SCHEMA["properties"])
        assert row["generations"] == [answer, answer]
    assert mock.stats.total_requests == 2 * len(source)


async def test_invalid_json_replies_are_asked_for_again_and_counted(
    tmp_path: Path, mock: MockServer
) -> None:
    mock.faults = Faults(rate_invalid_json=0.3, seed=3)
    source = topics(30)
    write_jsonl(tmp_path / "topics.jsonl", source)
    # 0.3 ** 11: no generation runs out of tries in this test.
    config = gen_config(tmp_path, mock.base_url, json_schema=SCHEMA, max_invalid=10)

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 0, result.stderr
    invalid = mock.stats.faults["invalid_json"]
    assert invalid > 0
    assert mock.stats.total_requests == len(source) + invalid
    rows = by_id(read_jsonl(tmp_path / "out" / "questions.jsonl"))
    assert len(rows) == len(source)
    for line, src in enumerate(source):
        row = rows[row_id(src, line)]
        prompt = expected_prompt(src, None)
        assert row["generations"] == [json_answer(prompt)]
        # Usage sums every request of the row, the invalid replies too.
        requests = mock.stats.requests_by_key[request_key("mock", prompt)]
        assert row["usage"]["prompt_tokens"] == requests * prompt_tokens(prompt)


async def test_a_generation_out_of_tries_fails_its_row_with_the_reason(
    tmp_path: Path, mock: MockServer
) -> None:
    mock.faults = Faults(rate_invalid_json=1.0)
    write_jsonl(tmp_path / "topics.jsonl", topics(4))
    config = gen_config(tmp_path, mock.base_url, json_schema=SCHEMA, max_invalid=2)

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 1, result.stderr
    assert read_jsonl(tmp_path / "out" / "questions.jsonl") == []
    failed = read_jsonl(tmp_path / "out" / "questions.failed.jsonl")
    assert len(failed) == 4
    for f in failed:
        assert f["error"].startswith("generation 0: 3 invalid replies (max_invalid: 2)")
        assert "the reply is not JSON" in f["error"]
        assert f["generation"] == 0
    assert mock.stats.total_requests == 4 * 3  # one request and two more per row


async def test_a_reply_cut_off_by_max_tokens_is_marked_for_the_filters(
    tmp_path: Path, mock: MockServer
) -> None:
    source = topics(4)
    write_jsonl(tmp_path / "topics.jsonl", source)
    path = gen_config(tmp_path, mock.base_url, params={"max_tokens": 4}, num_generations=2)
    raw = yaml.safe_load(path.read_text())
    raw["filters"] = {"truncated": True}
    path.write_text(yaml.safe_dump(raw))

    result = await turnstile("run", str(path), "--quiet")

    assert result.returncode == 0, result.stderr
    assert read_jsonl(tmp_path / "out" / "questions.jsonl") == []
    filtered = read_jsonl(tmp_path / "out" / "questions.filtered.jsonl")
    assert len(filtered) == len(source)
    for row in filtered:
        assert row["truncated_generations"] == [0, 1]
        assert all(len(g.split()) == 4 for g in row["generations"])
        assert row["filter"] == "truncated: the reply in generation 0 was cut off by max_tokens"


async def test_with_fail_on_length_a_cut_off_reply_fails_its_row(
    tmp_path: Path, mock: MockServer
) -> None:
    write_jsonl(tmp_path / "topics.jsonl", topics(3))
    config = gen_config(
        tmp_path, mock.base_url, params={"max_tokens": 4}, model={"fail_on_length": True}
    )

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 1, result.stderr
    failed = read_jsonl(tmp_path / "out" / "questions.failed.jsonl")
    assert len(failed) == 3
    assert all("cut off by max_tokens" in f["error"] for f in failed)


async def test_a_model_that_is_down_stops_the_run_resumable(
    tmp_path: Path, mock: MockServer
) -> None:
    mock.faults = Faults(fail_models={"mock": 500})
    write_jsonl(tmp_path / "topics.jsonl", topics(3))
    config = gen_config(
        tmp_path, mock.base_url, num_generations=2, model={"down_after_s": 0.5, "max_retries": 1}
    )

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 3, result.stderr
    assert "down" in result.stderr
    assert read_jsonl(tmp_path / "out" / "questions.failed.jsonl") == []


@pytest.mark.parametrize("schema", [False, True], ids=["text", "json_with_invalid_replies"])
async def test_sigkill_then_rerun_equals_an_uninterrupted_run(
    tmp_path: Path, mock: MockServer, schema: bool
) -> None:
    source = topics(60)
    section: dict[str, Any] = {"num_generations": 3, "system_prompt": SYSTEM}
    if schema:
        section.update(json_schema=SCHEMA, max_invalid=20)
    cap = 4
    reference = tmp_path / "reference"
    reference.mkdir()
    write_jsonl(reference / "topics.jsonl", source)
    done = await turnstile("run", str(gen_config(reference, mock.base_url, **section)), "--quiet")
    assert done.returncode == 0, done.stderr
    expected = by_id(read_jsonl(reference / "out" / "questions.jsonl"))

    mock.reset()
    mock.latency_ms = 5
    if schema:
        mock.faults = Faults(rate_invalid_json=0.3, seed=1)
    write_jsonl(tmp_path / "topics.jsonl", source)
    config = gen_config(tmp_path, mock.base_url, cap=cap, **section)
    killed = await kill_after(mock, 60, "run", str(config), "--quiet")
    assert killed.returncode == -signal.SIGKILL
    assert 0 < len(read_jsonl(tmp_path / "out" / "questions.jsonl")) < len(source)

    rerun = await turnstile("run", str(config), "--quiet")

    assert rerun.returncode == 0, rerun.stderr
    assert "resuming" in rerun.stderr
    rows = by_id(read_jsonl(tmp_path / "out" / "questions.jsonl"))
    if not schema:
        assert rows == expected
    else:
        # Which replies were invalid depends on arrival order: so do the usage counts.
        assert {k: r["generations"] for k, r in rows.items()} == {
            k: r["generations"] for k, r in expected.items()
        }
        for i, src in enumerate(source):
            prompt = expected_prompt(src)
            sent = mock.stats.requests_by_key[request_key("mock", prompt)]
            usage = rows[row_id(src, i)]["usage"]
            # Each reply the row was charged for was requested; only those lost in
            # flight at the kill were requested without being charged.
            assert 3 * prompt_tokens(prompt) <= usage["prompt_tokens"]
            assert usage["prompt_tokens"] <= sent * prompt_tokens(prompt)
    # Each row asks for 3 generations of the same prompt: beyond those (and the invalid
    # replies' re-requests), only requests in flight at the kill may be sent again.
    invalid = mock.stats.faults["invalid_json"]
    total = mock.stats.total_requests
    repeated = total - 3 * len(source) - invalid
    assert 0 <= repeated <= 2 * cap
