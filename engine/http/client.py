"""The model client: OpenAI-compatible chat completions over aiohttp.

One aiohttp session per model, its connector sized to the caps of its replicas.
A slot on one replica (``engine.http.replicas``) is held for exactly one HTTP attempt
and released before any backoff, so a waiting retry never starves other
requests. Replicas taken out are probed in the background (one task each, in
the client's own task group) until they answer again.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp
import anyio
import orjson
from anyio.abc import TaskGroup

from engine.config import ModelConfig
from engine.errors import ModelError
from engine.http.ratelimit import estimate_tokens, per_minute
from engine.http.replicas import Replica, ReplicaPool
from engine.http.retry import (
    BACKPRESSURE,
    FLAKY,
    PERMANENT,
    UNHEALTHY,
    backoff_s,
    charged,
    classify_status,
    is_context_overflow,
    parse_retry_after,
    retry_delay_s,
)
from engine.stats import ModelStats

Sleep = Callable[[float], Awaitable[None]]
Clock = Callable[[], float]
_ERROR_BODY_CHARS = 300
PROBE_FIRST_S = 0.25  # an out replica is probed after this, then twice as long each time,
PROBE_MAX_S = 2.0  # up to this: a server back from a restart is used again within 2 s


# Not frozen: one is built per request, and a frozen dataclass's __init__ costs four
# times as much (object.__setattr__ per field). Nothing changes one after it is made.
@dataclass(slots=True)
class Completion:
    """What one successful request returned: one text per choice, and token usage."""

    texts: list[str]
    finish_reasons: list[str | None]
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    replica: int = 0  # which of the model's servers answered


class ModelClient:
    """Sends chat completions to one model's replicas: capped, spread, retried, counted.

    A request is charged one of the row's ``max_retries`` only when the failure is
    the request's own (``retry.charged``): a 429/503, a broken answer, or a server
    failure while the same server answered others. A failure that is its server's
    (a connection refused, a timeout or 5xx from a server that answers nobody)
    costs the row nothing: it is re-sent at once to another live replica, or after
    a backoff; once the pool has taken every replica out, it waits without
    sending until a probe finds one answering, and fails only when the model is
    down (``down_after_s``). A full KV cache is not charged either, up to
    ``FREE_ATTEMPTS`` per replica.
    """

    FREE_ATTEMPTS = 10  # uncharged full-KV-cache retries per replica, for one request

    def __init__(
        self,
        config: ModelConfig,
        stats: ModelStats,
        *,
        base_urls: Sequence[str] | None = None,
        sleep: Sleep = anyio.sleep,
        clock: Clock = time.monotonic,
        draw: Callable[[], float] = random.random,
    ) -> None:
        """``base_urls`` replaces the config's (the built-in server's URLs). ``sleep``
        and ``clock`` (monotonic seconds) drive pacing, backoff, probes and outage
        times, so tests inject a fake sleep that advances a fake clock. Latency is
        measured with the real ``perf_counter``: it is only reported."""
        self.config = config
        self.stats = stats
        urls = list(base_urls or config.base_urls)
        self.pool = ReplicaPool(
            config.name,
            urls,
            config.max_concurrency,
            stats,
            down_after_s=config.down_after_s,
            affinity=config.affinity,
        )
        self._chat_urls = [f"{url}/chat/completions" for url in urls]
        self._free_max = self.FREE_ATTEMPTS * len(urls)
        self._sleep = sleep
        self._clock = clock
        self._draw = draw
        self._session: aiohttp.ClientSession | None = None
        self._probes: TaskGroup | None = None
        self._probing: set[int] = set()
        headers = {"Content-Type": "application/json"}
        key = config.api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._headers = headers
        self._params = dict(config.params)
        self._max_tokens = self._params.get("max_tokens")
        self._body: dict[str, Any] = {**self._params, "model": config.model}
        now = clock()
        self._requests = (
            per_minute(config.requests_per_minute, now) if config.requests_per_minute else None
        )
        self._tokens = (
            per_minute(config.tokens_per_minute, now) if config.tokens_per_minute else None
        )

    async def __aenter__(self) -> ModelClient:
        cap = self.config.max_concurrency
        connector = aiohttp.TCPConnector(
            limit=cap * len(self._chat_urls), limit_per_host=cap, keepalive_timeout=60
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.config.timeout_s),
            headers=self._headers,
            skip_auto_headers=("User-Agent",),
            json_serialize=lambda obj: orjson.dumps(obj).decode(),
        )
        self._probes = anyio.create_task_group()
        await self._probes.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._probes is not None:
            self._probes.cancel_scope.cancel()  # the probes end here, whatever ends the client
            probes, self._probes = self._probes, None
            await probes.__aexit__(None, None, None)
        if self._session is not None:
            with anyio.CancelScope(shield=True):
                await self._session.close()
            self._session = None

    async def probe(self) -> list[str]:
        """Check that each replica is reachable at all (any HTTP answer will do).

        Returns a problem line for each replica that is not; those are taken out
        and probed again in the background, like replicas that fail mid-run.
        """
        problems: list[str] = []
        now = self._clock()
        for replica in self.pool.replicas:
            error = await self._unreachable(replica)
            if error is not None:
                problems.append(
                    f"models.{self.config.name}: cannot reach {replica.url}/models "
                    f"({error}); start the server or fix base_url"
                )
                self.pool.take_out(replica, now)
                self._start_probe(replica)
        return problems

    async def _unreachable(self, replica: Replica) -> str | None:
        """None when ``replica`` answers HTTP below 500 on ``/models``, else why not."""
        session = self._require_session()
        timeout = aiohttp.ClientTimeout(total=min(10.0, self.config.timeout_s))
        try:
            async with session.get(f"{replica.url}/models", timeout=timeout) as response:
                await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return None if status < 500 else f"HTTP {status}"

    def _start_probe(self, replica: Replica) -> None:
        if self._probes is not None and replica.index not in self._probing:
            self._probing.add(replica.index)
            self._probes.start_soon(self._probe_until_back, replica)

    async def _probe_until_back(self, replica: Replica) -> None:
        """Probe an out replica with backoff until it answers; meanwhile, call the model
        down once every replica has been out for ``down_after_s``."""
        delay = PROBE_FIRST_S
        try:
            while True:
                await self._sleep(delay)
                if await self._unreachable(replica) is None:
                    self.pool.back(replica, self._clock())
                    return
                self.pool.check_down(self._clock())
                delay = min(delay * 2, PROBE_MAX_S)
        finally:
            self._probing.discard(replica.index)

    def _require_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("ModelClient used outside 'async with'")
        return self._session

    def request_body(
        self, messages: list[dict[str, str]], extra: Mapping[str, Any] | None
    ) -> bytes:
        if extra:
            body: dict[str, Any] = {**self._params, **extra}
            body["model"] = self.config.model
        else:
            body = self._body.copy()  # the same keys in the same order, made once
        body["messages"] = messages
        return orjson.dumps(body)

    async def complete(
        self,
        messages: list[dict[str, str]],
        extra: Mapping[str, Any] | None = None,
        *,
        prefer: int | None = None,
    ) -> Completion:
        """One chat completion, retried on 429, 5xx, timeouts and dropped connections.

        ``prefer`` is the replica that served this conversation's previous turn
        (``Completion.replica``). Raises ModelError (``retryable`` False) when the
        failure is permanent, the retries are spent, or the model is down
        (``model_down``).
        """
        body = self.request_body(messages, extra)
        paced = self._requests is not None or self._tokens is not None
        estimate = estimate_tokens(len(body), self._max_tokens) if paced else 0
        spent = free = outage = 0
        pool = self.pool
        clock = self._clock
        while True:
            if paced:
                await self._pace(estimate)  # before taking a slot: never wait holding one
            # A free slot without creating a coroutine to wait in; else queue for one.
            replica = pool.try_acquire(prefer) or await pool.acquire(prefer)
            epoch = replica.epoch
            sent = clock()
            try:
                completion = await self._post(replica, body)
            except ModelError as exc:
                error = exc
            else:
                now = clock()
                pool.succeeded(replica, epoch, now)
                if self._tokens is not None:
                    used = completion.prompt_tokens + completion.completion_tokens
                    self._tokens.adjust(used - estimate if used else 0, now)
                return completion
            finally:
                pool.release(replica)
            # The slot is released: now decide, and wait without holding it.
            now = self._clock()
            kind = error.kind
            if kind == PERMANENT:
                replica.stats.failed += 1
                self.stats.failures += 1
                raise error
            replica.stats.retried += 1
            prefer = None
            if kind == BACKPRESSURE:
                kv_full = error.status == 500
                pool.backpressure(replica, epoch, now, burst=kv_full)
                if kv_full and free < self._free_max:
                    free += 1
                    self.stats.resent += 1
                    await self._sleep(retry_delay_s(free - 1, self._draw(), error.retry_after))
                    continue
            elif kind == UNHEALTHY:
                if pool.failed(replica, now):
                    self._start_probe(replica)
                if not charged(kind, answered_meanwhile=replica.last_answer > sent):
                    # Its server failed it, not the row: elsewhere at once when another
                    # replica is live, else after a short backoff, or (once the pool
                    # has taken every replica out) when a probe finds one back.
                    outage += 1
                    self.stats.resent += 1
                    other = pool.other_than(replica)
                    if other is not None:
                        prefer = other.index
                    elif replica.live:  # not taken out yet: a short pause before the next try
                        await self._sleep(backoff_s(min(outage - 1, 2), self._draw()))
                    continue
            else:
                replica.answered(now)
            if spent >= self.config.max_retries:
                self.stats.failures += 1
                raise ModelError(
                    f"{error} (gave up after {spent + 1} attempts)",
                    retryable=False,
                    status=error.status,
                    kind=error.kind,
                ) from error
            self.stats.retries += 1
            await self._sleep(retry_delay_s(spent, self._draw(), error.retry_after))
            spent += 1

    async def _pace(self, tokens: int) -> None:
        wait = 0.0
        now = self._clock()
        if self._requests is not None:
            wait = self._requests.reserve(1, now)
        if self._tokens is not None:
            wait = max(wait, self._tokens.reserve(tokens, now))
        if wait > 0:
            await self._sleep(wait)

    async def _post(self, replica: Replica, body: bytes) -> Completion:
        session = self._session
        if session is None:
            session = self._require_session()  # raises
        url = self._chat_urls[replica.index]
        stats = self.stats
        stats.requests += 1
        replica.stats.requests += 1
        started = time.perf_counter()
        try:
            async with session.post(url, data=body) as response:
                raw = await response.read()
                status = response.status
                retry_after = response.headers.get("Retry-After") if status != 200 else None
        except TimeoutError as exc:
            raise ModelError(
                f"timed out after {self.config.timeout_s:g}s", retryable=True, kind=UNHEALTHY
            ) from exc
        except aiohttp.InvalidURL as exc:
            raise ModelError(f"invalid URL {url}", retryable=False, kind=PERMANENT) from exc
        except aiohttp.ClientError as exc:
            raise ModelError(
                f"connection error: {type(exc).__name__}: {exc}", retryable=True, kind=UNHEALTHY
            ) from exc
        latency = time.perf_counter() - started
        if status != 200:
            message = _error_message(raw)
            kind = classify_status(status, message)
            if is_context_overflow(status, message):
                message += (
                    "; the conversation does not fit the server's context: raise local.ctx_size "
                    "(the built-in server) or the server's context size, or lower "
                    f"models.{self.config.name}.params.max_tokens"
                )
            # An HTTP-date Retry-After names wall-clock time, so it is read against time.time().
            raise ModelError(
                f"HTTP {status}: {message}",
                retryable=kind != PERMANENT,
                status=status,
                retry_after=parse_retry_after(retry_after, time.time()),
                kind=kind,
            )
        completion = parse_completion(raw, latency, replica.index)
        stats.ok += 1
        stats.prompt_tokens += completion.prompt_tokens
        stats.completion_tokens += completion.completion_tokens
        stats.latency.add(latency)
        return completion


def parse_completion(raw: bytes, latency_s: float = 0.0, replica: int = 0) -> Completion:
    """Parse a 200 response body; a body that is not a usable completion is retryable."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ModelError(
            f"HTTP 200 with a body that is not JSON: {_snippet(raw)!r}", retryable=True, kind=FLAKY
        ) from exc
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices:
        raise ModelError(
            f"HTTP 200 with no 'choices': {_snippet(raw)!r}", retryable=True, kind=FLAKY
        )
    texts: list[str] = []
    reasons: list[str | None] = []
    for choice in choices:
        message = choice.get("message") if isinstance(choice, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        # isspace() is strip()'s test without the copy of the text.
        if not isinstance(content, str) or not content or content.isspace():
            raise ModelError("HTTP 200 with an empty reply", retryable=True, kind=FLAKY)
        texts.append(content)
        reason = choice.get("finish_reason")
        reasons.append(reason if isinstance(reason, str) else None)
    usage = data.get("usage")
    prompt_tokens = completion_tokens = 0
    if isinstance(usage, dict):
        prompt_tokens = _int(usage.get("prompt_tokens"))
        completion_tokens = _int(usage.get("completion_tokens"))
    return Completion(texts, reasons, prompt_tokens, completion_tokens, latency_s, replica)


def _int(value: object) -> int:
    # JSON gives int or bool (a subclass of int): only a real int counts.
    return value if type(value) is int else 0


def _snippet(raw: bytes) -> str:
    return raw[:_ERROR_BODY_CHARS].decode("utf-8", "replace")


def _error_message(raw: bytes) -> str:
    """The server's own error message when it sent the OpenAI error shape, else the body."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _snippet(raw).strip() or "(empty body)"
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])[:_ERROR_BODY_CHARS]
        if isinstance(error, str):
            return error[:_ERROR_BODY_CHARS]
    return _snippet(raw).strip()
