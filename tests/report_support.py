"""History lines for the report tests, and a headless Chromium to look at the page.

The lines have the shape engine.history writes (tests/test_report.py checks the
reader against it); ``realistic_history`` is a job that was stopped and resumed,
lost one of its two replicas for a while and failed some requests meanwhile.

``chromium`` drives a headless Chromium over the DevTools protocol: a websocket to
its ``--remote-debugging-port`` on loopback, spoken with aiohttp (no browser
automation package). It opens a page, collects its console errors and uncaught
exceptions, evaluates script in it, moves the mouse and takes screenshots.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import math
import os
import random
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import orjson

T0 = 1_796_357_872.0  # 2026-12-03, a fixed time: no test reads the clock
GPU1 = "http://gpu1:8000/v1"
GPU2 = "http://gpu2:8000/v1"


def replica(url: str, *, live: bool = True, in_flight: int = 0, cap: int = 16) -> dict[str, Any]:
    return {
        "url": url,
        "in_flight": in_flight,
        "limit": None,
        "cap": cap,
        "live": live,
        "requests": 0,
        "ok": 0,
        "failures": 0,
    }


def model(
    *,
    requests: int = 0,
    retries: int = 0,
    failures: int = 0,
    prompt: int = 0,
    completion: int = 0,
    in_flight: int = 0,
    limit: int | None = None,
    cap: int = 32,
    p50: float | None = None,
    p95: float | None = None,
    replicas: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "requests": requests,
        "ok": requests - failures,
        "retries": retries,
        "resent": 0,
        "failures": failures,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "in_flight": in_flight,
        "limit": limit,
        "cap": cap,
        "p50": p50,
        "p95": p95,
        "replicas": replicas or [],
    }


def line(
    t: float, run: str, *, turns: int = 0, rows_ok: int = 0, **models: dict[str, Any]
) -> dict[str, Any]:
    return {
        "v": 1,
        "t": t,
        "run": run,
        "step": 1.0,
        "rows_ok": rows_ok,
        "rows_failed": 0,
        "rows_filtered": 0,
        "rows_total": 1000,
        "turns": turns,
        "models": models,
    }


def encode(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(item) + b"\n" for item in lines)


def realistic_history(samples: int = 400, *, seed: int = 7) -> list[dict[str, Any]]:
    """Two runs (stopped at 55%, resumed two minutes later) of a 2-replica teacher, with
    gpu2 out for a stretch of the first run; one sample a second."""
    rng = random.Random(seed)
    stop = int(samples * 0.55)
    out_from, out_to = int(samples * 0.2), int(samples * 0.3)
    lines: list[dict[str, Any]] = []
    rows = 0
    runs = (("20261203T000000Z-100", 0, stop, 0.0), ("20261203T001100Z-200", stop, samples, 120.0))
    for run, first, last, pause in runs:
        turns = requests = retries = failures = prompt = completion = 0
        for i in range(first, last):
            t = T0 + i + pause
            gpu2_live = not out_from <= i < out_to
            live = 2 if gpu2_live else 1
            finished = rng.randint(8, 12) * live // 2
            turns += finished
            rows += finished // 3
            requests += finished + (0 if gpu2_live else rng.randint(2, 5))
            retries += 0 if gpu2_live else rng.randint(2, 5)
            failures += rng.random() < (0.05 if gpu2_live else 0.4)
            prompt += finished * rng.randint(70, 90)
            completion += finished * rng.randint(140, 170)
            wave = 1 + 0.3 * math.sin(i / 25)
            gpu2_flight = rng.randint(12, 16) if gpu2_live else 0
            lines.append(
                line(
                    t,
                    run,
                    turns=turns,
                    rows_ok=rows,
                    teacher=model(
                        requests=requests,
                        retries=retries,
                        failures=failures,
                        prompt=prompt,
                        completion=completion,
                        in_flight=min(16 * live, rng.randint(12, 16) * live),
                        limit=None if gpu2_live else 16,
                        cap=32,
                        p50=round(0.8 * wave + rng.random() * 0.1, 3),
                        p95=round(2.6 * wave + rng.random() * 0.6, 3),
                        replicas=[
                            replica(GPU1, in_flight=rng.randint(12, 16)),
                            replica(GPU2, live=gpu2_live, in_flight=gpu2_flight),
                        ],
                    ),
                )
            )
    return lines


# -- a headless Chromium over the DevTools protocol ------------------------------------

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
)


class Page:
    """One tab, attached over the browser's DevTools websocket (flat sessions)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.session: str | None = None
        self.ids = itertools.count(1)
        self.waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self.loaded = anyio.Event()

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        """A DevTools command (to the tab once attached); its result."""
        message: dict[str, Any] = {"id": next(self.ids), "method": method, "params": params}
        if self.session is not None:
            message["sessionId"] = self.session
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiting[message["id"]] = future
        await self.ws.send_str(orjson.dumps(message).decode())
        with anyio.fail_after(60):
            reply = await future
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    async def read(self) -> None:
        """Hand replies to their callers and keep the events, until the socket closes."""
        async for message in self.ws:
            if message.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                break
            data = orjson.loads(message.data)
            if "id" in data:
                future = self.waiting.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
            else:
                self.events.append(data)
                if data.get("method") == "Page.loadEventFired":
                    self.loaded.set()

    async def open(self, url: str, *, width: int = 1200, height: int = 900) -> None:
        """Navigate the tab to ``url`` and wait for its load event (its scripts have run)."""
        size = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
        await self.call("Emulation.setDeviceMetricsOverride", **size)
        self.loaded = anyio.Event()
        await self.call("Page.navigate", url=url)
        with anyio.fail_after(60):
            await self.loaded.wait()
        state = await self.evaluate("[location.href, document.readyState]")
        assert state == [url, "complete"], state

    async def evaluate(self, expression: str) -> Any:
        """The value of a script expression in the page (awaited when it is a promise)."""
        result = await self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:60]}...: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def mouse(self, kind: str, x: float, y: float, **extra: Any) -> None:
        """A real mouse event at page coordinates (mouseMoved, mousePressed, ...)."""
        await self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, **extra)

    async def screenshot(self, path: Path) -> None:
        """The whole page, as a PNG."""
        shot = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(shot["data"]))

    def errors(self) -> list[str]:
        """Console errors, failed loads and uncaught exceptions so far, as text."""
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                found.append(str(details.get("exception", {}).get("description") or details))
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append(" ".join(str(a.get("value", a)) for a in params.get("args", [])))
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                found.append(str(params["entry"].get("text")))
        return found


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@asynccontextmanager
async def chromium(profile: Path) -> AsyncIterator[Page]:
    """A fresh headless Chromium (its profile in ``profile``) and a tab in it."""
    binary = chromium_path()
    assert binary is not None, "chromium is not installed"
    process = await asyncio.create_subprocess_exec(
        binary,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        "about:blank",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "HOME": str(profile)},
    )
    assert process.stderr is not None
    try:
        with anyio.fail_after(60):
            while True:  # it names its websocket on stderr once it listens
                line = (await process.stderr.readline()).decode(errors="replace")
                assert line, "chromium exited before it listened for DevTools"
                if line.startswith("DevTools listening on "):
                    address = line.split(" on ", 1)[1].strip()
                    break
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(address, max_msg_size=0) as ws,
            anyio.create_task_group() as group,
        ):
            page = Page(ws)
            group.start_soon(page.read)
            group.start_soon(_drain, process.stderr)
            target = await page.call("Target.createTarget", url="about:blank")
            attached = await page.call(
                "Target.attachToTarget", targetId=target["targetId"], flatten=True
            )
            page.session = attached["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                await page.call(f"{domain}.enable")
            yield page
            # No reply to wait for: the browser closes the socket as it goes.
            await ws.send_str(orjson.dumps({"id": 0, "method": "Browser.close"}).decode())
            group.cancel_scope.cancel()
        with anyio.move_on_after(10):
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(1 << 16):
        pass
