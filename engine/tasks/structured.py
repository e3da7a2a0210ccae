"""Structured replies: the JSON Schema a reply must fit, as requested and as checked. Pure.

Shared by every task that asks for JSON: ``generate`` (its ``json_schema``) and the
preference judge (``judge_format: json``).

The schema goes to the server as OpenAI's ``response_format`` (servers with
structured output constrain decoding to it), and every reply is still parsed
and validated here: many servers ignore ``response_format`` or honour only
part of a schema, and a reply cut off by ``max_tokens`` is never valid JSON.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import orjson
from jsonschema.exceptions import SchemaError, ValidationError, best_match
from jsonschema.validators import validator_for
from referencing import Registry, Resource
from referencing.exceptions import NoSuchResource, Unresolvable
from referencing.jsonschema import DRAFT202012, specification_with

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


def _refuse(uri: str) -> Resource[Any]:
    """The registry's retrieve: a reference is resolved inside the schema or not at all.

    jsonschema's own default fetches an http ``$ref`` on every validation (the run
    blocks on it) and reads ``file://`` ones: neither is a thing a reply check does.
    """
    raise NoSuchResource(uri)


# Every schema's validator resolves through this: nothing outside the schema is fetched.
_INSIDE_ONLY: Registry[Any] = Registry(retrieve=_refuse)  # type: ignore[call-arg]  # attrs


def reference_problem(schema: dict[str, Any]) -> str | None:
    """Why one of the schema's ``$ref`` cannot be resolved inside it (a URL or a file
    outside it, or a pointer to nowhere), or None when every one can."""
    cls = validator_for(schema)
    spec = specification_with(str(cls.META_SCHEMA.get("$schema", "")), default=DRAFT202012)
    root = spec.create_resource(schema)
    try:
        for resolver, ref in _references(_INSIDE_ONLY.resolver_with_root(root), root):
            try:
                resolver.lookup(ref)
            except Unresolvable:
                return (
                    f"$ref {ref!r} does not point inside the schema; references are resolved "
                    "only inside it (e.g. #/$defs/name), never fetched: copy what it refers "
                    "to under $defs and point at that"
                )
    except RecursionError:
        return "is nested too deeply to check its references; flatten it"
    return None


def _references(resolver: Any, resource: Resource[Any]) -> Iterator[tuple[Any, str]]:
    """Every ``$ref`` of the schema (as its draft sees subschemas), with the resolver of
    its place (base URI), depth first."""
    contents = resource.contents
    if isinstance(contents, Mapping):
        ref = contents.get("$ref")
        if isinstance(ref, str):
            yield resolver, ref
    for sub in resource.subresources():
        yield from _references(resolver.in_subresource(sub), sub)


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
        self._validator = validator_for(schema)(schema, registry=_INSIDE_ONLY)
        self._label = label

    def check(self, text: str) -> tuple[Any, str | None]:
        """``(value, None)`` for a reply that fits, ``(None, why not)`` otherwise."""
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            snippet = text[:_SNIPPET_CHARS] + ("..." if len(text) > _SNIPPET_CHARS else "")
            return None, f"the reply is not JSON ({exc}): {snippet!r}"
        try:
            error = best_match(self._validator.iter_errors(value))
        except Unresolvable as exc:  # refused at config time; never fetched here either
            return None, f"{self._label} refers outside itself ({exc}); fix the schema"
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
