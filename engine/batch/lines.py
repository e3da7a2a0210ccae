"""What goes into a batch file and what comes back, as values. Pure: no I/O.

A line's ``custom_id`` is ``<row line>.<reply key>.<attempt>``: the same in every
process, so results map back to their rows after a restart, and an attempt sent
again after a failure is a new id (unique in any file).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from engine import jsonbytes
from engine.http.retry import is_retryable_status

CHAT = "/v1/chat/completions"
REQUEUED = ("batch_expired", "batch_cancelled")  # the line was never tried


def request_base(line: int, key: object) -> str:
    """The attempt-free part of a custom id: the row's line and the reply's key."""
    if isinstance(key, str):
        return f"{line}.a:{key}"
    fields = getattr(key, "__slots__", ())
    values = ".".join(str(getattr(key, name)) for name in fields if name != "where")
    return f"{line}.{type(key).__name__.lower()}{values}"


def custom_id(base: str, attempt: int) -> str:
    return f"{base}.{attempt}"


def split_id(cid: str) -> tuple[str, int]:
    """``(base, attempt)`` of a custom id."""
    base, _, attempt = cid.rpartition(".")
    return base, int(attempt)


def input_line(cid: str, body: Mapping[str, Any]) -> bytes:
    """One line of a batch input file (with its newline)."""
    return orjson.dumps({"custom_id": cid, "method": "POST", "url": CHAT, "body": body}) + b"\n"


@dataclass(frozen=True, slots=True)
class Result:
    """One line read back: the completion's body, or why it failed."""

    custom_id: str
    body: bytes | None  # the chat.completion, as JSON, when status 200
    error: str = ""
    retryable: bool = True
    charged: bool = True  # counts against the row's retries (an expiry does not)


def read_result(raw: bytes) -> Result | None:
    """One output- or error-file line; None for a line that is not one (blank, torn)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("custom_id"), str):
        return None
    cid = data["custom_id"]
    response = data.get("response")
    if isinstance(response, dict):
        status = response.get("status_code")
        body = response.get("body")
        if status == 200 and isinstance(body, dict):
            return Result(cid, jsonbytes.dumps(body))  # held until its row takes it
        if isinstance(status, int):
            message = _message(body) or f"HTTP {status}"
            return Result(
                cid, None, f"HTTP {status}: {message}", retryable=is_retryable_status(status)
            )
    error = data.get("error")
    if isinstance(error, dict):
        code = str(error.get("code") or "error")
        message = str(error.get("message") or "")
        return Result(cid, None, f"{code}: {message}", charged=code not in REQUEUED)
    return Result(cid, None, "a result line with neither response nor error")


def left_over(cid: str, batch_id: str, status: str) -> Result:
    """A line its batch ended without answering (expired, cancelled, failed)."""
    return Result(cid, None, f"batch {batch_id} {status} before answering it", charged=False)


def _message(body: object) -> str:
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            return str(error.get("message") or "")
    return ""


TERMINAL = frozenset({"completed", "expired", "cancelled", "failed"})
