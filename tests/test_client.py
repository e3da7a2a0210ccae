"""The model client against the mock server, with time injected: no test sleeps."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.client import ModelClient, parse_completion
from engine.config import ModelConfig
from engine.errors import ModelDown, ModelError
from engine.mock_server import Faults, MockServer, reply_for
from engine.ratelimit import TokenBucket, estimate_tokens, per_minute
from engine.stats import ModelStats

MESSAGES = [{"role": "user", "content": "hello"}]


class Sleeps:
    """An injected sleep that returns at once and remembers what it was asked."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def client_for(server: MockServer, sleeps: Sleeps, **fields: object) -> ModelClient:
    config = ModelConfig(name="m", base_url=server.base_url, model="mock", **fields)  # type: ignore[arg-type]
    return ModelClient(config, ModelStats(name="m", cap=config.max_concurrency), sleep=sleeps)


async def test_a_reply_and_its_usage(mock: MockServer) -> None:
    sleeps = Sleeps()
    async with client_for(mock, sleeps, params={"temperature": 0.5}) as client:
        completion = await client.complete(MESSAGES)
    assert completion.texts == [reply_for("mock", MESSAGES)]
    assert completion.finish_reasons == ["stop"]
    assert completion.prompt_tokens > 0 and completion.completion_tokens > 0
    assert client.stats.ok == 1 and sleeps.calls == []


async def test_429_waits_what_retry_after_says_without_holding_a_slot(mock: MockServer) -> None:
    mock.faults = Faults(rate_429=1.0, retry_after_s=3)
    sleeps = Sleeps()
    async with client_for(mock, sleeps, max_retries=2, max_concurrency=4) as client:
        with pytest.raises(ModelError) as caught:
            await client.complete(MESSAGES)
    assert len(sleeps.calls) == 2
    assert all(3 <= s < 4.5 for s in sleeps.calls)  # Retry-After plus a little jitter
    assert caught.value.model_down  # nothing ever succeeded
    assert "gave up after 3 attempts" in str(caught.value)
    # Each retry was sent under the limit the previous 429 set: 4 -> 2 -> 1.
    assert client.limiter.limit == 1
    assert client.limiter.in_flight == 0


async def test_a_burst_of_429s_shrinks_the_limit_once_and_success_grows_it_back(
    mock: MockServer,
) -> None:
    import anyio

    mock.faults = Faults(rate_429=1.0, retry_after_s=1)
    mock.latency_ms = 50  # so the 8 requests are in flight together
    sleeps = Sleeps()
    async with client_for(mock, sleeps, max_retries=0, max_concurrency=8) as client:

        async def one() -> None:
            with pytest.raises(ModelError):
                await client.complete(MESSAGES)

        async with anyio.create_task_group() as group:
            for _ in range(8):
                group.start_soon(one)
        assert mock.stats.peak_in_flight == 8
        assert client.limiter.limit == 4  # eight 429s, one burst: halved once
        assert client.stats.limit == 4  # what the progress display shows

        mock.faults = Faults()
        mock.latency_ms = 0
        for _ in range(4 + 5):
            await client.complete(MESSAGES)
        assert client.limiter.limit == 6  # +1 after 4 successes, +1 after 5 more


async def test_a_400_is_permanent_and_not_retried(mock: MockServer) -> None:
    mock.faults = Faults(fail_models={"mock": 400})
    sleeps = Sleeps()
    async with client_for(mock, sleeps) as client:
        with pytest.raises(ModelError) as caught:
            await client.complete(MESSAGES)
    assert not caught.value.retryable and not caught.value.model_down
    assert mock.stats.total_requests == 1 and sleeps.calls == []


async def test_500s_back_off_exponentially(mock: MockServer) -> None:
    mock.faults = Faults(rate_500=1.0)
    sleeps = Sleeps()
    async with client_for(mock, sleeps, max_retries=4) as client:
        with pytest.raises(ModelError):
            await client.complete(MESSAGES)
    assert len(sleeps.calls) == 4
    for attempt, wait in enumerate(sleeps.calls):
        ceiling = 0.5 * 2**attempt
        assert ceiling / 2 <= wait <= ceiling


async def test_requests_per_minute_paces_requests(mock: MockServer) -> None:
    sleeps = Sleeps()
    async with client_for(mock, sleeps, requests_per_minute=60) as client:
        for _ in range(3):
            await client.complete(MESSAGES)
    # One a second, with a burst of one: the 2nd waits ~1 s, the 3rd ~2 s (the
    # injected sleep returns at once, so no time passes between them).
    assert len(sleeps.calls) == 2
    assert sleeps.calls[0] == pytest.approx(1.0, abs=0.1)
    assert sleeps.calls[1] == pytest.approx(2.0, abs=0.1)


async def test_an_unreachable_server_is_named_by_the_probe(tmp_path: Path) -> None:
    config = ModelConfig(name="teacher", base_url="http://127.0.0.1:9/v1", model="x")
    async with ModelClient(config, ModelStats(name="teacher", cap=1)) as client:
        with pytest.raises(ModelDown, match=r"models\.teacher: cannot reach"):
            await client.probe()


def test_parse_completion_classifies_bad_bodies() -> None:
    for body in (b"<html>", b'{"choices": []}', b'{"choices": [{"message": {"content": " "}}]}'):
        with pytest.raises(ModelError) as caught:
            parse_completion(body)
        assert caught.value.retryable


def test_token_bucket_queues_callers_in_order() -> None:
    bucket = TokenBucket(rate=2.0, burst=2.0, now=0.0)
    assert bucket.reserve(1, now=0.0) == 0.0
    assert bucket.reserve(1, now=0.0) == 0.0
    assert bucket.reserve(1, now=0.0) == pytest.approx(0.5)
    assert bucket.reserve(1, now=0.0) == pytest.approx(1.0)
    assert bucket.reserve(1, now=10.0) == 0.0  # refilled, but never above the burst
    assert bucket.reserve(2, now=10.0) == pytest.approx(0.5)


def test_token_bucket_adjusts_for_what_a_request_really_used() -> None:
    bucket = per_minute(600, now=0.0)  # 10/s, burst 10
    assert bucket.reserve(10, now=0.0) == 0.0
    bucket.adjust(-5, now=0.0)  # it used 5 fewer than reserved
    assert bucket.reserve(5, now=0.0) == 0.0
    bucket.adjust(10, now=0.0)  # and another used 10 more
    assert bucket.reserve(1, now=0.0) == pytest.approx(1.1)


def test_estimate_tokens_counts_the_body_and_max_tokens() -> None:
    assert estimate_tokens(400, 50) == 150
    assert estimate_tokens(400, None) == 100 + 256
