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

from engine.mock_server import MockServer, serve_until_signalled

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
    args = parser.parse_args(argv)
    asyncio.run(
        serve_until_signalled(ClockedMockServer(latency_ms=args.latency_ms, port=args.port))
    )
    return 0


class MockProcess:
    """The clocked mock server in a child process: ``with MockProcess(50) as mock: ...``."""

    def __init__(self, latency_ms: float, log_dir: Path) -> None:
        self.latency_ms = latency_ms
        self.log_path = log_dir / f"mock-{latency_ms:g}ms.log"
        self.url = ""
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> MockProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "bench.mockserver", "--latency-ms", f"{self.latency_ms:g}"],
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

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def cpu_s(self) -> float:
        """CPU seconds the server process has used so far (user + system)."""
        from bench.runners import process_cpu_s

        return process_cpu_s(self.pid)

    def _call(self, method: str, path: str) -> dict[str, Any]:
        root = self.url.rsplit("/v1", 1)[0]
        request = urllib.request.Request(root + path, method=method)
        with _NO_PROXY.open(request, timeout=120) as response:
            data: dict[str, Any] = orjson.loads(response.read())
        return data

    def stats(self) -> dict[str, Any]:
        """Counters (no per-request log), repeats, and the serving window."""
        return self._call("GET", "/stats?bench=1")

    def reset(self, *, window_only: bool = False) -> None:
        self._call("POST", "/reset?window=1" if window_only else "/reset")


if __name__ == "__main__":
    raise SystemExit(main())
