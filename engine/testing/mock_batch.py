"""The mock server's Batch API: ``/v1/files`` and ``/v1/batches``, as OpenAI serves them.

A batch completes ``delay_s`` seconds after it is created (checked when it is read:
no timers). Its lines are answered as ``/v1/chat/completions`` would answer them
(``engine.testing.mock_replies``). Faults, settable while it runs:

- ``error_rate``: the share of lines that land in the error file (a 500, retryable),
  drawn from the line's ``custom_id`` (the same line fails the same way every time);
- ``expire_next``: the next N batches expire with only the first half of their lines
  done (the rest in the error file with code ``batch_expired``);
- a line whose last message holds ``BATCH-400`` is answered 400 (permanent);
- ``hold_content``: an output file is served up to its middle, then waits for
  ``release_content()`` (tests kill a run while it reads one).

Files (uploaded, output and error) are kept on disk, in a temporary folder removed with
the server, so a run of 10^6 requests costs the mock its disk, not its memory.

``events`` counts what happened (upload, create, get, list, cancel, content) and
``lines_by_id`` how often each ``custom_id`` was submitted; ``wait_for(event, n)``
returns once ``event`` happened ``n`` times.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import tempfile
import time
import weakref
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import BodyPartReader, web

from engine.testing.mock_replies import BadRequest, completion_body, parse_chat_request

if TYPE_CHECKING:
    from engine.testing.mock_server import MockServer

CHAT = "/v1/chat/completions"
PERMANENT_MARK = "BATCH-400"


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, content_type="application/json")


def _missing(what: str) -> web.Response:
    return _json({"error": {"message": f"no such {what}", "type": "invalid_request_error"}}, 404)


def _share(custom_id: str, seed: int) -> float:
    digest = hashlib.blake2b(f"{seed}:{custom_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest) / 2**64


class MockBatchApi:
    """The Batch API of one ``MockServer`` (its ``batch`` attribute)."""

    def __init__(self, server: MockServer, delay_s: float = 0.0) -> None:
        self.server = server
        self.delay_s = delay_s
        self.error_rate = 0.0
        self.expire_next = 0
        self.seed = 0
        self.hold_content = False
        self._dir = Path(tempfile.mkdtemp(prefix="turnstile-mock-batch-"))
        weakref.finalize(self, shutil.rmtree, self._dir, True)
        self.files: dict[str, Path] = {}  # file id -> its bytes on disk
        self.batches: dict[str, dict[str, Any]] = {}
        self._created: dict[str, float] = {}
        self._order: list[str] = []  # batch ids, oldest first
        self.events: Counter[str] = Counter()
        self.lines_by_id: Counter[str] = Counter()
        self._watchers: list[tuple[str, int, asyncio.Event]] = []
        self._released = asyncio.Event()
        self._next = 0

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/files", self._upload)
        app.router.add_get("/v1/files/{id}/content", self._content)
        app.router.add_delete("/v1/files/{id}", self._delete)
        app.router.add_post("/v1/batches", self._create)
        app.router.add_get("/v1/batches", self._list)
        app.router.add_get("/v1/batches/{id}", self._get)
        app.router.add_post("/v1/batches/{id}/cancel", self._cancel)

    def release_content(self) -> None:
        self._released.set()

    async def wait_for(self, event: str, count: int = 1) -> None:
        """Return once ``event`` has happened ``count`` times."""
        if self.events[event] >= count:
            return
        ready = asyncio.Event()
        self._watchers.append((event, count, ready))
        await ready.wait()

    def _happened(self, event: str) -> None:
        self.events[event] += 1
        for item in [w for w in self._watchers if self.events[w[0]] >= w[1]]:
            self._watchers.remove(item)
            item[2].set()

    def _id(self, prefix: str) -> str:
        self._next += 1
        return f"{prefix}-mock-{self._next}"

    async def _upload(self, request: web.Request) -> web.Response:
        path: Path | None = None
        size = 0
        purpose = None
        name = "upload.jsonl"
        file_id = self._id("file")
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                continue
            if part.name == "purpose":
                purpose = (await part.read()).decode()
            elif part.name == "file":
                name = part.filename or name
                path = self._dir / file_id
                with path.open("wb") as f:  # chunk by chunk: a 200 MB file is never whole
                    while chunk := await part.read_chunk(1 << 20):
                        f.write(chunk)
                        size += len(chunk)
        if path is None or purpose != "batch":
            if path is not None:
                path.unlink()
            return _json({"error": {"message": "need purpose=batch and a file"}}, 400)
        self.files[file_id] = path
        self._happened("upload")
        return _json(
            {
                "id": file_id,
                "object": "file",
                "bytes": size,
                "created_at": int(time.time()),
                "filename": name,
                "purpose": "batch",
            }
        )

    async def _delete(self, request: web.Request) -> web.Response:
        file_id = request.match_info["id"]
        path = self.files.pop(file_id, None)
        if path is None:
            return _missing("file")
        path.unlink(missing_ok=True)
        return _json({"id": file_id, "object": "file", "deleted": True})

    async def _create(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        file_id = body.get("input_file_id")
        if file_id not in self.files:
            return _missing("file")
        total = 0
        for line in _lines(self.files[file_id]):
            self.lines_by_id[line["custom_id"]] += 1
            total += 1
        batch_id = self._id("batch")
        self.batches[batch_id] = {
            "id": batch_id,
            "object": "batch",
            "endpoint": body.get("endpoint", CHAT),
            "errors": None,
            "input_file_id": file_id,
            "completion_window": body.get("completion_window", "24h"),
            "status": "in_progress",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": int(time.time()),
            "request_counts": {"total": total, "completed": 0, "failed": 0},
            "metadata": dict(body.get("metadata") or {}),
        }
        self._created[batch_id] = time.monotonic()
        self._order.append(batch_id)
        self._happened("create")
        return _json(self.batches[batch_id])

    def _advance(self, batch_id: str) -> dict[str, Any]:
        batch = self.batches[batch_id]
        if batch["status"] == "cancelling":
            batch["status"] = "cancelled"
        elif (
            batch["status"] == "in_progress"
            and time.monotonic() - self._created[batch_id] >= self.delay_s
        ):
            expire = self.expire_next > 0
            if expire:
                self.expire_next -= 1
            self._finish(batch, expire=expire)
        return batch

    def _finish(self, batch: dict[str, Any], *, expire: bool) -> None:
        total = batch["request_counts"]["total"]
        done = total // 2 if expire else total
        out_id, errors_id = self._id("file"), self._id("file")
        completed = failed = 0
        with (self._dir / out_id).open("wb") as out, (self._dir / errors_id).open("wb") as errors:
            for number, line in enumerate(_lines(self.files[batch["input_file_id"]])):
                entry = self._answer(line, expired=number >= done)
                if entry["error"] is None and entry["response"]["status_code"] == 200:
                    out.write(orjson.dumps(entry) + b"\n")
                    completed += 1
                else:
                    errors.write(orjson.dumps(entry) + b"\n")
                    failed += 1
        batch["status"] = "expired" if expire else "completed"
        batch["request_counts"] = {"total": total, "completed": completed, "failed": failed}
        for key, file_id, count in (
            ("output_file_id", out_id, completed),
            ("error_file_id", errors_id, failed),
        ):
            if count:
                self.files[file_id] = self._dir / file_id
                batch[key] = file_id
            else:
                (self._dir / file_id).unlink()

    def _answer(self, line: dict[str, Any], *, expired: bool) -> dict[str, Any]:
        """One input line's entry in the output or error file."""
        cid = line["custom_id"]
        self._next += 1
        entry: dict[str, Any] = {"id": f"batch_req_{self._next}", "custom_id": cid}
        if expired:
            error = {"code": "batch_expired", "message": "the batch expired"}
            return entry | {"response": None, "error": error}
        try:
            chat = parse_chat_request(line["body"])
        except BadRequest as exc:
            return entry | {"response": _error_response(400, str(exc)), "error": None}
        last = str(chat.messages[-1].get("content", "")) if chat.messages else ""
        if PERMANENT_MARK in last:
            return entry | {"response": _error_response(400, "refused (mock)"), "error": None}
        if self.error_rate and _share(cid, self.seed) < self.error_rate:
            return entry | {"response": _error_response(500, "server error (mock)"), "error": None}
        server = self.server
        body = completion_body(
            chat,
            completion_id=f"chatcmpl-mock-{self._next}",
            created=int(time.time()),
            reasoning=server.reasoning,
            trace_chars=server.reasoning_chars,
        )
        server.stats.completed += 1
        response = {"status_code": 200, "request_id": entry["id"], "body": body}
        return entry | {"response": response, "error": None}

    async def _get(self, request: web.Request) -> web.Response:
        batch_id = request.match_info["id"]
        if batch_id not in self.batches:
            return _missing("batch")
        self._happened("get")
        return _json(self._advance(batch_id))

    async def _list(self, request: web.Request) -> web.Response:
        limit = int(request.query.get("limit", "20"))
        after = request.query.get("after")
        newest = self._order[::-1]
        start = newest.index(after) + 1 if after in newest else 0
        page = newest[start : start + limit]
        self._happened("list")
        return _json(
            {
                "object": "list",
                "data": [self._advance(b) for b in page],
                "has_more": start + limit < len(newest),
                "first_id": page[0] if page else None,
                "last_id": page[-1] if page else None,
            }
        )

    async def _cancel(self, request: web.Request) -> web.Response:
        batch_id = request.match_info["id"]
        if batch_id not in self.batches:
            return _missing("batch")
        batch = self.batches[batch_id]
        if batch["status"] in ("validating", "in_progress", "finalizing"):
            batch["status"] = "cancelling"
        self._happened("cancel")
        return _json(batch)

    async def _content(self, request: web.Request) -> web.StreamResponse:
        path = self.files.get(request.match_info["id"])
        if path is None:
            return _missing("file")
        self._happened("content")
        if not self.hold_content:
            return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})
        response = web.StreamResponse()
        response.content_type = "application/octet-stream"
        await response.prepare(request)
        lines = path.read_bytes().splitlines(keepends=True)
        half = max(1, len(lines) // 2)
        await response.write(b"".join(lines[:half]))
        self._happened("content_half")
        await self._released.wait()
        await response.write(b"".join(lines[half:]))
        await response.write_eof()
        return response


def _lines(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON lines of a file on disk, one at a time."""
    with path.open("rb") as f:
        for raw in f:
            if raw.strip():
                yield orjson.loads(raw)


def _error_response(status: int, message: str) -> dict[str, Any]:
    return {
        "status_code": status,
        "request_id": "req-mock",
        "body": {"error": {"message": message, "type": "invalid_request_error"}},
    }
