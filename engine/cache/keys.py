"""A request's key in the reply store, and what the store keeps of a reply. Pure."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import orjson


def request_key(
    model: str,
    params: Mapping[str, Any],
    messages: Sequence[Mapping[str, Any]],
    generation: int | str = 0,
) -> bytes:
    """The cache key of one request: the sha256 digest (32 bytes) of ``model`` (the name sent),
    ``params`` (every request field besides messages: sampling parameters,
    ``response_format``, ``seed``), ``messages`` as sent and ``generation`` (which of
    several same requests of one row this is; 0 for the first). Pure."""
    body = orjson.dumps(
        {"model": model, "params": params, "messages": messages, "generation": generation},
        option=orjson.OPT_SORT_KEYS,
    )
    return hashlib.sha256(body).digest()


def stored_reply(
    text: str,
    finish_reason: str | None,
    prompt_tokens: int,
    completion_tokens: int,
    reasoning_tokens: int,
    trace: str | None,
    cached_tokens: int = 0,
) -> bytearray:
    """What the store keeps of a reply (its usage too: a hit shows what it saved), as
    JSON: a JSON object of ``c`` (the text), ``f``, ``p``, ``o``, and ``n``, ``r``
    (the trace), ``ct`` where they are set. Held until committed, as a bytearray: a
    copy of its own size (``engine.jsonbytes`` says why), which the store's sqlite3
    binds as it is."""
    value: dict[str, Any] = {
        "c": text,
        "f": finish_reason,
        "p": prompt_tokens,
        "o": completion_tokens,
    }
    if reasoning_tokens:
        value["n"] = reasoning_tokens
    if trace is not None:
        value["r"] = trace
    if cached_tokens:
        value["ct"] = cached_tokens
    return bytearray(orjson.dumps(value))
