"""Prompt templates: Jinja2 in a sandbox, the row's columns as its variables. Pure.

Every template a task runs (``generate.template``, ``preference.judge_template``)
is compiled in the one environment here.

A template comes from a config, but it is still code run on every row, so it
runs in Jinja2's immutable sandbox: no attributes starting with ``_`` (no
``''.__class__.__mro__`` walk to ``os``), no mutation of the row, bounded
``range``. Undefined names are errors, never empty text (``StrictUndefined``):
a row that lacks a column the template uses fails alone, its error naming the
column, instead of sending a prompt with a hole in it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from jinja2 import StrictUndefined, Template, TemplateRuntimeError, TemplateSyntaxError
from jinja2.exceptions import UndefinedError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import missing


class BadTemplate(ValueError):
    """A template that cannot be used, saying what to fix; ``line`` is the template's own
    line (1-based) where one is to blame."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line


class RenderError(ValueError):
    """Why a template could not be rendered for one row (the row fails, not the run)."""


class MissingColumn(UndefinedError):
    """A top-level name the template uses that the row does not have."""


class _Strict(StrictUndefined):
    """StrictUndefined whose error for a missing top-level name names it as a column.

    Top-level names are the row's columns; an undefined attribute or item of a
    column's value keeps Jinja2's own message ("'dict object' has no attribute 'x'").
    """

    __slots__ = ()

    def __init__(
        self,
        hint: str | None = None,
        obj: Any = missing,
        name: str | None = None,
        exc: type[TemplateRuntimeError] = UndefinedError,
    ) -> None:
        if hint is None and obj is missing and exc is UndefinedError:
            hint = f"the template uses {name!r}, which this row does not have"
            exc = MissingColumn
        super().__init__(hint, obj, name, exc)


def _finalize(value: Any) -> Any:
    """What ``{{ value }}`` prints: an integer past 64 bits (read as an orjson.Fragment
    of its digits, engine.input.reader) prints its digits."""
    return orjson.dumps(value).decode() if isinstance(value, orjson.Fragment) else value


# One environment for every template: it holds no state a row could change.
ENV = ImmutableSandboxedEnvironment(undefined=_Strict, autoescape=False, finalize=_finalize)


def compile_template(text: str) -> Template:
    """The compiled template; raises BadTemplate naming the line that does not compile."""
    try:
        return ENV.from_string(text)
    except TemplateSyntaxError as exc:
        raise BadTemplate(f"line {exc.lineno}: {exc.message or exc}", exc.lineno) from exc


def render(template: Template, row: Mapping[str, Any]) -> str:
    """The template filled with ``row``'s columns; raises RenderError saying why not."""
    try:
        return template.render(dict(row))
    except MissingColumn as exc:
        raise RenderError(str(exc)) from exc
    except Exception as exc:
        # A template is user code run on user data: whatever it raises (a sandbox
        # refusal, a type error in an expression) fails this row only.
        raise RenderError(f"the template failed on this row: {exc}") from exc
