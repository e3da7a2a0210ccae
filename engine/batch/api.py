"""The Batch API of an OpenAI-compatible provider, over HTTP: files and batches."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import orjson

from engine.errors import ModelError
from engine.http.client import endpoint
from engine.http.retry import is_retryable_status

READ_CHUNK = 1 << 20


class BatchApi:
    """Calls to ``/v1/files`` and ``/v1/batches`` under ``base_url`` (with ``api_key``)."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, api_key: str | None):
        self._session = session
        self._base = base_url
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def _url(self, path: str) -> str:
        return endpoint(self._base, path)

    async def _call(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        url = self._url(path)
        try:
            async with self._session.request(method, url, headers=self._headers, **kw) as r:
                raw = await r.read()
                if r.status != 200:
                    raise ModelError(
                        f"{method} {path}: HTTP {r.status}: {raw[:200]!r}",
                        retryable=is_retryable_status(r.status),
                        status=r.status,
                    )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ModelError(f"{method} {path}: {exc!r}", retryable=True) from exc
        data = orjson.loads(raw)
        if not isinstance(data, dict):
            raise ModelError(f"{method} {path}: not a JSON object", retryable=True)
        return data

    async def upload(self, data: bytes, name: str) -> str:
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", data, filename=name, content_type="application/jsonl")
        return str((await self._call("POST", "/files", data=form))["id"])

    async def create(
        self, file_id: str, window: str, metadata: Mapping[str, str]
    ) -> dict[str, Any]:
        body = {
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": window,
            "metadata": dict(metadata),
        }
        return await self._call("POST", "/batches", json=body)

    async def get(self, batch_id: str) -> dict[str, Any]:
        return await self._call("GET", f"/batches/{batch_id}")

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        return await self._call("POST", f"/batches/{batch_id}/cancel")

    async def batches(self) -> AsyncIterator[dict[str, Any]]:
        """Every batch of the account, newest first."""
        after: str | None = None
        while True:
            params = {"limit": "100"} | ({"after": after} if after else {})
            page = await self._call("GET", "/batches", params=params)
            data = page.get("data") or []
            for batch in data:
                yield batch
            if not page.get("has_more") or not data:
                return
            after = str(data[-1]["id"])

    async def lines(self, file_id: str) -> AsyncIterator[bytes]:
        """A file's content, line by line as it arrives."""
        path = f"/files/{file_id}/content"
        try:
            async with self._session.get(self._url(path), headers=self._headers) as r:
                if r.status != 200:
                    raise ModelError(
                        f"GET {path}: HTTP {r.status}", retryable=is_retryable_status(r.status)
                    )
                rest = b""
                async for chunk in r.content.iter_chunked(READ_CHUNK):
                    parts = (rest + chunk).split(b"\n")
                    rest = parts.pop()
                    for part in parts:
                        if part:
                            yield part
                if rest:
                    yield rest
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ModelError(f"GET {path}: {exc!r}", retryable=True) from exc
