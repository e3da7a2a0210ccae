"""The mock server as the benchmark runs it: a separate process, plus a request clock.

The engine's ``MockServer`` answers every system under test the same way. This module
runs it in its own process (so its CPU is never billed to the client being measured)
and adds one thing the benchmark needs: the server's own view of when work started and
stopped. ``GET /stats?bench=1`` returns the counters without the per-request log plus
``first_arrival`` and ``last_done`` (Unix time): the window in which requests were
actually being served, which gives every system (Turnstile, the bare loop, Distilabel)
a steady-state rate measured the same way, with start-up and shutdown left out.
``POST /reset?window=1`` restarts only that window and keeps the counters, so a
resumed run can be timed while ``requests_by_key`` still sees both runs.

Several ``MockProcess`` on fixed ports are the replicas of one model; one can be
SIGKILLed and started again on the same port (an outage).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson
from aiohttp import web

from engine.testing.mock_replies import Faults
from engine.testing.mock_server import MockServer, serve_until_signalled

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ClockedMockServer(MockServer):
    """``MockServer`` that also remembers the first arrival and the last reply."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.first_arrival: float | None = None
        self.last_done: float | None = None

    async def _chat(self, request: web.Request) -> web.Response:
        if self.first_arrival is None:
            self.first_arrival = time.time()
        try:
            return await super()._chat(request)
        finally:
            self.last_done = time.time()

    async def _get_stats(self, request: web.Request) -> web.Response:
        if "bench" not in request.query:
            return await super()._get_stats(request)
        stats = self.stats.as_dict()
        by_key = stats.pop("requests_by_key")
        stats["distinct_requests"] = len(by_key)
        stats["repeated_requests"] = sum(n - 1 for n in by_key.values() if n > 1)
        stats["first_arrival"] = self.first_arrival
        stats["last_done"] = self.last_done
        return web.Response(body=orjson.dumps(stats), content_type="application/json")

    async def _reset(self, request: web.Request) -> web.Response:
        self.first_arrival = self.last_done = None
        if "window" in request.query:
            return web.Response(body=b'{"status": "ok"}', content_type="application/json")
        return await super()._reset(request)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.mockserver")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--rate-429", type=float, default=0.0)
    parser.add_argument("--retry-after-s", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--uvloop", action="store_true", help="serve on uvloop")
    parser.add_argument("--reasoning", default=None, help="a reasoning dialect (mock-server's)")
    parser.add_argument("--reasoning-chars", type=int, default=0)
    args = parser.parse_args(argv)
    faults = Faults(rate_429=args.rate_429, retry_after_s=args.retry_after_s, seed=args.seed)
    server = ClockedMockServer(
        latency_ms=args.latency_ms,
        faults=faults,
        port=args.port,
        reasoning=args.reasoning,
        reasoning_chars=args.reasoning_chars,
    )
    loop_factory = None
    if args.uvloop:
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve_until_signalled(server))
    return 0


