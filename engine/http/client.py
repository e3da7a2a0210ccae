"""The HTTP endpoint: OpenAI-compatible chat completions over aiohttp.

``HttpEndpoint`` is the online ``ModelEndpoint`` (``engine.http.endpoint``), built
from plain values (``engine.http.settings``). One aiohttp session per model, its
connector sized to the caps of its replicas.
A slot on one replica (``engine.http.replicas``) is held for exactly one HTTP attempt
and released before any backoff, so a waiting retry never starves other
requests. Replicas taken out are probed in the background (one task each, in
the client's own task group) until they answer again.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from types import TracebackType
from typing import Any, Protocol, TypeVar

import aiohttp
import anyio
import orjson
from anyio.abc import TaskGroup

from engine import jsonbytes
from engine.errors import ModelError
from engine.http.endpoint import Completion, EndpointStatistics, RawReply
from engine.http.ratelimit import estimate_tokens, per_minute
from engine.http.reasoning import DEFAULT_DIALECT, Dialect, split_reply
from engine.http.replicas import Replica, ReplicaPool
from engine.http.retry import (
    BACKPRESSURE,
    FLAKY,
    PERMANENT,
    REFUSED,
    UNHEALTHY,
    Ledger,
    Verdict,
    backoff_s,
    charged_at_once,
    charges,
    classify_status,
    is_context_overflow,
    parse_retry_after,
    retry_delay_s,
)
from engine.http.settings import HttpSettings
from engine.redact import model_secrets, redact_url, scrub, scrub_bytes
from engine.stats import ModelStats

log = logging.getLogger("turnstile")

Sleep = Callable[[float], Awaitable[None]]
Clock = Callable[[], float]
_ERROR_BODY_CHARS = 300
# Sent with every request: a server's logs name the client (and aiohttp, not told one,
# would add its own to each request's headers, a few microseconds each time).
USER_AGENT = "turnstile"
NOT_FOUND = 404
NOT_FOUND_IN_ROW = 5  # 404s to this many requests in a row, none answered: the model's URL or name
_READ_CHUNK = 1 << 16  # a reply of unknown length is read this much at a time, up to the limit
PROBE_FIRST_S = 0.25  # an out replica is probed after this, then twice as long each time,
PROBE_MAX_S = 2.0  # up to this: a server back from a restart is used again within 2 s


class _Counted(Protocol):
    """What a successful attempt returns, as the retry loop counts it."""

    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int


_R = TypeVar("_R", bound=_Counted)


class HttpEndpoint:
    """Sends chat completions to one model's replicas: capped, spread, retried, counted.

    A request is charged one of the row's ``max_retries`` only when the failure is
    the request's own: a 429/503 or a broken answer at once (``retry.charged_at_once``),
    a server failure (connection error, timeout, 5xx) only once its server has shown
    it works by answering next (``retry.Ledger``). A failure that is its server's (the
    server fails again or is taken out first: a crash, a restart, an outage) costs
    the row nothing: it is re-sent at once to another live replica, or after a
    backoff; once the pool has taken every replica out, it waits without sending
    until a probe finds one answering, and fails only when the model is down
    (``down_after_s``). A full KV cache is not charged either, up to
    ``FREE_ATTEMPTS`` per replica.

    A failure of the model itself fails no row: a 401/403 (the key is refused) or a
    404 to ``NOT_FOUND_IN_ROW`` requests in a row (a wrong URL or model name) makes
    every request of the model fail at once with a ``model_down`` error naming the
    fix. Server messages never carry the model's key or URL credentials
    (``engine.redact``), and a reply past ``max_reply_bytes`` fails its request unread.
    """

    FREE_ATTEMPTS = 10  # uncharged full-KV-cache retries per replica, for one request

    def __init__(
        self,
        settings: HttpSettings,
        stats: ModelStats | None = None,
        *,
        sleep: Sleep = anyio.sleep,
        clock: Clock = time.monotonic,
        draw: Callable[[], float] = random.random,
    ) -> None:
        """``stats`` are the live counters it writes as it goes (a new set when None):
        the run's display reads the ones it passes in. ``sleep`` and ``clock``
        (monotonic seconds) drive pacing, backoff, probes and outage times, so tests
        inject a fake sleep that advances a fake clock. Latency is measured with the
        real ``perf_counter``: it is only reported."""
        self.settings = settings
        if stats is None:
            stats = ModelStats(name=settings.name, cap=settings.max_concurrency)
        self.stats = stats
        urls = list(settings.base_urls)
        self.pool = ReplicaPool(
            settings.name,
            urls,
            settings.max_concurrency,
            stats,
            down_after_s=settings.down_after_s,
            affinity=settings.affinity,
        )
        self._chat_urls = [endpoint(url, "/chat/completions") for url in urls]
        self._base_urls = urls
        self._raw_urls: dict[str, list[str]] = {}  # post()'s path -> its URL on each replica
        self._free_max = self.FREE_ATTEMPTS * len(urls)
        self._sleep = sleep
        self._clock = clock
        self._draw = draw
        self._session: aiohttp.ClientSession | None = None
        self._probes: TaskGroup | None = None
        self._probing: set[int] = set()
        self._refused: ModelError | None = None  # set once the model refuses every request
        self._not_found = 0  # 404s in a row, none answered since
        self._found = Ledger()  # the last 404's verdict: the row's if the model answers next
        self._max_reply = settings.max_reply_bytes
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
        key = settings.api_key
        self._secrets = model_secrets(key, urls)  # removed from every server message
        self._secret_bytes = tuple(secret.encode() for secret in self._secrets)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._headers = headers
        self._params = dict(settings.params)
        # A chat completion's 200 body, its answers split from traces by the model's dialect.
        self._parse_chat = functools.partial(
            parse_completion, dialect=Dialect(settings.reasoning, *settings.reasoning_tags)
        )
        self._max_tokens = self._params.get("max_tokens")
        self._body: dict[str, Any] = {**self._params, "model": settings.model}
        now = clock()
        self._requests = (
            per_minute(settings.requests_per_minute, now) if settings.requests_per_minute else None
        )
        self._tokens = (
            per_minute(settings.tokens_per_minute, now) if settings.tokens_per_minute else None
        )

    async def __aenter__(self) -> HttpEndpoint:
        cap = self.settings.max_concurrency
        connector = aiohttp.TCPConnector(
            limit=cap * len(self._chat_urls), limit_per_host=cap, keepalive_timeout=60
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.settings.timeout_s),
            headers=self._headers,
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

    def statistics(self) -> EndpointStatistics:
        """A frozen snapshot of its counters and its replicas'."""
        pool = self.pool
        return EndpointStatistics.of(self.stats, live=pool.live_count, down=pool.down)

    def set_share(self, cap: int | None) -> None:
        """A new cap on each replica (a shard's share of the model's); None: nothing
        goes out until a share is set, and no limit is shown meanwhile."""
        self.pool.set_cap(cap or 0)
        if cap is None:
            self.stats.limit = None
            for replica in self.stats.replicas:
                replica.limit = None

    def down_from_start(self) -> None:
        """Down now when no replica is live (see ``ReplicaPool.down_from_start``)."""
        self.pool.down_from_start()

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
                    f"models.{self.settings.name}: cannot reach {replica.stats.url}/models "
                    f"({error}); start the server or fix base_url"
                )
                self.pool.take_out(replica, now)
                self._start_probe(replica)
        return problems

    async def _unreachable(self, replica: Replica) -> str | None:
        """None when ``replica`` answers HTTP below 500 on ``/models``, else why not."""
        session = self._require_session()
        timeout = aiohttp.ClientTimeout(total=min(10.0, self.settings.timeout_s))
        try:
            # The status is the answer: the body is not read (nor its size trusted).
            models = endpoint(replica.url, "/models")
            async with session.get(models, timeout=timeout) as response:
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            return scrub(f"{type(exc).__name__}: {exc}", self._secrets)
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
            raise RuntimeError("HttpEndpoint used outside 'async with'")
        return self._session

    def request_body(
        self, messages: list[dict[str, str]], extra: Mapping[str, Any] | None
    ) -> bytes:
        if extra:
            body: dict[str, Any] = {**self._params, **extra}
            body["model"] = self.settings.model
        else:
            body = self._body.copy()  # the same keys in the same order, made once
        body["messages"] = messages
        return jsonbytes.dumps(body)  # held while in flight: bytes of its own size

    def complete(
        self,
        messages: list[dict[str, str]],
        extra: Mapping[str, Any] | None = None,
        *,
        prefer: int | None = None,
    ) -> Coroutine[Any, Any, Completion]:
        """One chat completion, retried on 429, 5xx, timeouts and dropped connections.

        ``prefer`` is the replica that served this conversation's previous turn
        (``Completion.replica``). Raises ModelError (``retryable`` False) when the
        failure is permanent or the retries are spent, and one with ``model_down`` set
        when the model is down or refuses every request (not this request's doing).
        """
        # The retry loop's own coroutine, not one awaiting it: a reply passes through one
        # coroutine fewer on its way back to the row (this is the hottest path there is).
        body = self.request_body(messages, extra)
        return self._request(body, self._chat_urls, self._parse_chat, prefer)

    async def post(self, path: str, body: bytes, *, prefer: int | None = None) -> RawReply:
        """``body`` POSTed as it is to ``path`` under each replica's base URL (a batch
        file's ``/completions`` or ``/embeddings`` line, say): capped, spread, retried
        and counted exactly as ``complete``. A 200 must carry a JSON object (else it is
        retried, as a broken completion is); its usage is counted where it reports one.
        """
        urls = self._raw_urls.get(path)
        if urls is None:
            urls = self._raw_urls[path] = [endpoint(url, path) for url in self._base_urls]
        return await self._request(body, urls, parse_raw, prefer)

    async def _request(
        self,
        body: bytes,
        urls: list[str],
        parse: Callable[[bytes, float, int], _R],
        prefer: int | None,
    ) -> _R:
        """``body`` POSTed to a replica's URL in ``urls`` on one of its slots, its 200 body
        ``parse``d (raw, latency, replica), until that succeeds: the retry loop of
        ``complete`` and ``post`` (see the class's docstring for what is charged)."""
        paced = self._requests is not None or self._tokens is not None
        estimate = estimate_tokens(len(body), self._max_tokens) if paced else 0
        spent = free = outage = attempts = counted = 0
        held: list[Verdict] = []  # its failures whose charge waits on the server's next outcome
        session = self._session
        if session is None:
            session = self._require_session()  # raises
        pool = self.pool
        stats = self.stats
        clock = self._clock
        max_retries = self.settings.max_retries
        while True:
            if paced:
                await self._pace(estimate)  # before taking a slot: never wait holding one
            # A free slot without creating a coroutine to wait in; else queue for one.
            replica = pool.try_acquire(prefer) or await pool.acquire(prefer)
            if self._refused is not None:  # refused while this one waited: do not send it
                pool.release(replica)
                raise self._refused_error()
            epoch = replica.epoch
            attempts += 1
            url = urls[replica.index]
            stats.requests += 1
            replica.stats.requests += 1
            # One HTTP attempt, here and not in a coroutine of its own: every reply passes
            # through one frame fewer on its way back to the row.
            started = time.perf_counter()
            try:
                # Awaited, not entered: ``async with`` adds two coroutines to every step of
                # the request and three more to leave it. release() is what leaving does
                # (the connection back to the pool, or closed when the body was not read
                # whole; a request body still being sent, cancelled).
                response = await session.post(url, data=body)
                try:
                    status = response.status
                    length = response.content_length
                    if (
                        length is not None
                        and length <= self._max_reply
                        and "Content-Encoding" not in response.headers
                    ):
                        raw = await response.read()  # the common case: its size is known, fits
                    else:
                        raw = await self._read_bounded(response)
                    retry_after = response.headers.get("Retry-After") if status != 200 else None
                finally:
                    response.release()
                if self._secret_bytes:  # a server that echoes the key (an error page, a proxy)
                    raw = scrub_bytes(raw, self._secret_bytes)
                latency = time.perf_counter() - started
                if status != 200:
                    raise self._status_error(status, raw, retry_after)
                completion = parse(raw, latency, replica.index)
            except ModelError as exc:
                error = exc
            except (TimeoutError, aiohttp.ClientError) as exc:
                error = self._connection_error(exc, url)
            else:
                stats.ok += 1
                stats.prompt_tokens += completion.prompt_tokens
                stats.completion_tokens += completion.completion_tokens
                stats.reasoning_tokens += completion.reasoning_tokens
                stats.latency.add(latency)
                now = clock()
                pool.succeeded(replica, epoch, now)
                if self._not_found:
                    self._not_found = 0
                    self._found.answered()
                if self._tokens is not None:
                    used = completion.prompt_tokens + completion.completion_tokens
                    self._tokens.adjust(used - estimate if used else 0, now)
                return completion
            finally:
                pool.release(replica)
            # The slot is released: now decide, and wait without holding it.
            now = self._clock()
            kind = error.kind
            if kind == REFUSED:
                replica.stats.failed += 1
                raise self._refuse(error, replica)
            if kind == PERMANENT and error.status != NOT_FOUND:
                replica.stats.failed += 1
                self.stats.failures += 1
                raise error
            replica.stats.retried += 1
            prefer = None
            if kind == PERMANENT:
                # A 404 to every request is a wrong base_url or model name: the model's
                # failure, not the row's. It is the row's only if the model answers a
                # request before failing so again (retry.Ledger).
                self._not_found += 1
                if self._not_found >= NOT_FOUND_IN_ROW:
                    replica.stats.failed += 1
                    raise self._refuse(error, replica)
                held.append(self._found.hold())
            elif kind == BACKPRESSURE:
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
                elif replica.live:
                    # Whose failure it is shows next: the row's if this replica then
                    # answers, its server's if it fails again or is taken out first.
                    held.append(replica.ledger.hold())
            else:
                replica.answered(now)
            settled = charges(held) if held else 0
            if settled > counted:  # re-sent for free, and since found to be the row's
                self.stats.retries += settled - counted
                self.stats.resent -= settled - counted
                counted = settled
            if not charged_at_once(kind):
                # Charged to no row unless settled so: elsewhere at once when another
                # replica is live, else after a short backoff, or (once the pool has
                # taken every replica out) when a probe finds one back.
                if spent + settled > max_retries:
                    raise self._give_up(error, attempts)
                outage += 1
                self.stats.resent += 1
                other = pool.other_than(replica)
                if other is not None:
                    prefer = other.index
                elif replica.live:  # not taken out: a short pause before the next try
                    await self._sleep(backoff_s(min(outage - 1, 2), self._draw()))
                continue
            if spent + settled >= max_retries:
                raise self._give_up(error, attempts)
            self.stats.retries += 1
            await self._sleep(retry_delay_s(spent + settled, self._draw(), error.retry_after))
            spent += 1

    def _give_up(self, error: ModelError, attempts: int) -> ModelError:
        self.stats.failures += 1
        failed = ModelError(
            f"{error} (gave up after {attempts} attempts)",
            retryable=False,
            status=error.status,
            kind=error.kind,
        )
        failed.__cause__ = error
        return failed

    def _refuse(self, error: ModelError, replica: Replica) -> ModelError:
        """The model refuses every request: its key (401/403), or its URL or name (a 404
        to ``NOT_FOUND_IN_ROW`` requests in a row, none answered). From now on each of
        its requests fails at once, unsent, with a ``model_down`` error naming the fix:
        no row is failed for it (a teacher or judge stops the run, resumable)."""
        if self._refused is None:
            name = self.settings.name
            where = f"from {replica.stats.url}"
            if error.kind == REFUSED:
                why = f"models.{name}: {error} ({where}): the server refuses the key"
                env = self.settings.api_key_env
                fix = (
                    f"check the key in {env} (models.{name}.api_key_env)"
                    if env
                    else f"set models.{name}.api_key_env to the variable holding its key"
                )
            else:
                why = (
                    f"models.{name}: {error} ({where}) to {self._not_found} requests in a "
                    "row, none answered"
                )
                fix = (
                    f"fix models.{name}.base_url (the server's URL up to /chat/completions, "
                    f"often ending in /v1) or models.{name}.model"
                )
            self._refused = ModelError(
                why, retryable=False, status=error.status, model_down=True, kind=error.kind, fix=fix
            )
            self.stats.failures += 1
            log.warning(f"{why}; no request is sent to it from now on ({fix})")
        return self._refused_error()

    def _refused_error(self) -> ModelError:
        # A new error each time: one exception object raised in many tasks at once
        # would collect their tracebacks.
        refused = self._refused
        assert refused is not None
        return ModelError(
            str(refused),
            retryable=False,
            status=refused.status,
            model_down=True,
            kind=refused.kind,
            fix=refused.fix,
        )

    async def _read_bounded(self, response: aiohttp.ClientResponse) -> bytes:
        """The body, at most ``max_reply_bytes`` of it (decompressed): a longer one fails
        the request without being held in memory (a server gone wrong, a proxy's endless
        page, a compressed bomb)."""
        limit = self._max_reply
        length = response.content_length
        if length is not None and length > limit:
            raise self._too_large(response.status)
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(_READ_CHUNK):
            size += len(chunk)
            if size > limit:
                raise self._too_large(response.status)
            chunks.append(chunk)
        return b"".join(chunks)

    def _too_large(self, status: int) -> ModelError:
        name = self.settings.name
        return ModelError(
            f"HTTP {status} with a reply larger than max_reply_bytes "
            f"({self._max_reply:,} bytes); lower models.{name}.params.max_tokens, or raise "
            f"models.{name}.max_reply_bytes",
            retryable=True,
            kind=FLAKY,
        )

    async def _pace(self, tokens: int) -> None:
        wait = 0.0
        now = self._clock()
        if self._requests is not None:
            wait = self._requests.reserve(1, now)
        if self._tokens is not None:
            wait = max(wait, self._tokens.reserve(tokens, now))
        if wait > 0:
            await self._sleep(wait)

    def _connection_error(self, exc: BaseException, url: str) -> ModelError:
        """The ModelError an attempt that got no HTTP status is (a timeout, a dropped
        connection, a URL aiohttp cannot use)."""
        if isinstance(exc, TimeoutError):
            error = ModelError(
                f"timed out after {self.settings.timeout_s:g}s", retryable=True, kind=UNHEALTHY
            )
        elif isinstance(exc, aiohttp.InvalidURL):
            error = ModelError(f"invalid URL {redact_url(url)}", retryable=False, kind=PERMANENT)
        else:
            message = scrub(f"{type(exc).__name__}: {exc}", self._secrets)
            error = ModelError(f"connection error: {message}", retryable=True, kind=UNHEALTHY)
        error.__cause__ = exc
        return error

    def _status_error(self, status: int, raw: bytes, retry_after: str | None) -> ModelError:
        """The ModelError a reply other than 200 is, from the server's own message."""
        message = _error_message(raw)
        kind = classify_status(status, message)
        if is_context_overflow(status, message):
            message += (
                "; the conversation does not fit the server's context: raise local.ctx_size "
                "(the built-in server) or the server's context size, or lower "
                f"models.{self.settings.name}.params.max_tokens"
            )
        # An HTTP-date Retry-After names wall-clock time, so it is read against time.time().
        return ModelError(
            f"HTTP {status}: {message}",
            retryable=kind != PERMANENT,
            status=status,
            retry_after=parse_retry_after(retry_after, time.time()),
            kind=kind,
        )


