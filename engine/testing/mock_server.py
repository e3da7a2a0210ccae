"""A real OpenAI-compatible HTTP server on loopback, with deterministic replies and faults.

The test-suite, the benchmarks and users (``turnstile mock-server``) run it. Replies
and fault choice are pure functions in ``engine.testing.mock_replies``; this module is the
aiohttp wiring, the counters and the CLI. The chat handler stays lean (orjson, no
per-request logging) because the benchmark drives it at thousands of requests/s.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any

import orjson
from aiohttp import web

from engine.testing.mock_batch import MockBatchApi
from engine.testing.mock_replies import (
    CONTEXT,
    DROP,
    FAIL_MODEL,
    HANG,
    INVALID_JSON,
    KV_FULL,
    MALFORMED,
    OK,
    RATE_LIMITED,
    REASONING_DIALECTS,
    SERVER_ERROR,
    BadRequest,
    Faults,
    completion_body,
    context_overflow,
    embeddings_body,
    error_body,
    parse_chat_request,
    pick_fault,
    raw_request_key,
    reply_for,
    request_key,
    text_completion_body,
)

__all__ = ["Faults", "MockServer", "MockStats", "main", "reply_for", "request_key"]

_JSON = "application/json"
# Truncated JSON, as a server that died mid-write would leave it.
_MALFORMED_BODY = b'{"id": "chatcmpl-mock", "object": "chat.completion", "choices": [{"mess'
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error"}


@dataclass(slots=True)
class MockStats:
    """Counters of one ``MockServer`` since it started or was last reset.

    ``requests_by_key`` counts arrivals per ``request_key(model, messages)``,
    whatever their fate, so a test can prove that a resumed run re-requested nothing.
    """

    total_requests: int = 0  # every POST to /v1/chat/completions, bad ones included
    completed: int = 0  # answered 200 with a real completion
    bad_requests: int = 0  # answered 400
    faults: collections.Counter[str] = field(default_factory=collections.Counter)
    in_flight: int = 0
    peak_in_flight: int = 0
    in_flight_by_model: dict[str, int] = field(default_factory=dict)
    peak_in_flight_by_model: dict[str, int] = field(default_factory=dict)
    requests_by_key: collections.Counter[str] = field(default_factory=collections.Counter)
    # Distinct Authorization headers seen: tests check a key reaches its own server.
    authorizations: set[str] = field(default_factory=set)
    user_agents: set[str] = field(default_factory=set)  # distinct User-Agent headers seen

    def as_dict(self) -> dict[str, Any]:
        """The counters as plain JSON-ready values."""
        return {
            "total_requests": self.total_requests,
            "completed": self.completed,
            "bad_requests": self.bad_requests,
            "faults": dict(self.faults),
            "in_flight": self.in_flight,
            "peak_in_flight": self.peak_in_flight,
            "in_flight_by_model": dict(self.in_flight_by_model),
            "peak_in_flight_by_model": dict(self.peak_in_flight_by_model),
            "requests_by_key": dict(self.requests_by_key),
            "authorizations": len(self.authorizations),
        }


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, content_type=_JSON)


def _error(status: int, message: str, kind: str | None = None) -> web.Response:
    if kind is None:
        kind = _ERROR_TYPES.get(
            status, "server_error" if status >= 500 else "invalid_request_error"
        )
    return _json(error_body(message, kind), status)


async def _chunked(request: web.Request, data: bytes) -> web.StreamResponse:
    """``data`` sent with chunked transfer encoding: the client cannot know its size."""
    response = web.StreamResponse(headers={"Content-Type": _JSON})
    response.enable_chunked_encoding()
    await response.prepare(request)
    for start in range(0, len(data), 1024):
        await response.write(data[start : start + 1024])
    await response.write_eof()
    return response


def _abort(request: web.Request) -> web.Response:
    # Closing the socket makes aiohttp's write of the returned response fail quietly
    # (it counts as a premature client disconnection), so the client sees the drop.
    if request.transport is not None:
        request.transport.close()
    return web.Response(status=500)


class MockServer:
    """An OpenAI-compatible chat completion server on ``host:port`` (0 = a free port).

    ``latency_ms``, ``faults``, ``reasoning`` and ``reasoning_chars`` may be changed
    while it runs. With ``reasoning`` (one of ``REASONING_DIALECTS``) every reply
    thinks first, a trace of ``reasoning_chars`` characters in that dialect. Use as
    ``async with MockServer(...) as server:`` or call ``start()``/``stop()``.
    """

    def __init__(
        self,
        latency_ms: float = 0.0,
        faults: Faults | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        reasoning: str | None = None,
        reasoning_chars: int = 0,
        batch_delay_s: float = 0.0,
        position_bias: float = 0.0,
    ) -> None:
        if reasoning is not None and reasoning not in REASONING_DIALECTS:
            raise ValueError(
                f"reasoning: {reasoning!r} is not one of {', '.join(REASONING_DIALECTS)}"
            )
        self.reasoning = reasoning
        self.reasoning_chars = reasoning_chars
        if not 0.0 <= position_bias <= 1.0:
            raise ValueError(f"position_bias: {position_bias!r} is not a share from 0 to 1")
        # The share of pairwise judge verdicts naming the answer shown first, whatever
        # the answers (engine.testing.mock_judges).
        self.position_bias = position_bias
        self.latency_ms = latency_ms
        self.host = host
        self.port = port
        self.base_url = ""
        self._faults = faults if faults is not None else Faults()
        self._rng = random.Random(self._faults.seed)
        self._stats = MockStats()
        self._models: set[str] = {"mock"}
        self._next_id = 0
        self._runner: web.AppRunner | None = None
        self._closing = asyncio.Event()
        self._watchers: list[tuple[int, asyncio.Event]] = []
        # Requests whose last message holds ``hold`` wait until release() (tests that
        # look at a run while it is held at a known point).
        self.hold: str | None = None
        # Replies sent in chunks with no Content-Length, as a streaming proxy sends them.
        self.chunked = False
        self._released = asyncio.Event()
        # Set to a list to have every request's (path, parsed body) appended to it, as
        # it arrived (tests check what a run sent); None records nothing.
        self.recorded: list[tuple[str, Any]] | None = None
        # The Batch API (/v1/files, /v1/batches): engine.testing.mock_batch.
        self.batch = MockBatchApi(self, delay_s=batch_delay_s)

    @property
    def faults(self) -> Faults:
        """The fault settings; replacing them re-seeds the fault draw."""
        return self._faults

    @faults.setter
    def faults(self, faults: Faults) -> None:
        self._faults = faults
        self._rng = random.Random(faults.seed)

    def release(self) -> None:
        """Let the held requests (``hold``) go on, and every later one."""
        self._released.set()

    @property
    def stats(self) -> MockStats:
        """The live counters (a new object after ``reset()``)."""
        return self._stats

    def reset(self) -> None:
        """Zero the counters and the request log, and re-seed the fault draw.

        Requests still in flight stay counted in ``in_flight``, so it never goes negative.
        """
        old = self._stats
        self._stats = MockStats(
            in_flight=old.in_flight,
            peak_in_flight=old.in_flight,
            in_flight_by_model=dict(old.in_flight_by_model),
            peak_in_flight_by_model=dict(old.in_flight_by_model),
        )
        self._rng = random.Random(self._faults.seed)

    async def wait_for_requests(self, count: int) -> None:
        """Return once ``count`` chat requests have arrived since the last reset.

        Tests use it to act at a known point of a run (a SIGKILL after N
        requests, say) without sleeping.
        """
        if self._stats.total_requests >= count:
            return
        event = asyncio.Event()
        self._watchers.append((count, event))
        await event.wait()

    def _notify(self) -> None:
        total = self._stats.total_requests
        ready = [(n, e) for n, e in self._watchers if total >= n]
        for item in ready:
            self._watchers.remove(item)
            item[1].set()

    async def start(self) -> str:
        """Bind and serve; return the base URL, like ``http://127.0.0.1:PORT/v1``."""
        if self._runner is not None:
            raise RuntimeError("MockServer is already running")
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_get("/v1/models", self._list_models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/stats", self._get_stats)
        app.router.add_get("/wait", self._wait)
        app.router.add_post("/reset", self._reset)
        self.batch.routes(app)
        # handler_cancellation: a client that gives up frees its slot in in_flight,
        # as a real inference server aborts the request.
        runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port, backlog=1024).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._closing = asyncio.Event()
        self.port = int(runner.addresses[0][1])
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        if ":" in host:
            host = f"[{host}]"
        self.base_url = f"http://{host}:{self.port}/v1"
        return self.base_url

    async def stop(self) -> None:
        """Stop serving. Hung requests are released (their connections dropped) first."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._closing.set()
        await runner.cleanup()

    async def __aenter__(self) -> MockServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        stats = self._stats
        stats.total_requests += 1
        if self._watchers:
            self._notify()
        auth = request.headers.get("Authorization")
        if auth is not None:
            stats.authorizations.add(auth)
        stats.user_agents.add(request.headers.get("User-Agent", ""))
        try:
            parsed = orjson.loads(await request.read())
            if self.recorded is not None:
                self.recorded.append((request.path, parsed))
            chat = parse_chat_request(parsed)
        except (BadRequest, orjson.JSONDecodeError) as exc:
            stats.bad_requests += 1
            message = str(exc) if isinstance(exc, BadRequest) else f"invalid JSON body: {exc}"
            return _error(400, message)
        model = chat.model
        self._models.add(model)
        stats.requests_by_key[request_key(model, chat.messages)] += 1
        # Decide first, then do the I/O; the draw happens in arrival order.
        fault = pick_fault(self._faults, model, self._rng.random())
        too_long = context_overflow(chat, self._faults.context_tokens)
        if too_long is not None:
            stats.faults[CONTEXT] += 1
            return _error(400, too_long, "exceed_context_size_error")

        stats.in_flight += 1
        stats.peak_in_flight = max(stats.peak_in_flight, stats.in_flight)
        by_model = stats.in_flight_by_model
        by_model[model] = now = by_model.get(model, 0) + 1
        if now > stats.peak_in_flight_by_model.get(model, 0):
            stats.peak_in_flight_by_model[model] = now
        try:
            if self.hold is not None and self.hold in str(chat.messages[-1].get("content")):
                await self._released.wait()
            if self.latency_ms > 0:
                await asyncio.sleep(self.latency_ms / 1000)
                stats = self._stats  # reset() may have swapped it during the sleep
            if fault == OK:
                self._next_id += 1
                body = completion_body(
                    chat,
                    completion_id=f"chatcmpl-mock-{self._next_id}",
                    created=int(time.time()),
                    reasoning=self.reasoning,
                    trace_chars=self.reasoning_chars,
                    user_rates=(self._faults.user_end_rate, self._faults.user_repeat_rate),
                    position_bias=self.position_bias,
                )
                stats.completed += 1
                if self.chunked:
                    return await _chunked(request, orjson.dumps(body))
                return _json(body)
            stats.faults[fault] += 1
            return await self._fault(request, fault, model)
        finally:
            # The live object: reset() carries the in-flight gauges over to its new one.
            self._stats.in_flight -= 1
            self._stats.in_flight_by_model[model] -= 1

    async def _completions(self, request: web.Request) -> web.Response:
        return await self._raw(request, "completions")

    async def _embeddings(self, request: web.Request) -> web.Response:
        return await self._raw(request, "embeddings")

    async def _raw(self, request: web.Request, kind: str) -> web.Response:
        """``/v1/completions`` and ``/v1/embeddings``: deterministic replies (pure, in
        mock_replies), counted with the chat requests, under the same faults."""
        stats = self._stats
        stats.total_requests += 1
        if self._watchers:
            self._notify()
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            stats.bad_requests += 1
            return _error(400, f"invalid JSON body: {exc}")
        if self.recorded is not None:
            self.recorded.append((request.path, body))
        stats.requests_by_key[raw_request_key(request.path, body)] += 1
        model = body.get("model") if isinstance(body, dict) else None
        fault = pick_fault(self._faults, str(model), self._rng.random())
        if fault not in (OK, INVALID_JSON):  # no JSON was asked for: a reply is a reply
            stats.faults[fault] += 1
            return await self._fault(request, fault, str(model))
        if self.latency_ms > 0:
            await asyncio.sleep(self.latency_ms / 1000)
        try:
            if kind == "completions":
                self._next_id += 1
                reply = text_completion_body(
                    body, completion_id=f"cmpl-mock-{self._next_id}", created=int(time.time())
                )
            else:
                reply = embeddings_body(body)
        except BadRequest as exc:
            self._stats.bad_requests += 1
            return _error(400, str(exc))
        self._stats.completed += 1
        return _json(reply)

    async def _fault(self, request: web.Request, fault: str, model: str) -> web.Response:
        faults = self._faults
        echo = ""
        if faults.echo_authorization:
            echo = f" (Authorization: {request.headers.get('Authorization', '')})"
        if fault == FAIL_MODEL:
            status = faults.fail_models[model]
            response = _error(status, f"model {model!r} is set to fail with HTTP {status}{echo}")
            if status == 429:
                response.headers["Retry-After"] = f"{faults.retry_after_s:g}"
            return response
        if fault == RATE_LIMITED:
            response = _error(429, "mock rate limit: slow down", "rate_limit_error")
            response.headers["Retry-After"] = f"{faults.retry_after_s:g}"
            return response
        if fault == SERVER_ERROR:
            return _error(500, "mock injected server error")
        if fault == KV_FULL:
            return _error(500, "Context size has been exceeded.", "server_error")
        if fault == INVALID_JSON:
            chat = parse_chat_request(orjson.loads(await request.read()))
            body = completion_body(
                replace(chat, json_schema=None), completion_id="chatcmpl-mock-bad", created=0
            )
            body["choices"][0]["message"]["content"] = "Sure! Here is the JSON: {not json"
            return _json(body)
        if fault == MALFORMED:
            return web.Response(body=_MALFORMED_BODY + echo.encode(), content_type=_JSON)
        if fault == HANG:
            await self._closing.wait()
        assert fault in (HANG, DROP), fault
        return _abort(request)

    async def _list_models(self, request: web.Request) -> web.Response:
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "turnstile-mock"}
            for name in sorted(self._models)
        ]
        return _json({"object": "list", "data": data})

    async def _health(self, request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def _get_stats(self, request: web.Request) -> web.Response:
        return _json(self._stats.as_dict())

    async def _wait(self, request: web.Request) -> web.Response:
        """``GET /wait?requests=N``: answers once N chat requests have arrived (a test
        in another process acts at a known point of a run without polling)."""
        try:
            count = int(request.query.get("requests", "0"))
        except ValueError:
            return _error(400, "requests must be a whole number")
        await self.wait_for_requests(count)
        return _json(self._stats.as_dict())

    async def _reset(self, request: web.Request) -> web.Response:
        self.reset()
        return _json({"status": "ok"})


def _fail_model(text: str) -> tuple[str, int]:
    name, sep, status = text.rpartition("=")
    if not sep or not name or not status.isdigit() or not 400 <= int(status) <= 599:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not NAME=STATUS with an HTTP error status, e.g. broken=500"
        )
    return name, int(status)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="turnstile mock-server",
        description="Serve a mock OpenAI-compatible chat API with deterministic replies.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--rate-429", type=float, default=0.0)
    parser.add_argument("--rate-500", type=float, default=0.0)
    parser.add_argument("--rate-drop", type=float, default=0.0)
    parser.add_argument("--rate-malformed", type=float, default=0.0)
    parser.add_argument("--rate-hang", type=float, default=0.0)
    parser.add_argument("--rate-kv-full", type=float, default=0.0)
    parser.add_argument("--rate-invalid-json", type=float, default=0.0)
    parser.add_argument(
        "--context-tokens", type=int, default=None, help="answer longer requests with a 400"
    )
    parser.add_argument("--retry-after-s", type=float, default=0.05)
    parser.add_argument(
        "--reasoning",
        choices=REASONING_DIALECTS,
        default=None,
        help="think before answering, the trace in this dialect: a field (reasoning_content, "
        "reasoning) or inline (think: <think>TRACE</think>ANSWER; think-close: "
        "TRACE</think>ANSWER)",
    )
    parser.add_argument(
        "--position-bias",
        type=float,
        default=0.0,
        metavar="P",
        help="the pairwise judge names the answer shown first for this share of requests "
        "(0-1, drawn from each request's hash)",
    )
    parser.add_argument(
        "--reasoning-chars",
        type=int,
        default=0,
        help="pad each trace to this many characters (with --reasoning)",
    )
    parser.add_argument(
        "--user-end-rate",
        type=float,
        default=0.0,
        help="the share of a simulated user's messages (models named user-...) that end "
        "with the end marker [END]",
    )
    parser.add_argument(
        "--user-repeat-rate",
        type=float,
        default=0.0,
        help="the share of a simulated user's messages that repeat its first message",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--batch-delay-s",
        type=float,
        default=0.0,
        help="the Batch API: a batch completes this many seconds after it is created",
    )
    parser.add_argument(
        "--batch-error-rate",
        type=float,
        default=0.0,
        help="the share of a batch's lines that land in its error file (a 500)",
    )
    parser.add_argument(
        "--batch-expire",
        type=int,
        default=0,
        help="this many batches expire with half of their lines done",
    )
    parser.add_argument(
        "--fail-model",
        type=_fail_model,
        action="append",
        default=[],
        metavar="NAME=STATUS",
        help="always answer this model with this HTTP status (repeatable)",
    )
    return parser


async def serve_until_signalled(server: MockServer) -> None:
    """Serve, print the URL (what callers read to learn the port), stop on SIGINT/SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        print(f"mock server listening on {server.base_url}", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    """Run ``turnstile mock-server`` until SIGINT or SIGTERM; return the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not 0.0 <= args.position_bias <= 1.0:
        parser.error(f"--position-bias: {args.position_bias!r} is not a share from 0 to 1")
    try:
        faults = Faults(
            rate_429=args.rate_429,
            rate_500=args.rate_500,
            rate_drop=args.rate_drop,
            rate_malformed=args.rate_malformed,
            rate_hang=args.rate_hang,
            rate_kv_full=args.rate_kv_full,
            rate_invalid_json=args.rate_invalid_json,
            context_tokens=args.context_tokens,
            retry_after_s=args.retry_after_s,
            seed=args.seed,
            fail_models=dict(args.fail_model),
            user_end_rate=args.user_end_rate,
            user_repeat_rate=args.user_repeat_rate,
        )
    except ValueError as exc:
        parser.error(str(exc))
    server = MockServer(
        latency_ms=args.latency_ms,
        faults=faults,
        host=args.host,
        port=args.port,
        reasoning=args.reasoning,
        reasoning_chars=args.reasoning_chars,
        batch_delay_s=args.batch_delay_s,
        position_bias=args.position_bias,
    )
    server.batch.error_rate = args.batch_error_rate
    server.batch.expire_next = args.batch_expire
    try:
        asyncio.run(serve_until_signalled(server))
    except OSError as exc:
        print(
            f"turnstile mock-server: cannot listen on {args.host}:{args.port}: {exc}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
