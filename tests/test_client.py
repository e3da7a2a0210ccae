"""The HTTP endpoint against the mock server, with time injected: no test sleeps."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import pytest
from anyio.lowlevel import checkpoint

from engine.config import ModelConfig
from engine.endpoints import http_endpoint
from engine.errors import ModelError
from engine.http.client import (
    NOT_FOUND_IN_ROW,
    USER_AGENT,
    HttpEndpoint,
    endpoint,
    parse_completion,
)
from engine.http.ratelimit import TokenBucket, estimate_tokens, per_minute
from engine.stats import ModelStats
from engine.testing.mock_server import Faults, MockServer, reply_for

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
        self.stats: ModelStats | None = None
        self.during: Callable[[], Awaitable[None]] | None = None

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.calls.append(seconds)
        if self.stats is not None:
            self.held.append(self.stats.in_flight)
        self.now += seconds
        during, self.during = self.during, None
        if during is not None:
            await during()
        await checkpoint()


def client_for(
    server: MockServer | list[MockServer], time: FakeTime, *, draw: float = 0.5, **fields: object
) -> HttpEndpoint:
    servers = server if isinstance(server, list) else [server]
    urls = tuple(s.base_url for s in servers)
    config = ModelConfig(name="m", base_urls=urls, model="mock", **fields)  # type: ignore[arg-type]
    client = http_endpoint(
        config,
        ModelStats(name="m", cap=config.max_concurrency),
        sleep=time.sleep,
        clock=time.clock,
        draw=lambda: draw,
    )
    time.stats = client.stats
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
    assert not caught.value.model_down  # it answered: rate limited, not down
    assert "gave up after 3 attempts" in str(caught.value)
    # Three 429s one after another are sporadic, not a burst: the limit stays.
    assert client.stats.limit == 4
    assert client.stats.in_flight == 0


async def test_while_a_retry_waits_another_request_uses_the_slot(mock: MockServer) -> None:
    mock.faults = Faults(rate_429=1.0, retry_after_s=2)
    time = FakeTime()
    answered: list[list[str]] = []
    async with client_for(mock, time, max_retries=1, max_concurrency=1) as client:

        async def meanwhile() -> None:
            # With a cap of 1 this request can only be sent if the retry let go of the slot.
            assert client.stats.in_flight == 0, "the waiting retry holds the only slot"
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
        assert client.pool.replicas[0].limit == 4  # eight 429s, one burst: halved once
        assert client.stats.limit == 4  # what the progress display shows

        mock.faults = Faults()
        mock.latency_ms = 0
        for _ in range(4 + 5):
            await client.complete(MESSAGES)
        assert client.stats.limit == 6  # +1 after 4 successes, +1 after 5 more
    assert time.calls == []


async def test_a_400_is_permanent_and_not_retried(mock: MockServer) -> None:
    mock.faults = Faults(fail_models={"mock": 400})
    time = FakeTime()
    async with client_for(mock, time) as client:
        with pytest.raises(ModelError) as caught:
            await client.complete(MESSAGES)
    assert not caught.value.retryable and not caught.value.model_down
    assert mock.stats.total_requests == 1 and time.calls == []


async def test_a_server_failing_everyone_costs_no_retry_and_is_down_after_down_after_s(
    mock: MockServer,
) -> None:
    mock.faults = Faults(rate_500=1.0)
    time = FakeTime()
    async with client_for(mock, time, max_retries=0, down_after_s=30.0, draw=0.5) as client:
        with pytest.raises(ModelError) as caught:
            await client.complete(MESSAGES)
    # No retry was charged (max_retries 0 would have failed it at once): it waited
    # the outage out until the model had been unreachable for down_after_s.
    assert caught.value.model_down
    assert "models.m down for 30 s" in str(caught.value)
    assert client.stats.retries == 0 and client.stats.resent > 1
    assert time.now - 1000.0 >= 30.0
    # Backoff between its first attempts, before the replica was taken out: half
    # fixed plus half the draw (0.5) of ceilings 0.5 and 1 s.
    assert time.calls[:2] == [0.375, 0.75]
    assert set(time.held) == {0}, "a request held a slot while it waited"
    assert len(client.stats.outages) >= 1


async def test_a_request_on_a_failing_replica_goes_to_another_at_once() -> None:
    async with MockServer() as broken, MockServer() as healthy:
        broken.faults = Faults(rate_500=1.0)
        time = FakeTime()
        async with client_for([broken, healthy], time, max_retries=0) as client:
            completion = await client.complete(MESSAGES, prefer=0)
        assert completion.replica == 1
        assert completion.texts == [reply_for("mock", MESSAGES)]
        assert time.calls == []  # re-sent without waiting
        assert client.stats.retries == 0 and client.stats.resent == 1
        assert broken.stats.total_requests == 1 and healthy.stats.completed == 1


async def test_a_conversation_returns_to_its_replica_while_it_has_room() -> None:
    async with MockServer() as first, MockServer() as second:
        time = FakeTime()
        async with client_for([first, second], time, max_concurrency=2) as client:
            served = [(await client.complete(MESSAGES, prefer=1)).replica for _ in range(5)]
        assert served == [1] * 5
        assert first.stats.total_requests == 0 and second.stats.completed == 5


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


async def test_an_unreachable_server_is_named_by_the_probe_and_taken_out() -> None:
    config = ModelConfig(name="teacher", base_urls=("http://127.0.0.1:9/v1",), model="x")
    async with http_endpoint(config, ModelStats(name="teacher", cap=1)) as client:
        [problem] = await client.probe()
        assert problem.startswith("models.teacher: cannot reach http://127.0.0.1:9/v1/models")
        assert client.pool.live_count == 0


async def test_a_request_longer_than_the_context_fails_at_once_and_names_the_fix(
    mock: MockServer,
) -> None:
    mock.faults = Faults(context_tokens=20)
    time = FakeTime()
    async with client_for(mock, time, params={"max_tokens": 16}) as client:
        with pytest.raises(ModelError) as caught:
            await client.complete([{"role": "user", "content": "a question of several words"}])
    message = str(caught.value)
    assert not caught.value.retryable
    assert message.startswith("HTTP 400: request (24 tokens) exceeds the available context size")
    assert "local.ctx_size" in message and "models.m.params.max_tokens" in message
    assert mock.stats.total_requests == 1 and time.calls == []


async def test_a_full_kv_cache_shrinks_the_limit_and_costs_no_retry(mock: MockServer) -> None:
    mock.faults = Faults(rate_kv_full=1.0)
    time = FakeTime()
    async with client_for(mock, time, max_retries=0, max_concurrency=4, draw=0.0) as client:

        async def meanwhile() -> None:
            mock.faults = Faults()

        time.during = meanwhile
        completion = await client.complete(MESSAGES)
    assert completion.texts == [reply_for("mock", MESSAGES)]
    assert client.stats.retries == 0 and client.stats.resent == 1
    assert client.stats.limit == 2  # halved at once: too many conversations at a time
    assert time.held == [0]


def test_parse_completion_classifies_bad_bodies() -> None:
    for body in (b"<html>", b'{"choices": []}', b'{"choices": [{"message": {"content": " "}}]}'):
        with pytest.raises(ModelError) as caught:
            parse_completion(body)
        assert caught.value.retryable


def test_parse_completion_reads_traces_and_usage_of_every_choice() -> None:
    body = (
        b'{"choices": [{"message": {"content": "a"}, "finish_reason": "stop"},'
        b' {"message": {"content": "<think>t</think>b"}, "finish_reason": "length"}],'
        b' "usage": {"prompt_tokens": 7, "completion_tokens": 5, "prompt_tokens_details":'
        b' {"cached_tokens": 4}, "completion_tokens_details": {"reasoning_tokens": -2}}}'
    )
    completion = parse_completion(body)
    assert completion.texts == ["a", "b"] and completion.finish_reasons == ["stop", "length"]
    assert completion.traces == [None, "t"]
    assert (completion.prompt_tokens, completion.completion_tokens) == (7, 5)
    assert (completion.cached_tokens, completion.reasoning_tokens) == (4, 0)  # -2 not believed
    one = parse_completion(b'{"choices": [{"message": {"content": "x", "reasoning": "r"}}]}')
    assert one.texts == ["x"] and one.traces == ["r"] and one.finish_reasons == [None]
    assert (one.prompt_tokens, one.completion_tokens) == (0, 0)


async def test_a_raw_request_counts_the_reasoning_tokens_it_reports(mock: MockServer) -> None:
    mock.reasoning = "reasoning_content"
    mock.reasoning_chars = 200
    time = FakeTime()
    async with client_for(mock, time) as client:
        body = b'{"model": "mock", "messages": [{"role": "user", "content": "hi"}]}'
        reply = await client.post("/chat/completions", body)
    assert reply.reasoning_tokens > 0
    assert (
        reply.reasoning_tokens
        == reply.data["usage"]["completion_tokens_details"]["reasoning_tokens"]
    )
    assert client.stats.reasoning_tokens == reply.reasoning_tokens


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


# --- a model that refuses every request, replies too large, keys echoed back -------------

KEY = "sk-client-test-0123456789abcdef"
KEY_ENV = "TURNSTILE_CLIENT_TEST_KEY"


async def test_an_expired_key_stops_the_model_and_names_the_status_without_the_key(
    mock: MockServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    mock.faults = Faults(fail_models={"mock": 401}, echo_authorization=True)
    time = FakeTime()
    async with client_for(mock, time, api_key_env=KEY_ENV) as client:
        with pytest.raises(ModelError) as first:
            await client.complete(MESSAGES)
        with pytest.raises(ModelError) as again:
            await client.complete(OTHER)
    for caught in (first, again):
        message = str(caught.value)
        assert caught.value.model_down and caught.value.status == 401
        assert message.startswith("models.m: HTTP 401: model 'mock' is set to fail with HTTP 401")
        assert "the server refuses the key" in message
        assert KEY not in message and "Bearer ***" in message
        assert KEY_ENV in caught.value.fix
    assert mock.stats.total_requests == 1  # the model refuses: nothing more is sent
    assert time.calls == [] and client.stats.retries == 0


async def test_a_404_to_every_request_is_the_models_not_the_rows(mock: MockServer) -> None:
    mock.faults = Faults(fail_models={"mock": 404})
    time = FakeTime()
    async with client_for(mock, time, max_retries=0) as client:
        with pytest.raises(ModelError) as caught:
            await client.complete(MESSAGES)
    # max_retries 0, yet no row failed: a few in a row, none answered, is the model.
    assert caught.value.model_down and caught.value.status == 404
    assert f"to {NOT_FOUND_IN_ROW} requests in a row, none answered" in str(caught.value)
    assert "models.m.base_url" in caught.value.fix and "models.m.model" in caught.value.fix
    assert mock.stats.total_requests == NOT_FOUND_IN_ROW
    assert client.stats.retries == 0


async def test_a_key_echoed_in_a_broken_reply_is_removed_from_the_message(
    mock: MockServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    mock.faults = Faults(rate_malformed=1.0, echo_authorization=True)
    async with client_for(mock, FakeTime(), api_key_env=KEY_ENV, max_retries=0) as client:
        with pytest.raises(ModelError) as caught:
            await client.complete(MESSAGES)
    assert "HTTP 200 with a body that is not JSON" in str(caught.value)
    assert KEY not in str(caught.value) and "Bearer ***" in str(caught.value)
    assert mock.stats.authorizations == {f"Bearer {KEY}"}  # sent, as it must be


async def test_requests_name_turnstile_as_their_user_agent(mock: MockServer) -> None:
    async with client_for(mock, FakeTime()) as client:
        await client.complete(MESSAGES)
    assert mock.stats.user_agents == {USER_AGENT}


@pytest.mark.parametrize("chunked", [False, True], ids=["with_its_length", "of_unknown_length"])
async def test_a_reply_larger_than_max_reply_bytes_fails_its_request_unread(
    mock: MockServer, chunked: bool
) -> None:
    mock.chunked = chunked
    async with client_for(mock, FakeTime(), max_retries=1, max_reply_bytes=64) as client:
        with pytest.raises(ModelError) as caught:
            await client.complete(MESSAGES)
    message = str(caught.value)
    assert "a reply larger than max_reply_bytes (64 bytes)" in message
    assert "models.m.max_reply_bytes" in message and "gave up after 2 attempts" in message


async def test_a_reply_of_unknown_length_under_the_limit_is_read_whole(mock: MockServer) -> None:
    mock.chunked = True
    async with client_for(mock, FakeTime()) as client:
        completion = await client.complete(MESSAGES)
    assert completion.texts == [reply_for("mock", MESSAGES)]


def test_a_query_in_base_url_stays_after_the_path() -> None:
    url = "http://h:1/v1?api-version=2024-06-01"
    assert (
        endpoint(url, "/chat/completions")
        == "http://h:1/v1/chat/completions?api-version=2024-06-01"
    )
    assert endpoint("http://h:1/v1/", "/models") == "http://h:1/v1/models"
