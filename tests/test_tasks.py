"""Tasks in process: the registry, and runners driven by in-memory endpoints and a real writer.

No server: an in-memory endpoint answers from a function of the messages, and the
run's real writer journals and writes the rows, so a task's whole contract (what
it sends, what it journals, what it writes, how it resumes) is checked directly.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from engine.checkpoint.writer import Writer
from engine.config import RunConfig, parse_config
from engine.errors import ModelError
from engine.http.endpoint import Completion, ModelEndpoint
from engine.stats import ModelStats, RunStats
from engine.tasks import kind_of, registry
from engine.tasks.base import Context, usage_of
from engine.testing.memory_endpoint import MemoryEndpoint
from tests.conftest import read_jsonl
from tests.journal_support import replay

Answer = Callable[[list[dict[str, str]], Mapping[str, Any] | None], str]


def fake(answer: Answer) -> MemoryEndpoint:
    """An endpoint that answers with ``answer``: a reply costs a token per message and 2."""
    return MemoryEndpoint(lambda messages, extra: reply(answer(messages, extra), messages))


def reply(text: str, messages: list[dict[str, str]]) -> Completion:
    if text == "FAIL":
        raise ModelError("HTTP 400: refused", retryable=False, status=400)
    return Completion(
        [text],
        ["stop"],
        prompt_tokens=len(messages),
        completion_tokens=2,
        latency_s=0.0,
        replica=0,
    )


def echo(messages: list[dict[str, str]], extra: Mapping[str, Any] | None) -> str:
    return f"re: {messages[-1]['content']}"


def config_for(folder: Path, task: str, section: dict[str, Any], **models: Any) -> RunConfig:
    raw = {
        "task": task,
        "input": "in.jsonl",
        "output": "out.jsonl",
        "checkpoint_dir": "ck",
        "models": models or {"m": {"base_url": "http://127.0.0.1:1/v1", "model": "served-m"}},
        task: section,
    }
    return parse_config(raw, folder / "job.yaml", env={})


@asynccontextmanager
async def running(
    config: RunConfig, clients: Mapping[str, ModelEndpoint]
) -> AsyncIterator[Context]:
    path = config.checkpoint_dir / "journal.jsonl"
    state = replay(path, _size(config.output), _size(config.failed_output), 0)
    writer = Writer(
        path,
        config.output,
        config.failed_output,
        journal_end=state.journal_end,
        out_end=state.out_end,
        failed_end=state.failed_end,
        policy=config.journal,
    )
    stats = RunStats(models={n: ModelStats(name=n, cap=1) for n in clients})
    ctx = Context(config, config.kind, writer, dict(clients), stats)
    async with anyio.create_task_group() as group:
        group.start_soon(writer.run)
        yield ctx
        await writer.close()


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def journal(config: RunConfig) -> list[dict[str, Any]]:
    return read_jsonl(config.checkpoint_dir / "journal.jsonl")


def test_the_registry_finds_every_task_package() -> None:
    assert {"distill", "preference", "generate"} <= set(registry())
    assert kind_of("distill").name == "distill"
    with pytest.raises(KeyError):
        kind_of("translate")


def test_usage_is_summed_over_a_rows_completions() -> None:
    assert usage_of([(3, 1), (5, 2)]) == {"prompt_tokens": 8, "completion_tokens": 3}
    assert usage_of([]) == {"prompt_tokens": 0, "completion_tokens": 0}


async def test_distill_runner_answers_every_user_message_and_journals_each_turn(
    tmp_path: Path,
) -> None:
    config = config_for(tmp_path, "distill", {"model": "m"})
    task = config.kind.build(config)
    client = fake(echo)
    record = {
        "id": "c",
        "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    }

    async with running(config, {"m": client}) as ctx:
        await task.process(record, ctx.row(0, []))

    [row] = read_jsonl(config.output)
    assert row["messages"] == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "re: a"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "re: b"},
    ]
    assert row["model"] == "served-m"
    assert row["usage"] == {"prompt_tokens": 1 + 3, "completion_tokens": 4, "reasoning_tokens": 0}
    # The first turn journaled as it landed; the last with the row, which holds its
    # text: the row's v record stands for it (its place in the output, no second copy).
    records = journal(config)
    assert [r["i"] for r in records if r["k"] == "t"] == [0]
    [place] = [r for r in records if r["k"] == "v"]
    assert (place["l"], place["b"], place["e"]) == (0, 0, config.output.stat().st_size)
    assert client.sent == [row["messages"][:1], row["messages"][:3]]


async def test_distill_runner_resumes_from_its_journaled_turns(tmp_path: Path) -> None:
    config = config_for(tmp_path, "distill", {"model": "m"})
    task = config.kind.build(config)
    record = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}
    earlier = [{"k": "t", "l": 0, "i": 0, "c": "from before", "p": 1, "o": 1, "f": "stop"}]
    client = fake(echo)

    async with running(config, {"m": client}) as ctx:
        await task.process(record, ctx.row(0, earlier))

    [row] = read_jsonl(config.output)
    assert [m["content"] for m in row["messages"]] == ["a", "from before", "b", "re: b"]
    assert len(client.sent) == 1  # the journaled turn was not requested again
    assert ctx.stats.turns_resumed == 1 and ctx.stats.turns_done == 1


async def test_a_row_that_cannot_be_parsed_fails_alone_with_its_line(tmp_path: Path) -> None:
    config = config_for(tmp_path, "distill", {"model": "m"})
    task = config.kind.build(config)
    client = fake(echo)

    async with running(config, {"m": client}) as ctx:
        await task.process({"id": "bad", "messages": "not a list"}, ctx.row(4, []))
        client.answer = lambda m, e: reply("FAIL", m)
        await task.process({"id": "refused", "prompt": "x"}, ctx.row(5, []))

    bad, refused = read_jsonl(config.failed_output)
    assert (bad["id"], bad["line"], bad["turn"]) == ("bad", 4, None)
    assert bad["error"].startswith("input: 'messages' must be a non-empty list")
    assert (refused["id"], refused["line"], refused["turn"]) == ("refused", 5, 0)
    assert refused["error"] == "HTTP 400: refused"
    assert ctx.stats.rows_failed == 2 and ctx.stats.rows_done == 2
    assert not read_jsonl(config.output)


async def test_preference_runner_generates_judges_and_pairs(tmp_path: Path) -> None:
    url = "http://127.0.0.1:1/v1"
    config = config_for(
        tmp_path,
        "preference",
        {"generators": ["a", "b"], "judge": "j"},
        a={"base_url": url, "model": "model-a"},
        b={"base_url": url, "model": "model-b"},
        j={"base_url": url, "model": "judge-m"},
    )
    task = config.kind.build(config)

    def judge(messages: list[dict[str, str]], extra: Mapping[str, Any] | None) -> str:
        return (
            "#### Output for Text 1\nRating: 2\nRationale: meh\n\n"
            "#### Output for Text 2\nRating: 5\nRationale: good"
        )

    clients = {
        "a": fake(lambda m, e: "answer from a"),
        "b": fake(lambda m, e: "answer from b"),
        "j": fake(judge),
    }

    async with running(config, clients) as ctx:
        await task.process({"id": "p", "prompt": "which is better?"}, ctx.row(0, []))

    [row] = read_jsonl(config.output)
    assert row["generations"] == ["answer from a", "answer from b"]
    assert row["generation_models"] == ["model-a", "model-b"]
    assert row["ratings"] == [2, 5]
    assert row["chosen"] == [{"role": "assistant", "content": "answer from b"}]
    assert row["rejected"] == [{"role": "assistant", "content": "answer from a"}]
    kinds = [r["k"] for r in journal(config)]
    assert kinds.count("g") == 2 and kinds.count("r") == 1
    assert orjson.loads(orjson.dumps(row["usage"]))["completion_tokens"] == 6
