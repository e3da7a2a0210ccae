"""The model client against the mock server, with time injected: no test sleeps."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import pytest
from anyio.lowlevel import checkpoint

from engine.client import ModelClient, parse_completion
from engine.config import ModelConfig
from engine.errors import ModelDown, ModelError
from engine.limiter import Limiter
from engine.mock_server import Faults, MockServer, reply_for
from engine.ratelimit import TokenBucket, estimate_tokens, per_minute
from engine.stats import ModelStats

MESSAGES = [{"role": "user", "content": "hello"}]
OTHER = [{"role": "user", "content": "another question"}]


class FakeTime:
    """An injected clock and sleep: sleeping returns at once and moves the clock on.

    Each sleep remembers how long it was asked for and how many of the client's
    slots were held at that moment; ``during`` (if set) runs once, inside the
    first sleep, after the clock has moved.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.calls: list[float] = []
        self.held: list[int] = []
        self.limiter: Limiter | None = None
        self.during: Callable[[], Awaitable[None]] | None = None

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.calls.append(seconds)
        if self.limiter is not None:
            self.held.append(self.limiter.in_flight)
        self.now += seconds
        during, self.during = self.during, None
        if during is not None:
            await during()
        await checkpoint()


def client_for(
    server: MockServer, time: FakeTime, *, draw: float = 0.5, **fields: object
) -> ModelClient:
    config = ModelConfig(name="m", base_url=server.base_url, model="mock", **fields)  # type: ignore[arg-type]
    client = ModelClient(
        config,
        ModelStats(name="m", cap=config.max_concurrency),
        sleep=time.sleep,
        clock=time.clock,
        draw=lambda: draw,
    )
    time.limiter = client.limiter
    return client


async def test_a_reply_and_its_usage(mock: MockServer) -> None:
    time = FakeTime()
    async with client_for(mock, time, params={"temperature": 0.5}) as client:
        completion = await client.complete(MESSAGES)
    assert completion.texts == [reply_for("mock", MESSAGES)]
    assert completion.finish_reasons == ["stop"]
    assert completion.prompt_tokens > 0 and completion.completion_tokens > 0
    assert client.stats.ok == 1 and time.calls == []


async def test_429_waits_what_retry_after_says_without_holding_a_slot(mock: MockServer) -> None:
    mock.faults = Faults(rate_429=1.0, retry_after_s=3)
    time = FakeTime()
    async with client_for(mock, time, max_retries=2, max_concurrency=4, draw=0.0) as client:
        with pytest.raises(ModelError) as caught:
            await client.complete(MESSAGES)
    assert time.calls == [3.0, 3.0]  # Retry-After, and no jitter with a draw of 0
    assert time.held == [0, 0], "a retry held a slot while it waited"
    assert caught.value.model_down  # nothing ever succeeded
    assert "gave up after 3 attempts" in str(caught.value)
    # Each retry was sent under the limit the previous 429 set: 4 -> 2 -> 1.
    assert client.limiter.limit == 1
    assert client.limiter.in_flight == 0


async def test_while_a_retry_waits_another_request_uses_the_slot(mock: MockServer) -> None:
    mock.faults = Faults(rate_429=1.0, retry_after_s=2)
    time = FakeTime()
    answered: list[list[str]] = []
    async with client_for(mock, time, max_retries=1, max_concurrency=1) as client:

        async def meanwhile() -> None:
            # With a cap of 1 this request can only be sent if the retry let go of the slot.
            assert client.limiter.in_flight == 0, "the waiting retry holds the only slot"
            mock.faults = Faults()
            answered.append((await client.complete(OTHER)).texts)

        time.during = meanwhile
        first = await client.complete(MESSAGES)
    assert answered == [[reply_for("mock", OTHER)]]
    assert first.texts == [reply_for("mock", MESSAGES)]
    assert time.held == [0]
    assert mock.stats.total_requests == 3 and mock.stats.peak_in_flight == 1


