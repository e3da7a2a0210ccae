"""OpenAI batch file lines: what an input line asks, what an output or error line says.

Pure functions (no loop, no server), but for :func:`duplicate_ids`, which reads the
input file before the run. The shapes are OpenAI's Batch API ones, which ``vllm
run-batch`` reads and writes too::

    input   {"custom_id", "method": "POST", "url", "body"}
    output  {"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error": null}
    error   {"id", "custom_id", "response": null, "error": {"code", "message"}, "line"}

``line`` (the 0-based input line, as every failed file of the engine counts it) is
Turnstile's addition to an error line.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from engine.errors import InputError, ModelError
from engine.tasks.asking import RawAnswer

# A batch line's url -> the path under the model's base_url (which ends in /v1).
URLS = {
    "/v1/chat/completions": "/chat/completions",
    "/v1/completions": "/completions",
    "/v1/embeddings": "/embeddings",
}
INVALID = "invalid_request"  # the error code of a line that cannot be sent
_CHUNK = 1 << 20
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class BatchLine:
    """A usable input line: who it is, where it goes (a path under base_url), what it sends."""

    custom_id: str
    url: str
    path: str
    body: dict[str, Any]


def parse_line(record: Mapping[str, Any]) -> BatchLine | str:
    """The line as a request, or what is wrong with it (a message naming the field)."""
    custom_id = record.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return "'custom_id' must be a non-empty string"
    method = record.get("method", "POST")
    if method != "POST":
        return f"'method' must be POST, got {method!r}"
    url = record.get("url")
    path = URLS.get(url) if isinstance(url, str) else None
    if path is None:
        return f"'url' must be one of {', '.join(URLS)}, got {url!r}"
    body = record.get("body")
    if not isinstance(body, dict):
        return "'body' must be a JSON object (the request)"
    assert isinstance(url, str)
    return BatchLine(custom_id, url, path, body)


def _digest(*parts: object) -> str:
    return hashlib.sha256(orjson.dumps(parts)).hexdigest()[:24]


def output_line(line: int, custom_id: str, answer: RawAnswer) -> dict[str, Any]:
    """A batch output line for the reply to input ``line`` (its ids derived from the
    line and ``custom_id``: a resumed run writes the same ones)."""
    return {
        "id": f"batch_req_{_digest(line, custom_id)}",
        "custom_id": custom_id,
        "response": {
            "status_code": answer.status,
            "request_id": f"req_{_digest(line, custom_id, 'request')}",
            "body": answer.body,
        },
        "error": None,
    }


def error_line(line: int, custom_id: object, code: str, message: str) -> dict[str, Any]:
    """A batch error-file line for input ``line``, which failed for good."""
    cid = custom_id if isinstance(custom_id, str) else None
    return {
        "id": f"batch_req_{_digest(line, cid)}",
        "custom_id": cid,
        "response": None,
        "error": {"code": code, "message": message},
        "line": line,
    }


def error_code(exc: ModelError) -> str:
    """The error-file code of a request that failed for good: its HTTP status where it
    had one (``http_400``), else ``request_failed`` (retries spent on timeouts, say)."""
    return f"http_{exc.status}" if exc.status else "request_failed"


def first_duplicate(ids: Iterable[tuple[int, object]]) -> tuple[str, int, int] | None:
    """The first ``custom_id`` given twice, with its two lines: ``(id, first, second)``."""
    seen: dict[str, int] = {}
    for line, custom_id in ids:
        if not isinstance(custom_id, str):
            continue
        first = seen.setdefault(custom_id, line)
        if first != line:
            return custom_id, first, line
    return None


def custom_ids(path: Path) -> Iterator[tuple[int, object]]:
    """(0-based line, its ``custom_id``) for each line of a JSONL file that has one
    (numbered as the input source numbers rows: blank lines count). Blocking."""
    line = 0
    rest = b""
    with path.open("rb") as f:
        first = True
        while True:
            data = f.read(_CHUNK)
            if first:
                data = data.removeprefix(_BOM)
                first = False
            if not data:
                break
            parts = (rest + data).split(b"\n")
            rest = parts.pop()
            for part in parts:
                yield line, _custom_id(part)
                line += 1
    if rest.strip():
        yield line, _custom_id(rest)


def _custom_id(raw: bytes) -> object:
    if b"custom_id" not in raw:
        return None
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None  # the row fails on its own when it is read
    return record.get("custom_id") if isinstance(record, dict) else None


def duplicate_ids(path: Path) -> None:
    """Raise InputError naming both lines when two lines of ``path`` share a
    ``custom_id`` (results are matched to requests by it). Blocking."""
    if not path.is_file():
        return  # the run reports a missing input itself
    found = first_duplicate(custom_ids(path))
    if found is not None:
        custom_id, first, second = found
        raise InputError(
            f"input {path}: lines {first} and {second} (0-based, as the failed file counts "
            f"them) both have custom_id {custom_id!r}; custom_id must be unique within a "
            "batch file: rename one"
        )
