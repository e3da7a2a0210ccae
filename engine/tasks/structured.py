"""Structured replies: the JSON Schema a reply must fit, as requested and as checked. Pure.

Shared by every task that asks for JSON: ``generate`` (its ``json_schema``) and the
preference judge (``judge_format: json``).

The schema goes to the server as OpenAI's ``response_format`` (servers with
structured output constrain decoding to it), and every reply is still parsed
and validated here: many servers ignore ``response_format`` or honour only
part of a schema, and a reply cut off by ``max_tokens`` is never valid JSON.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from jsonschema.exceptions import SchemaError, ValidationError, best_match
from jsonschema.validators import validator_for

_SNIPPET_CHARS = 80


def plain_schema(schema: Mapping[str, Any]) -> dict[str, Any]:
    """The schema as plain JSON values (a YAML mapping may hold keys JSON cannot);
    raises TypeError when it cannot be one."""
    plain: dict[str, Any] = orjson.loads(orjson.dumps(schema))
    return plain


def schema_problem(schema: dict[str, Any]) -> str | None:
    """Why ``schema`` is not a valid JSON Schema (of the draft its ``$schema`` names,
    else the latest), or None when it is."""
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        where = _path(exc)
        return f"{exc.message}{f' (at {where})' if where else ''}"
    return None


def response_format(schema: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The request field asking an OpenAI-compatible server for replies that fit ``schema``."""
    return {
        "type": "json_schema",
        "json_schema": {"name": name, "schema": dict(schema), "strict": True},
    }


class ReplyChecker:
    """Parses a reply as JSON and validates it against one schema (checked beforehand).

    ``label`` names the schema in the error, e.g. ``generate.json_schema``."""

    def __init__(self, schema: Mapping[str, Any], label: str) -> None:
        self._validator = validator_for(schema)(schema)
        self._label = label

    def check(self, text: str) -> tuple[Any, str | None]:
        """``(value, None)`` for a reply that fits, ``(None, why not)`` otherwise."""
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            snippet = text[:_SNIPPET_CHARS] + ("..." if len(text) > _SNIPPET_CHARS else "")
            return None, f"the reply is not JSON ({exc}): {snippet!r}"
        error = best_match(self._validator.iter_errors(value))
        if error is None:
            return value, None
        where = _path(error)
        return None, (
            f"the reply does not fit {self._label}: {error.message}"
            f"{f' (at {where})' if where else ''}"
        )


def _path(error: SchemaError | ValidationError) -> str:
    """Where in the document the error is, as a JSON path; empty at the root."""
    path = error.json_path
    return "" if path == "$" else path