def endpoint(base_url: str, path: str) -> str:
    """``path`` under ``base_url``, before its query: a ``?api-version=...`` (or a key)
    stays the query instead of swallowing the path."""
    root, mark, query = base_url.partition("?")
    return f"{root.rstrip('/')}{path}{mark}{query}"


def parse_completion(
    raw: bytes, latency_s: float = 0.0, replica: int = 0, dialect: Dialect = DEFAULT_DIALECT
) -> Completion:
    """Parse a 200 response body; a body that is not a usable completion is retryable.

    Each choice's message is split into answer and trace by ``dialect``. An empty
    answer is retryable, except after a trace with ``finish_reason: length``: that
    reply was cut off while reasoning and is returned (``Completion.cut_off``) for
    its task to fail, never to be asked for again. Token counts that are not
    non-negative integers count as 0.
    """
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
    traces: list[str | None] | None = None
    if len(choices) == 1:  # nearly every request asks for one
        answer, reason, trace = _choice(choices[0], dialect)
        texts, reasons = [answer], [reason]
        if trace is not None:
            traces = [trace]
    else:
        texts, reasons = [], []
        for i, choice in enumerate(choices):
            answer, reason, trace = _choice(choice, dialect)
            texts.append(answer)
            reasons.append(reason)
            if trace is not None:
                if traces is None:
                    traces = []
                    traces += [None] * i  # the choices before had none
                traces.append(trace)
            elif traces is not None:
                traces.append(None)
    prompt_tokens, completion_tokens, reasoning_tokens, cached_tokens = _usage(data)
    return Completion(
        texts,
        reasons,
        prompt_tokens,
        completion_tokens,
        latency_s,
        replica,
        traces,
        reasoning_tokens,
        cached_tokens,
    )


