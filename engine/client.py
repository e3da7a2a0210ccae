"""The model client: OpenAI-compatible chat completions over aiohttp.

One aiohttp session per model, its connector sized to the model's cap. A slot
of the model's limiter is held for exactly one HTTP attempt and released before
any backoff, so a waiting retry never starves other requests.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp
import anyio
import orjson

from engine.config import ModelConfig
from engine.errors import ModelDown, ModelError
from engine.limiter import Limiter
from engine.ratelimit import estimate_tokens, per_minute
from engine.retry import is_retryable_status, parse_retry_after, retry_delay_s
from engine.stats import ModelStats

Sleep = Callable[[float], Awaitable[None]]
Clock = Callable[[], float]
_ERROR_BODY_CHARS = 300


@dataclass(frozen=True, slots=True)
class Completion:
    """What one successful request returned: one text per choice, and token usage."""

    texts: list[str]
    finish_reasons: list[str | None]
    prompt_tokens: int
    completion_tokens: int
    latency_s: float


class ModelClient:
    """Sends chat completions to one model, capped, retried and counted."""

    def __init__(
        self,
        config: ModelConfig,
        stats: ModelStats,
        *,
        base_url: str | None = None,
        sleep: Sleep = anyio.sleep,
        clock: Clock = time.monotonic,
        draw: Callable[[], float] = random.random,
    ) -> None:
        """``sleep`` and ``clock`` (monotonic seconds) drive pacing, backoff and
        model-down detection, so tests inject a fake sleep that advances a fake
        clock. Latency is measured with the real ``perf_counter``: it is only reported."""
        self.config = config
        self.stats = stats
        self.url = f"{base_url or config.base_url}/chat/completions"
        self.limiter = Limiter(config.max_concurrency, stats)
        self._sleep = sleep
        self._clock = clock
        self._draw = draw
        self._session: aiohttp.ClientSession | None = None
        self._last_ok = float("-inf")
        headers = {"Content-Type": "application/json"}
        key = config.api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._headers = headers
        self._params = dict(config.params)
        now = clock()
        self._requests = (
            per_minute(config.requests_per_minute, now) if config.requests_per_minute else None
        )
        self._tokens = (
            per_minute(config.tokens_per_minute, now) if config.tokens_per_minute else None
        )

    async def __aenter__(self) -> ModelClient:
        connector = aiohttp.TCPConnector(
            limit=self.config.max_concurrency,
            limit_per_host=self.config.max_concurrency,
            keepalive_timeout=60,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.config.timeout_s),
            headers=self._headers,
            skip_auto_headers=("User-Agent",),
            json_serialize=lambda obj: orjson.dumps(obj).decode(),
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            with anyio.CancelScope(shield=True):
                await self._session.close()
            self._session = None

    async def probe(self) -> None:
        """Check that the server is reachable at all (any HTTP answer will do).

        Raises ModelDown naming the model and the fix, before any row is touched.
        """
        session = self._require_session()
        url = self.url.rsplit("/chat/completions", 1)[0] + "/models"
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as response:
                await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ModelDown(
                f"models.{self.config.name}: cannot reach {url} "
                f"({type(exc).__name__}: {exc}); start the server or fix base_url"
            ) from exc

    def _require_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("ModelClient used outside 'async with'")
        return self._session

    def request_body(
        self, messages: list[dict[str, str]], extra: Mapping[str, Any] | None
    ) -> bytes:
        body: dict[str, Any] = {**self._params, **(extra or {})}
        body["model"] = self.config.model
        body["messages"] = messages
        return orjson.dumps(body)

    async def complete(
        self, messages: list[dict[str, str]], extra: Mapping[str, Any] | None = None
    ) -> Completion:
        """One chat completion, retried on 429, 5xx, timeouts and dropped connections.

        Raises ModelError (``retryable`` False) when the failure is permanent or
        the retries are spent.
        """
        body = self.request_body(messages, extra)
        first_try = self._clock()
        estimate = estimate_tokens(len(body), self._params.get("max_tokens"))
        attempt = 0
        while True:
            await self._pace(estimate)  # before taking a slot: never wait holding one
            async with self.limiter.slot() as epoch:
                try:
                    completion = await self._post(body)
                except ModelError as exc:
                    error = exc
                else:
                    self.limiter.succeeded()
                    self._last_ok = self._clock()
                    if self._tokens is not None:
                        used = completion.prompt_tokens + completion.completion_tokens
                        self._tokens.adjust(used - estimate if used else 0, self._last_ok)
                    return completion
            # The slot is released: now decide, and wait without holding it.
            if error.status == 429:
                self.limiter.rate_limited(epoch)
            if not error.retryable or attempt >= self.config.max_retries:
                self.stats.failures += 1
                if error.retryable:
                    raise ModelError(
                        f"{error} (gave up after {attempt + 1} attempts)",
                        retryable=False,
                        status=error.status,
                        model_down=self._last_ok < first_try,
                    ) from error
                raise error
            self.stats.retries += 1
            await self._sleep(retry_delay_s(attempt, self._draw(), error.retry_after))
            attempt += 1

    async def _pace(self, tokens: int) -> None:
        wait = 0.0
        now = self._clock()
        if self._requests is not None:
            wait = self._requests.reserve(1, now)
        if self._tokens is not None:
            wait = max(wait, self._tokens.reserve(tokens, now))
        if wait > 0:
            await self._sleep(wait)

    async def _post(self, body: bytes) -> Completion:
        session = self._require_session()
        self.stats.requests += 1
        started = time.perf_counter()
        try:
            async with session.post(self.url, data=body) as response:
                raw = await response.read()
                status = response.status
                retry_after = response.headers.get("Retry-After")
        except TimeoutError as exc:
            raise ModelError(f"timed out after {self.config.timeout_s:g}s", retryable=True) from exc
        except aiohttp.InvalidURL as exc:
            raise ModelError(f"invalid URL {self.url}", retryable=False) from exc
        except aiohttp.ClientError as exc:
            raise ModelError(
                f"connection error: {type(exc).__name__}: {exc}", retryable=True
            ) from exc
        latency = time.perf_counter() - started
        if status != 200:
            # An HTTP-date Retry-After names wall-clock time, so it is read against time.time().
            raise ModelError(
                f"HTTP {status}: {_error_message(raw)}",
                retryable=is_retryable_status(status),
                status=status,
                retry_after=parse_retry_after(retry_after, time.time()),
            )
        completion = parse_completion(raw, latency)
        self.stats.ok += 1
        self.stats.prompt_tokens += completion.prompt_tokens
        self.stats.completion_tokens += completion.completion_tokens
        self.stats.latency.add(latency)
        return completion


def parse_completion(raw: bytes, latency_s: float = 0.0) -> Completion:
    """Parse a 200 response body; a body that is not a usable completion is retryable."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ModelError(
            f"HTTP 200 with a body that is not JSON: {_snippet(raw)!r}", retryable=True
        ) from exc
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices:
        raise ModelError(f"HTTP 200 with no 'choices': {_snippet(raw)!r}", retryable=True)
    texts: list[str] = []
    reasons: list[str | None] = []
    for choice in choices:
        message = choice.get("message") if isinstance(choice, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, str) or not content.strip():
            raise ModelError("HTTP 200 with an empty reply", retryable=True)
        texts.append(content)
        reason = choice.get("finish_reason")
        reasons.append(reason if isinstance(reason, str) else None)
    usage = data.get("usage")
    prompt_tokens = completion_tokens = 0
    if isinstance(usage, dict):
        prompt_tokens = _int(usage.get("prompt_tokens"))
        completion_tokens = _int(usage.get("completion_tokens"))
    return Completion(texts, reasons, prompt_tokens, completion_tokens, latency_s)


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


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