class MockProcess:
    """The clocked mock server in a child process: ``with MockProcess(50) as mock: ...``.

    ``port`` 0 picks a free one; after ``kill()``, ``__enter__`` starts it again on
    the same port. ``rate_429`` answers that share of requests with a 429 carrying
    ``Retry-After: retry_after_s``. ``uvloop`` serves on uvloop (a cheaper server
    leaves more of a small machine to the client being measured).
    """

    def __init__(
        self,
        latency_ms: float,
        log_dir: Path,
        *,
        port: int = 0,
        rate_429: float = 0.0,
        retry_after_s: float = 0.05,
        name: str = "",
        uvloop: bool = False,
        reasoning: str | None = None,
        reasoning_chars: int = 0,
    ) -> None:
        self.latency_ms = latency_ms
        self.reasoning = reasoning
        self.reasoning_chars = reasoning_chars
        self.uvloop = uvloop
        self.port = port
        self.rate_429 = rate_429
        self.retry_after_s = retry_after_s
        self.log_path = log_dir / f"mock-{latency_ms:g}ms{name}.log"
        self.url = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._restart = False  # a restart appends to the log of the first start

    def __enter__(self) -> MockProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab" if self._restart else "wb")
        self._restart = True
        cmd = [sys.executable, "-m", "bench.mockserver", "--latency-ms", f"{self.latency_ms:g}"]
        cmd += ["--port", str(self.port)]
        if self.uvloop:
            cmd.append("--uvloop")
        if self.reasoning:
            cmd += ["--reasoning", self.reasoning, "--reasoning-chars", str(self.reasoning_chars)]
        if self.rate_429:
            cmd += [
                "--rate-429",
                f"{self.rate_429:g}",
                "--retry-after-s",
                f"{self.retry_after_s:g}",
            ]
        self._proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=log,
            cwd=Path(__file__).resolve().parent.parent,
        )
        log.close()
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline().decode()
        if "listening on" not in line:
            self.__exit__(None, None, None)
            raise RuntimeError(f"mock server did not start: {line!r}; see {self.log_path}")
        self.url = line.rsplit(" ", 1)[1].strip()
        self.port = int(self.url.rsplit(":", 1)[1].split("/", 1)[0])
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def kill(self) -> None:
        """SIGKILL the server, as a crash would: no reply in flight is finished."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def restart(self) -> None:
        """Start it again after ``kill()``, on the same port."""
        self.__enter__()

    @property
    def running(self) -> bool:
        return self._proc is not None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def cpu_s(self) -> float:
        """CPU seconds the server process has used so far (user + system)."""
        from bench.runners import process_cpu_s

        return process_cpu_s(self.pid)

    def _call(self, method: str, path: str, timeout_s: float = 120) -> dict[str, Any]:
        root = self.url.rsplit("/v1", 1)[0]
        request = urllib.request.Request(root + path, method=method)
        with _NO_PROXY.open(request, timeout=timeout_s) as response:
            data: dict[str, Any] = orjson.loads(response.read())
        return data

    def stats(self) -> dict[str, Any]:
        """Counters (no per-request log), repeats, and the serving window."""
        return self._call("GET", "/stats?bench=1")

    def full_stats(self) -> dict[str, Any]:
        """The engine's own counters, ``requests_by_key`` included."""
        return self._call("GET", "/stats")

    def wait_requests(self, count: int, timeout_s: float = 120) -> None:
        """Return once ``count`` chat requests have arrived (``GET /wait``)."""
        self._call("GET", f"/wait?requests={count}", timeout_s)

    def reset(self, *, window_only: bool = False) -> None:
        self._call("POST", "/reset?window=1" if window_only else "/reset")


class MockGroup:
    """Mock processes serving one model (its replicas), seen as one server by
    ``runners.measure``: counters summed, the serving window from the first arrival
    at any of them to the last reply from any; ``per_replica()`` has each one's."""

    def __init__(self, mocks: list[MockProcess]) -> None:
        self.mocks = mocks

    @property
    def url(self) -> str:
        return self.mocks[0].url

    @property
    def urls(self) -> list[str]:
        return [m.url for m in self.mocks]

    def reset(self, *, window_only: bool = False) -> None:
        for mock in self.mocks:
            mock.reset(window_only=window_only)

    def cpu_s(self) -> float:
        return sum(m.cpu_s() for m in self.mocks)

    def per_replica(self) -> list[dict[str, Any]]:
        return [m.stats() for m in self.mocks]

    def stats(self) -> dict[str, Any]:
        each = self.per_replica()
        firsts = [s["first_arrival"] for s in each if s.get("first_arrival") is not None]
        lasts = [s["last_done"] for s in each if s.get("last_done") is not None]
        return {
            "completed": sum(s["completed"] for s in each),
            "total_requests": sum(s["total_requests"] for s in each),
            "repeated_requests": sum(s["repeated_requests"] for s in each),
            "first_arrival": min(firsts, default=None),
            "last_done": max(lasts, default=None),
        }


if __name__ == "__main__":
    raise SystemExit(main())