def _choice(choice: Any, dialect: Dialect) -> tuple[str, str | None, str | None]:
    """(answer, finish_reason, trace) of one choice of a completion (see parse_completion)."""
    message = choice.get("message") if type(choice) is dict else None
    if type(message) is not dict:
        raise ModelError("HTTP 200 with an empty reply", retryable=True, kind=FLAKY)
    answer, trace = split_reply(message, dialect)
    reason = choice.get("finish_reason")
    if type(reason) is not str:
        reason = None
    if not answer or answer.isspace():  # (isspace: strip()'s test without the copy)
        if trace is None or reason != "length":
            raise ModelError(
                "HTTP 200 with an empty reply"
                + (" after a reasoning trace" if trace is not None else ""),
                retryable=True,
                kind=FLAKY,
            )
        answer = ""  # cut off while reasoning: the task fails it, never asks again
    return answer, reason, trace


def parse_raw(raw: bytes, latency_s: float = 0.0, replica: int = 0) -> RawReply:
    """A 200 body of a raw request: a JSON object (else retryable, as a broken
    completion is), with the usage it reports."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ModelError(
            f"HTTP 200 with a body that is not JSON: {_snippet(raw)!r}", retryable=True, kind=FLAKY
        ) from exc
    if not isinstance(data, dict):
        raise ModelError(
            f"HTTP 200 with a body that is not a JSON object: {_snippet(raw)!r}",
            retryable=True,
            kind=FLAKY,
        )
    prompt_tokens, completion_tokens, reasoning_tokens, cached_tokens = _usage(data)
    return RawReply(
        200,
        raw,
        data,
        prompt_tokens,
        completion_tokens,
        latency_s,
        replica,
        cached_tokens,
        reasoning_tokens,
    )


def _usage(data: dict[str, Any]) -> tuple[int, int, int, int]:
    """(prompt, completion, reasoning, cached prompt) tokens a reply's usage reports.

    JSON gives int or bool (a subclass of int): only a real int counts, and a server
    that reports a negative count is not believed (it would lower the run's totals).
    Written out, not a helper called per count: it runs for every reply."""
    usage = data.get("usage")
    if type(usage) is not dict:
        return 0, 0, 0, 0
    prompt = usage.get("prompt_tokens")
    if type(prompt) is not int or prompt < 0:
        prompt = 0
    completion = usage.get("completion_tokens")
    if type(completion) is not int or completion < 0:
        completion = 0
    reasoning: Any = 0
    cached: Any = 0
    details = usage.get("completion_tokens_details")
    if type(details) is dict:
        reasoning = details.get("reasoning_tokens")
        if type(reasoning) is not int or reasoning < 0:
            reasoning = 0
    details = usage.get("prompt_tokens_details")
    if type(details) is dict:
        cached = details.get("cached_tokens")
        if type(cached) is not int or cached < 0:
            cached = 0
    return prompt, completion, reasoning, cached


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
