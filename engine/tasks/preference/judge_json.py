"""JSON ratings: the schema a ``judge_format: json`` reply must fit, and its parser. Pure.

The schema goes to the judge as OpenAI's ``response_format`` (servers with
structured output constrain decoding to it), and every reply is still parsed
and validated here with ``jsonschema``: many servers ignore
``response_format``, and a reply cut off by ``max_tokens`` is never JSON.
"""

from __future__ import annotations

import functools
from typing import Any

from engine.tasks.preference.judge import RATINGS
from engine.tasks.structured import ReplyChecker, response_format


def ratings_schema(n: int) -> dict[str, Any]:
    """The JSON Schema of a reply rating ``n`` candidates: ``{"ratings": [{rating,
    rationale}, ...]}`` with exactly ``n`` entries, each rating one of 1..5.

    The ratings are an ``enum``, not a ``minimum``/``maximum`` pair: every
    structured-output backend constrains an enum, while support for numeric
    bounds varies between servers.
    Every object lists all its properties as required and allows no others, as
    OpenAI's strict mode demands.
    """
    entry = {
        "type": "object",
        "properties": {
            "rating": {"type": "integer", "enum": list(RATINGS)},
            "rationale": {"type": "string"},
        },
        "required": ["rating", "rationale"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {
            "ratings": {"type": "array", "items": entry, "minItems": n, "maxItems": n},
        },
        "required": ["ratings"],
        "additionalProperties": False,
    }


def ratings_response_format(n: int) -> dict[str, Any]:
    """The request field asking a server for a reply that fits :func:`ratings_schema`."""
    return response_format(ratings_schema(n), "ratings")


def parse_json_ratings(reply: str, n: int) -> tuple[list[int | None], list[str | None], str | None]:
    """Read a JSON judge reply: ratings, rationales, and why it is unusable (or None).

    A reply that is not JSON or does not fit :func:`ratings_schema` (another
    number of entries, a rating outside 1..5, a missing rationale) gives ``None``
    for every rating and rationale, and the third value says what is wrong:
    a reply that breaks the schema is a judge that ignored the format, not a
    partial answer. Never raises on a string.
    """
    if n <= 0:
        return [], [], None
    ratings: list[int | None] = [None] * n
    rationales: list[str | None] = [None] * n
    value, problem = _checker(n).check(reply if isinstance(reply, str) else repr(reply))
    if problem is not None:
        return ratings, rationales, problem
    for i, entry in enumerate(value["ratings"]):
        ratings[i] = int(entry["rating"])  # 3.0 is an integer to JSON Schema
        rationales[i] = entry["rationale"].strip() or None
    return ratings, rationales, None


@functools.lru_cache(maxsize=64)
def _checker(n: int) -> ReplyChecker:
    return ReplyChecker(ratings_schema(n), "the ratings schema")
