"""The mock server over real HTTP on loopback, and its pure reply functions."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import orjson
import pytest

from engine.testing.mock_replies import (
    DROP,
    HANG,
    MALFORMED,
    OK,
    RATE_LIMITED,
    SERVER_ERROR,
    judge_candidates,
    pick_fault,
)
from engine.testing.mock_server import Faults, MockServer, main, reply_for, request_key

ROOT = Path(__file__).resolve().parent.parent


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def chat(model: str, messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": messages, **extra}


@pytest.fixture
async def server() -> AsyncIterator[MockServer]:
    async with MockServer() as mock:
        yield mock


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def post(
    client: aiohttp.ClientSession, server: MockServer, body: Any, **kwargs: Any
) -> tuple[int, Any]:
    async with client.post(f"{server.base_url}/chat/completions", json=body, **kwargs) as resp:
        return resp.status, await resp.json()


# -- pure replies -----------------------------------------------------------------------


def test_reply_format_and_determinism() -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        user("first"),
        {"role": "assistant", "content": "ok"},
        user("  what   is\n\tthe capital of France, and also of Germany and Spain?  "),
    ]
    digest = hashlib.sha256(orjson.dumps(["m", messages, 0])).hexdigest()[:12]
    snippet = "what is the capital of France, and also "  # collapsed, then cut to 40 chars
    expected = f"[m] answer 2: {snippet} #{digest}"
    assert reply_for("m", messages) == expected
    assert reply_for("m", messages) == reply_for("m", [dict(m) for m in messages])
    assert reply_for("m", messages, 1) != expected
    assert reply_for("other", messages) != expected


def test_request_key_is_sha256_of_model_and_messages() -> None:
    messages = [user("hi")]
    assert request_key("m", messages) == hashlib.sha256(orjson.dumps(["m", messages])).hexdigest()
    assert request_key("m", messages) != request_key("n", messages)


def test_judge_candidates_skip_the_template_placeholders() -> None:
    prompt = (
        "## Format\n\nTexts:\n<text 1> [Text 1]\n<text 2> [Text 2]\n\n### Output\n...\n"
        "## Annotation\n\nInstruction: add\n\nTexts:\n<text 1> two\nlines\n<text 2>  four \n"
        "\n### Output\n"
    )
    assert judge_candidates(prompt) == [(1, "two\nlines"), (2, "four")]


def test_pick_fault_order_and_fail_models() -> None:
    faults = Faults(rate_hang=0.1, rate_drop=0.1, rate_429=0.1, rate_500=0.1, rate_malformed=0.1)
    assert [pick_fault(faults, "m", d) for d in (0.05, 0.15, 0.25, 0.35, 0.45, 0.55)] == [
        HANG,
        DROP,
        RATE_LIMITED,
        SERVER_ERROR,
        MALFORMED,
        OK,
    ]
    faults.fail_models["broken"] = 404
    assert pick_fault(faults, "broken", 0.99) == "fail_model"


def test_faults_validate() -> None:
    with pytest.raises(ValueError, match="rate_500"):
        Faults(rate_500=1.5)
    with pytest.raises(ValueError, match="add up"):
        Faults(rate_429=0.6, rate_500=0.6)
    with pytest.raises(ValueError, match="fail_models"):
        Faults(fail_models={"x": 200})


# -- chat completions over HTTP ---------------------------------------------------------


async def test_completion_shape_and_usage(
    server: MockServer, client: aiohttp.ClientSession
) -> None:
    messages = [{"role": "system", "content": "you are terse"}, user("hello there world")]
    status, body = await post(client, server, chat("m", messages, temperature=0.3, seed=1))
    assert status == 200
    content = reply_for("m", messages)
    assert body["object"] == "chat.completion"
    assert body["model"] == "m"
    assert body["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
    ]
    prompt_tokens = (3 + 3) + (3 + 3)
    completion_tokens = len(content.split())
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    assert server.stats.completed == 1


async def test_max_tokens_cuts_the_reply(server: MockServer, client: aiohttp.ClientSession) -> None:
    messages = [user("tell me a long story about dragons")]
    status, body = await post(client, server, chat("m", messages, max_tokens=3))
    assert status == 200
    choice = body["choices"][0]
    assert choice["message"]["content"] == "[m] answer 1:"
    assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3

    _, body = await post(client, server, chat("m", messages, max_tokens=1000))
    assert body["choices"][0]["finish_reason"] == "stop"


async def test_n_choices(server: MockServer, client: aiohttp.ClientSession) -> None:
    messages = [user("pick one")]
    _, body = await post(client, server, chat("m", messages, n=3))
    contents = [c["message"]["content"] for c in body["choices"]]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert contents == [reply_for("m", messages, i) for i in range(3)]
    assert len(set(contents)) == 3
    assert body["usage"]["completion_tokens"] == sum(len(c.split()) for c in contents)


async def test_judge_prompt(server: MockServer, client: aiohttp.ClientSession) -> None:
    free = "a free answer with no forced rating"
    prompt = (
        "Rate each text.\n\nTexts:\n"
        "<text 1> Paris. [[rating=4]]\n"
        "<text 2> No idea [[rating=none]]\n"
        f"<text 3> {free}\n\n"
        "### Output\n"
    )
    _, body = await post(client, server, chat("judge", [user(prompt)]))
    expected_free = 1 + int(hashlib.sha256(free.encode()).hexdigest(), 16) % 5
    blocks = body["choices"][0]["message"]["content"].split("\n\n")
    assert len(blocks) == 3
    heads = [block.splitlines()[:2] for block in blocks]
    assert heads == [
        ["#### Output for Text 1", "Rating: 4"],
        ["#### Output for Text 2", "Rating: N/A"],
        ["#### Output for Text 3", f"Rating: {expected_free}"],
    ]
    assert all(block.splitlines()[2].startswith("Rationale: ") for block in blocks)
    assert all(len(block.splitlines()) == 3 for block in blocks)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"model": "m"}, "'messages'"),
        ({"model": "m", "messages": []}, "'messages'"),
        ({"model": "m", "messages": [{"role": "user"}]}, "messages[0]"),
        ({"model": "m", "messages": [{"role": "user", "content": 3}]}, "messages[0]"),
        ({"messages": [{"role": "user", "content": "x"}]}, "'model'"),
        (chat("m", [user("x")], stream=True), "streaming is not supported by the mock"),
        (chat("m", [user("x")], n=0), "'n'"),
        (chat("m", [user("x")], max_tokens=0), "'max_tokens'"),
        ([1, 2], "JSON object"),
    ],
)
async def test_bad_body_is_400(
    server: MockServer, client: aiohttp.ClientSession, body: Any, fragment: str
) -> None:
    status, reply = await post(client, server, body)
    assert status == 400
    assert reply["error"]["type"] == "invalid_request_error"
    assert fragment in reply["error"]["message"]
    assert server.stats.bad_requests == 1
    assert not server.stats.requests_by_key


async def test_non_json_body_is_400(server: MockServer, client: aiohttp.ClientSession) -> None:
    async with client.post(f"{server.base_url}/chat/completions", data=b"{nope") as resp:
        assert resp.status == 400
        assert "invalid JSON" in (await resp.json())["error"]["message"]


# -- faults -----------------------------------------------------------------------------


async def test_fail_models_win_over_random_faults(client: aiohttp.ClientSession) -> None:
    faults = Faults(rate_429=1.0, fail_models={"broken": 500, "gone": 404})
    async with MockServer(faults=faults) as server:
        assert (await post(client, server, chat("broken", [user("x")])))[0] == 500
        status, body = await post(client, server, chat("gone", [user("x")]))
        assert status == 404
        assert "gone" in body["error"]["message"]
        assert (await post(client, server, chat("fine", [user("x")])))[0] == 429
        assert server.stats.faults == {"fail_model": 2, "429": 1}


async def test_rate_limit_has_retry_after(client: aiohttp.ClientSession) -> None:
    async with MockServer(faults=Faults(rate_429=1.0, retry_after_s=0.25)) as server:
        url = f"{server.base_url}/chat/completions"
        async with client.post(url, json=chat("m", [user("x")])) as resp:
            assert resp.status == 429
            assert float(resp.headers["Retry-After"]) == 0.25
            assert (await resp.json())["error"]["type"] == "rate_limit_error"


async def test_server_error(server: MockServer, client: aiohttp.ClientSession) -> None:
    server.faults.rate_500 = 1.0
    status, body = await post(client, server, chat("m", [user("x")]))
    assert status == 500
    assert body["error"]["type"] == "server_error"
    server.faults.rate_500 = 0.0
    assert (await post(client, server, chat("m", [user("x")])))[0] == 200
    assert server.stats.faults == {"500": 1}
    assert server.stats.completed == 1


async def test_drop_closes_the_connection(
    server: MockServer, client: aiohttp.ClientSession
) -> None:
    server.faults.rate_drop = 1.0
    with pytest.raises(aiohttp.ClientConnectionError):
        await post(client, server, chat("m", [user("x")]))
    assert server.stats.faults == {"drop": 1}


async def test_malformed_is_not_json(server: MockServer, client: aiohttp.ClientSession) -> None:
    server.faults.rate_malformed = 1.0
    async with client.post(f"{server.base_url}/chat/completions", json=chat("m", [user("x")])) as r:
        assert r.status == 200
        raw = await r.read()
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(raw)


async def test_hang_times_out_and_stop_still_returns(client: aiohttp.ClientSession) -> None:
    server = MockServer(faults=Faults(rate_hang=1.0))
    await server.start()
    try:
        with pytest.raises(TimeoutError):
            await post(client, server, chat("m", [user("x")]), timeout=aiohttp.ClientTimeout(0.2))
        # A second hung request, on a raw socket that stays open while the server stops.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        body = orjson.dumps(chat("m", [user("y")]))
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        writer.write(head.encode() + body)
        with pytest.raises(TimeoutError), anyio.fail_after(0.2):
            await reader.read(1)
    finally:
        with anyio.fail_after(10):  # a guard against a hang, not a timing assertion
            await server.stop()
    assert await reader.read() == b""  # dropped without a response
    writer.close()
    assert server.stats.faults[HANG] == 2
    assert server.stats.in_flight == 0


async def test_seeded_faults_repeat(client: aiohttp.ClientSession) -> None:
    async def statuses() -> list[int]:
        async with MockServer(faults=Faults(rate_500=0.5, seed=7)) as server:
            return [(await post(client, server, chat("m", [user(str(i))])))[0] for i in range(20)]

    first = await statuses()
    assert first == await statuses()
    assert set(first) == {200, 500}


# -- counters ---------------------------------------------------------------------------


async def test_peak_in_flight(client: aiohttp.ClientSession) -> None:
    async with MockServer(latency_ms=300) as server:
        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(post, client, server, chat("a" if i < 5 else "b", [user(str(i))]))
        stats = server.stats
        # No cap here: this checks the counter itself. Eight requests sent together and
        # each held 300 ms are all in flight at once, so the peak is exactly eight.
        assert stats.peak_in_flight <= 8, "the counter counted more requests than were sent"
        assert stats.peak_in_flight == 8
        assert stats.peak_in_flight_by_model == {"a": 5, "b": 3}
        assert stats.in_flight == 0
        assert stats.completed == 8


async def test_requests_by_key_and_reset(server: MockServer, client: aiohttp.ClientSession) -> None:
    one, two = [user("one")], [user("two")]
    for messages in (one, one, two):
        await post(client, server, chat("m", messages))
    assert server.stats.requests_by_key == {request_key("m", one): 2, request_key("m", two): 1}
    assert server.stats.total_requests == 3

    async with client.get(server.base_url.removesuffix("/v1") + "/stats") as resp:
        assert (await resp.json())["requests_by_key"][request_key("m", one)] == 2

    async with client.post(server.base_url.removesuffix("/v1") + "/reset") as resp:
        assert resp.status == 200
    assert server.stats.total_requests == 0
    assert not server.stats.requests_by_key


async def test_models_and_health(server: MockServer, client: aiohttp.ClientSession) -> None:
    await post(client, server, chat("teacher", [user("x")]))
    async with client.get(f"{server.base_url}/models") as resp:
        ids = [m["id"] for m in (await resp.json())["data"]]
    assert sorted(ids) == ["mock", "teacher"]
    async with client.get(server.base_url.removesuffix("/v1") + "/health") as resp:
        assert await resp.json() == {"status": "ok"}


# -- CLI --------------------------------------------------------------------------------


async def test_cli_serves_and_exits_on_sigterm(client: aiohttp.ClientSession) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "engine.testing.mock_server",
        "--port",
        "0",
        "--fail-model",
        "broken=503",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        with anyio.fail_after(60):
            line = (await proc.stdout.readline()).decode()
        assert line.startswith("mock server listening on http://127.0.0.1:")
        base_url = line.split()[-1]
        async with client.get(base_url.removesuffix("/v1") + "/health") as resp:
            assert await resp.json() == {"status": "ok"}
        async with client.post(
            f"{base_url}/chat/completions", json=chat("broken", [user("x")])
        ) as resp:
            assert resp.status == 503
        proc.send_signal(signal.SIGTERM)
        with anyio.fail_after(30):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_cli_rejects_bad_fail_model(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--fail-model", "broken"])
    assert exit_info.value.code == 2
    assert "NAME=STATUS" in capsys.readouterr().err


SCHEMA = {
    "type": "object",
    "properties": {
        "question": {"type": "string"},
        "difficulty": {"enum": ["easy", "hard"]},
        "points": {"type": "integer", "minimum": 1},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
    },
    "required": ["question", "difficulty", "points", "tags"],
}


def json_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": True}}


async def test_a_json_schema_request_gets_json_that_fits_it(
    server: MockServer, client: aiohttp.ClientSession
) -> None:
    import jsonschema

    body = chat("m", [user("a question")], response_format=json_format(SCHEMA))
    status, first = await post(client, server, body)
    _, second = await post(client, server, body)
    assert status == 200
    value = orjson.loads(first["choices"][0]["message"]["content"])
    jsonschema.validate(value, SCHEMA)
    assert len(value["tags"]) == 2
    assert first["choices"] == second["choices"]  # deterministic


async def test_invalid_json_fault_answers_text_that_is_not_json(
    server: MockServer, client: aiohttp.ClientSession
) -> None:
    server.faults = Faults(rate_invalid_json=1.0)
    body = chat("m", [user("a question")], response_format=json_format(SCHEMA))
    status, reply = await post(client, server, body)
    assert status == 200
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(reply["choices"][0]["message"]["content"])
    assert server.stats.faults["invalid_json"] == 1


async def test_a_response_format_that_is_not_a_schema_is_a_400(
    server: MockServer, client: aiohttp.ClientSession
) -> None:
    status, reply = await post(client, server, chat("m", [user("q")], response_format={"x": 1}))
    assert status == 400 and "response_format" in reply["error"]["message"]
