"""End to end with a reasoning teacher: the mock thinks in each dialect, runs are killed
with SIGKILL and resumed, cut-off replies fail their rows, exports keep, inline or drop."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from engine.output.traces import inline
from engine.testing.mock_replies import REASONING_DIALECTS, trace_for
from engine.testing.mock_server import MockServer, reply_for
from tests.conftest import (
    by_id,
    conversations,
    kill_after,
    read_jsonl,
    start_turnstile,
    turnstile,
    write_config,
    write_jsonl,
)
from tests.test_distill_run import expected_turns
from tests.test_generate_run import SCHEMA, gen_config, topics
from tests.test_preference_run import expected_prompt, prefs_config, prompts

TRACE_CHARS = 2000
TRACE = "reasoning_content"


def answers_only(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in m.items() if k != TRACE} for m in messages]


def assert_traced(row: dict[str, Any], *, keep: bool = False) -> None:
    """Each assistant turn is the mock's answer and trace for the history it was sent:
    earlier answers only (drop), or earlier answers with their traces (keep)."""
    messages = row["messages"]
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    assert assistant, row
    for i in assistant:
        sent = messages[:i] if keep else answers_only(messages[:i])
        assert messages[i] == {
            "role": "assistant",
            "content": reply_for("mock", sent),
            TRACE: trace_for("mock", sent, 0, TRACE_CHARS),
        }, (row["id"], i)


def distill_config(folder: Path, mock: MockServer, *, cap: int = 4, **distill: Any) -> Path:
    return write_config(
        folder,
        mock.base_url,
        cap=cap,
        distill={"model": "teacher", **distill},
    )


@pytest.mark.parametrize("dialect", REASONING_DIALECTS)
async def test_sigkill_then_resume_keeps_every_trace_in_each_dialect(
    tmp_path: Path, mock: MockServer, dialect: str
) -> None:
    mock.reasoning, mock.reasoning_chars = dialect, TRACE_CHARS
    mock.latency_ms = 2
    source = conversations(40)
    write_jsonl(tmp_path / "in.jsonl", source)
    cap = 4
    config = str(distill_config(tmp_path, mock, cap=cap))
    total_turns = sum(expected_turns(s) for s in source)

    killed = await kill_after(mock, total_turns // 2, "run", config, "--quiet")
    assert killed.returncode == -signal.SIGKILL
    journal = b"".join(p.read_bytes() for p in sorted((tmp_path / "ck").glob("journal*")))
    assert journal.count(b'"r":"Thinking about') > 0  # traces are journaled with their turns
    rerun = await turnstile("run", config, "--quiet")

    assert rerun.returncode == 0, rerun.stderr
    assert "resuming" in rerun.stderr
    rows = by_id(read_jsonl(tmp_path / "out" / "distilled.jsonl"))
    assert set(rows) == {s["id"] for s in source}
    for src in source:
        row = rows[src["id"]]
        assert_traced(row)
        assert sum(m["role"] == "assistant" for m in row["messages"]) == expected_turns(src)
        assert row["usage"]["reasoning_tokens"] > 0
        assert row["usage"]["completion_tokens"] > row["usage"]["reasoning_tokens"]
    requests = mock.stats.requests_by_key
    assert len(requests) == total_turns  # no request ever carried a trace back
    repeated = sum(count - 1 for count in requests.values() if count > 1)
    assert repeated <= 2 * cap  # only turns in flight at the kill were asked again
    assert "reasoning tokens" in rerun.stderr  # the summary


async def test_reasoning_history_keep_sends_each_trace_back(
    tmp_path: Path, mock: MockServer
) -> None:
    mock.reasoning, mock.reasoning_chars = "reasoning_content", TRACE_CHARS
    source = conversations(12)
    write_jsonl(tmp_path / "in.jsonl", source)
    config = distill_config(tmp_path, mock, reasoning_history="keep")

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 0, result.stderr
    for row in read_jsonl(tmp_path / "out" / "distilled.jsonl"):
        assert_traced(row, keep=True)


async def test_reasoning_off_keeps_the_content_as_it_comes(
    tmp_path: Path, mock: MockServer
) -> None:
    mock.reasoning = "think"
    write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "why?"}])
    config = write_config(tmp_path, mock.base_url)
    raw = yaml.safe_load(config.read_text())
    raw["models"]["teacher"]["reasoning"] = "off"
    config.write_text(yaml.safe_dump(raw))

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 0, result.stderr
    (row,) = read_jsonl(tmp_path / "out" / "distilled.jsonl")
    reply = row["messages"][-1]
    assert TRACE not in reply and reply["content"].startswith("<think>\nThinking about")


async def test_a_reply_cut_off_while_reasoning_fails_its_row_and_is_never_asked_again(
    tmp_path: Path, mock: MockServer
) -> None:
    mock.reasoning, mock.reasoning_chars = "reasoning_content", TRACE_CHARS
    source = conversations(10)
    write_jsonl(tmp_path / "in.jsonl", source)
    config = write_config(tmp_path, mock.base_url)
    raw = yaml.safe_load(config.read_text())
    raw["models"]["teacher"]["params"]["max_tokens"] = 50  # the trace alone is ~300 words
    config.write_text(yaml.safe_dump(raw))

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 1, result.stderr
    assert not read_jsonl(tmp_path / "out" / "distilled.jsonl")
    failed = read_jsonl(tmp_path / "out" / "distilled.failed.jsonl")
    assert len(failed) == len(source)
    for record in failed:
        assert record["turn"] == 0
        assert record["error"].startswith("turn 0: the reply was cut off by max_tokens (50)")
    assert mock.stats.total_requests == len(source)  # one request per row, none repeated

    rerun = await turnstile("run", str(config), "--quiet")
    assert rerun.returncode == 1, rerun.stderr
    assert mock.stats.total_requests == len(source)


async def test_a_cut_off_reply_journaled_before_a_kill_is_not_asked_again(
    tmp_path: Path, mock: MockServer
) -> None:
    mock.reasoning, mock.reasoning_chars = "think", TRACE_CHARS
    mock.latency_ms = 2
    source = conversations(60)
    write_jsonl(tmp_path / "in.jsonl", source)
    config = write_config(tmp_path, mock.base_url, cap=4)
    raw = yaml.safe_load(config.read_text())
    raw["models"]["teacher"]["params"]["max_tokens"] = 50
    config.write_text(yaml.safe_dump(raw))

    killed = await kill_after(mock, 30, "run", str(config), "--quiet")
    assert killed.returncode == -signal.SIGKILL
    rerun = await turnstile("run", str(config), "--quiet")

    assert rerun.returncode == 1, rerun.stderr
    failed = by_id(read_jsonl(tmp_path / "out" / "distilled.failed.jsonl"))
    assert set(failed) == {s["id"] for s in source}
    repeated = sum(c - 1 for c in mock.stats.requests_by_key.values() if c > 1)
    assert repeated <= 2 * 4


async def test_generate_keeps_traces_beside_generations_and_validates_answers(
    tmp_path: Path, mock: MockServer
) -> None:
    mock.reasoning, mock.reasoning_chars = "think", 300
    source = topics(6)
    write_jsonl(tmp_path / "topics.jsonl", source)
    config = gen_config(tmp_path, mock.base_url, num_generations=2, json_schema=SCHEMA)

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 0, result.stderr
    for row in read_jsonl(tmp_path / "out" / "questions.jsonl"):
        assert all(isinstance(g, dict) for g in row["generations"])  # answers, parsed
        assert len(row["reasoning"]) == 2
        prompt = row["prompt"]
        assert row["reasoning"][0] == trace_for("mock", prompt, 0, 300)
        assert row["usage"]["reasoning_tokens"] > 0
    assert mock.stats.total_requests == 12  # no answer was invalid: no re-request


async def test_preference_traces_and_a_judge_that_reasons(tmp_path: Path, mock: MockServer) -> None:
    mock.reasoning, mock.reasoning_chars = "reasoning_content", 300
    source = prompts(9)
    write_jsonl(tmp_path / "in.jsonl", source)
    config = prefs_config(tmp_path, mock.base_url, num_generations=2)

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 0, result.stderr
    rows = by_id(read_jsonl(tmp_path / "out" / "prefs.jsonl"))
    for src in source:
        row = rows[src["id"]]
        prompt = expected_prompt(src)
        assert row["generations"][0] == reply_for("gen-a", prompt)
        assert row["generation_reasoning"][0] == trace_for("gen-a", prompt, 0, 300)
        assert len(row["generation_reasoning"]) == 4
        assert all(r is not None for r in row["ratings"])  # read from the judge's answer
        if row["chosen"] is not None:
            (chosen,) = row["chosen"]
            i = row["generations"].index(chosen["content"])
            assert chosen[TRACE] == row["generation_reasoning"][i]
            assert TRACE in row["rejected"][0]
    assert mock.stats.completed == len(source) * 5


async def test_export_keeps_inlines_or_drops_traces(tmp_path: Path, mock: MockServer) -> None:
    mock.reasoning, mock.reasoning_chars = "reasoning", 200
    write_jsonl(tmp_path / "in.jsonl", conversations(8))
    config = str(write_config(tmp_path, mock.base_url))
    assert (await turnstile("run", config, "--quiet")).returncode == 0
    written = by_id(read_jsonl(tmp_path / "out" / "distilled.jsonl"))

    exported: dict[str, dict[Any, dict[str, Any]]] = {}
    for mode in ("keep", "inline", "drop"):
        dest = tmp_path / f"{mode}.jsonl"
        proc = await start_turnstile(
            "export", config, "--format", "jsonl", "--to", str(dest), "--reasoning", mode
        )
        _, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        exported[mode] = by_id(read_jsonl(dest))
    assert exported["keep"] == written
    for row_id, row in written.items():
        for i, message in enumerate(row["messages"]):
            inlined = exported["inline"][row_id]["messages"][i]
            dropped = exported["drop"][row_id]["messages"][i]
            if message["role"] != "assistant":
                assert inlined == dropped == message
                continue
            assert TRACE not in inlined and TRACE not in dropped
            assert inlined["content"] == inline(message[TRACE], message["content"])
            assert dropped["content"] == message["content"]

    import engine

    dest = engine.export(config, format="parquet", to=tmp_path / "d.parquet", reasoning="drop")
    import pyarrow.parquet as pq

    table = pq.read_table(dest).to_pylist()
    assert all(TRACE not in m or m[TRACE] is None for row in table for m in row["messages"])
    assert orjson.dumps(table)  # plain values
