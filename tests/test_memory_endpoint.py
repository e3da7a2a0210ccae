"""The in-memory endpoint: answers from a callable, counts as the HTTP one does, keeps
to its share, and goes down when told to."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import anyio
import pytest
from anyio import wait_all_tasks_blocked

from engine.errors import ModelError
from engine.http.endpoint import Completion, ModelEndpoint
from engine.stats import ModelStats
from engine.testing.memory_endpoint import MemoryEndpoint

ASK = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


def shout(messages: list[dict[str, str]], extra: Mapping[str, Any] | None) -> str:
    return messages[-1]["content"].upper() + " there"


async def test_it_answers_from_its_callable_and_counts_the_reply() -> None:
    stats = ModelStats(name="teacher", cap=1)
    endpoint: ModelEndpoint = MemoryEndpoint(shout, name="teacher", cap=4, stats=stats)
    async with endpoint:
        assert await endpoint.probe() == []
        completion = await endpoint.complete(ASK, {"temperature": 0})
    assert completion.texts == ["HI there"] and completion.finish_reasons == ["stop"]
    assert (completion.prompt_tokens, completion.completion_tokens) == (2, 2)
    snapshot = endpoint.statistics()
    assert (snapshot.name, snapshot.requests, snapshot.ok, snapshot.in_flight) == (
        "teacher",
        1,
        1,
        0,
    )
    assert (snapshot.prompt_tokens, snapshot.completion_tokens) == (2, 2)
    assert (snapshot.cap, snapshot.limit, snapshot.live, snapshot.down) == (4, 4, 1, False)
    assert stats.ok == 1  # the counters it was handed are the ones it writes


async def test_it_keeps_what_was_sent_and_returns_a_completion_as_given() -> None:
    given = Completion(["42"], ["length"], 7, 9, 0.5, traces=["thinking"], reasoning_tokens=3)
    endpoint = MemoryEndpoint(lambda m, e: given)
    assert await endpoint.complete(ASK, {"max_tokens": 9}) is given
    assert endpoint.sent == [ASK] and endpoint.extras == [{"max_tokens": 9}]
    assert endpoint.sent[0] is not ASK  # a copy: a task that edits its list changes nothing here
    snapshot = endpoint.statistics()
    assert (snapshot.completion_tokens, snapshot.reasoning_tokens) == (9, 3)


async def test_a_model_error_from_the_callable_fails_the_request_and_is_counted() -> None:
    def refuse(messages: list[dict[str, str]], extra: Mapping[str, Any] | None) -> str:
        raise ModelError("HTTP 400: no", retryable=False, status=400)

    endpoint = MemoryEndpoint(refuse)
    with pytest.raises(ModelError, match="HTTP 400: no"):
        await endpoint.complete(ASK)
    snapshot = endpoint.statistics()
    assert (snapshot.requests, snapshot.ok, snapshot.failures, snapshot.in_flight) == (1, 0, 1, 0)
    assert snapshot.replicas[0].failed == 1


async def test_nothing_goes_out_before_a_share_and_a_share_lets_it_out() -> None:
    endpoint = MemoryEndpoint(shout, cap=2)
    endpoint.set_share(None)
    assert (endpoint.statistics().cap, endpoint.statistics().limit) == (0, None)
    replies: list[str] = []

    async def ask() -> None:
        replies.append((await endpoint.complete(ASK)).texts[0])

    async with anyio.create_task_group() as group:
        group.start_soon(ask)
        group.start_soon(ask)
        await wait_all_tasks_blocked()
        assert replies == [] and endpoint.sent == []  # both wait for a share
        endpoint.set_share(1)
    assert replies == ["HI there", "HI there"]
    snapshot = endpoint.statistics()
    assert (snapshot.cap, snapshot.limit, snapshot.claim, snapshot.requests) == (1, 1, 1, 2)


async def test_a_share_caps_the_requests_in_flight() -> None:
    peak = 0
    endpoint = MemoryEndpoint(shout, cap=2)

    def watch(messages: list[dict[str, str]], extra: Mapping[str, Any] | None) -> str:
        nonlocal peak
        peak = max(peak, endpoint.statistics().in_flight)
        return "ok"

    endpoint.answer = watch
    async with anyio.create_task_group() as group:
        for _ in range(5):
            group.start_soon(endpoint.complete, ASK)
    assert peak == 2 and endpoint.statistics().requests == 5


async def test_an_unreachable_one_is_reported_and_down_from_the_start() -> None:
    endpoint = MemoryEndpoint(shout, name="gen", reachable=False)
    endpoint.down_from_start()  # live until a probe says otherwise: nothing happens
    assert (await endpoint.complete(ASK)).texts == ["HI there"]
    assert await endpoint.probe() == ["models.gen: cannot reach memory://gen"]
    assert endpoint.statistics().live == 0 and len(endpoint.statistics().outages) == 1
    endpoint.down_from_start()
    assert endpoint.statistics().down
    with pytest.raises(ModelError) as failed:
        await endpoint.complete(ASK)
    assert failed.value.model_down
