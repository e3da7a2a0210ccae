"""A request's key in the reply store, and what the store keeps of a reply. Pure."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from engine.tasks.asking import Key


def request_key(
    model: str,
    params: Mapping[str, Any],
    messages: Sequence[Mapping[str, Any]],
    generation: int | str = 0,
) -> str:
    """The cache key of one request: sha256 (hex) of ``model`` (the name sent),
    ``params`` (every request field besides messages: sampling parameters,
    ``response_format``, ``seed``), ``messages`` as sent and ``generation`` (which of
    several same requests of one row this is; 0 for the first). Pure."""
    body = orjson.dumps(
        {"model": model, "params": params, "messages": messages, "generation": generation},
        option=orjson.OPT_SORT_KEYS,
    )
    return hashlib.sha256(body).hexdigest()


def generation_of(key: Key) -> int | str:
    """Which of a row's same requests ``key`` asks for (``request_key``'s generation):
    a sample's slot, a try's number within its slot, a rating's number; a turn is told
    apart by its history, a task's own key by its name. Stable across runs."""
    # Here, not at the top: engine.tasks imports this module (through Context.ask).
    from engine.tasks.asking import Rating, Sample, Try, Turn

    if isinstance(key, Turn):
        return 0
    if isinstance(key, Try):
        return f"{key.slot}.{key.number}"
    if isinstance(key, Sample):
        return key.slot
    if isinstance(key, Rating):
        return key.number
    return key


def reply_value(
    text: str,
    finish_reason: str | None,
    prompt_tokens: int,
    completion_tokens: int,
    reasoning_tokens: int,
    trace: str | None,
    cached_tokens: int = 0,
) -> dict[str, Any]:
    """What the store keeps of a reply (its usage too: a hit shows what it saved)."""
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
    return value