async def test_a_burst_of_429s_shrinks_the_limit_once_and_success_grows_it_back(
    mock: MockServer,
) -> None:
    mock.faults = Faults(rate_429=1.0, retry_after_s=1)
    mock.latency_ms = 50  # so the 8 requests are in flight together
    time = FakeTime()
    async with client_for(mock, time, max_retries=0, max_concurrency=8) as client:

        async def one() -> None:
            with pytest.raises(ModelError):
                await client.complete(MESSAGES)

        async with anyio.create_task_group() as group:
            for _ in range(8):
                group.start_soon(one)
        peak = mock.stats.peak_in_flight
        assert peak <= 8, f"{peak} requests in flight, above the cap of 8"
        assert peak > 1, "the burst was sent one request at a time"
        assert client.limiter.limit == 4  # eight 429s, one burst: halved once
        assert client.stats.limit == 4  # what the progress display shows

        mock.faults = Faults()
        mock.latency_ms = 0
        for _ in range(4 + 5):
            await client.complete(MESSAGES)
        assert client.limiter.limit == 6  # +1 after 4 successes, +1 after 5 more
    assert time.calls == []


async def test_a_400_is_permanent_and_not_retried(mock: MockServer) -> None:
    mock.faults = Faults(fail_models={"mock": 400})
    time = FakeTime()
    async with client_for(mock, time) as client:
        with pytest.raises(ModelError) as caught:
            await client.complete(MESSAGES)
    assert not caught.value.retryable and not caught.value.model_down
    assert mock.stats.total_requests == 1 and time.calls == []


async def test_500s_back_off_exponentially(mock: MockServer) -> None:
    mock.faults = Faults(rate_500=1.0)
    time = FakeTime()
    async with client_for(mock, time, max_retries=4, draw=0.5) as client:
        with pytest.raises(ModelError):
            await client.complete(MESSAGES)
    # Ceilings 0.5, 1, 2, 4 s; half fixed plus half the draw (0.5) of the other half.
    assert time.calls == [0.375, 0.75, 1.5, 3.0]
    assert time.now == 1000.0 + sum(time.calls)
    assert time.held == [0, 0, 0, 0]


async def test_a_success_while_a_request_retries_means_the_model_is_up(
    mock: MockServer,
) -> None:
    mock.faults = Faults(rate_500=1.0)
    time = FakeTime()
    async with client_for(mock, time, max_retries=2) as client:

        async def meanwhile() -> None:  # runs once the clock has moved past the first try
            mock.faults = Faults()
            await client.complete(OTHER)
            mock.faults = Faults(rate_500=1.0)

        time.during = meanwhile
        with pytest.raises(ModelError) as caught:
            await client.complete(MESSAGES)
        assert not caught.value.model_down

        time.now += 10  # a request that starts after that success, and never succeeds
        with pytest.raises(ModelError) as caught:
            await client.complete(MESSAGES)
        assert caught.value.model_down


async def test_requests_per_minute_paces_requests(mock: MockServer) -> None:
    time = FakeTime()
    async with client_for(mock, time, requests_per_minute=60) as client:
        for _ in range(3):
            await client.complete(MESSAGES)
    # One a second, with a burst of one: the 1st goes at once, then each waits
    # exactly the second the one before it used up (the fake sleep moves the clock).
    assert time.calls == [1.0, 1.0]
    assert time.held == [0, 0]  # paced before taking a slot
    assert time.now == 1002.0


async def test_tokens_per_minute_paces_by_the_estimate_then_refunds(mock: MockServer) -> None:
    time = FakeTime()
    async with client_for(mock, time, tokens_per_minute=600) as client:  # 10/s, burst 10
        estimate = estimate_tokens(len(client.request_body(MESSAGES, None)), None)
        first = await client.complete(MESSAGES)
        second = await client.complete(MESSAGES)
    used = first.prompt_tokens + first.completion_tokens
    assert second.texts == first.texts
    # The 1st waits for its estimate beyond the burst; at that moment the bucket is
    # empty, then what it did not use is refunded (at most the burst) for the 2nd.
    refund = min(10.0, estimate - used)
    assert time.calls == [
        pytest.approx((estimate - 10) / 10),
        pytest.approx((estimate - refund) / 10),
    ]


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
