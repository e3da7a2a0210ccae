"""The executors by name: the built-in ones, imported when first asked for, and any
registered at run time (``register``; a test registers one of its own).

engine.config asks it to parse the ``executor:`` section (each executor parses its own
keys), the CLI for the names ``--executor`` takes, and engine.executors.launch for the
class that runs a config.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from engine.problems import Problems

if TYPE_CHECKING:
    from engine.executors.base import Executor

# name -> "module:class": imported only when a run names it (or a key must be checked).
BUILTIN = {
    "local": "engine.executors.local:LocalExecutor",
    "processes": "engine.executors.processes:ProcessesExecutor",
    "ray": "engine.executors.ray_run:RayExecutor",
}
_registered: dict[str, type[Executor]] = {}


def register(cls: type[Executor]) -> type[Executor]:
    """Make ``cls`` the executor of ``executor.kind: <cls.kind>`` (usable as a decorator)."""
    _registered[cls.kind] = cls
    return cls


def unregister(kind: str) -> None:
    _registered.pop(kind, None)


def names() -> tuple[str, ...]:
    """Every executor's name, sorted."""
    return tuple(sorted({*BUILTIN, *_registered}))


def executor_class(kind: str) -> type[Executor]:
    """The executor named ``kind``; KeyError when there is none."""
    if kind in _registered:
        return _registered[kind]
    module, _, name = BUILTIN[kind].partition(":")
    cls: type[Executor] = getattr(importlib.import_module(module), name)
    return cls


def parse_section(p: Problems, body: Mapping[str, Any]) -> tuple[str, Any]:
    """``executor:`` (a mapping): its kind and the options that kind's executor parsed.

    A key is known when any executor knows it (a config may keep ray's address while
    ``--executor local`` runs it); the chosen one checks its own.
    """
    if set(body) - {"kind"}:  # only then import every executor to learn its keys
        known = {"kind"}
        for kind in names():
            known.update(executor_class(kind).keys)
        p.unknown("executor", body, tuple(sorted(known)))
    kind = body.get("kind", "local")
    if kind not in names():
        p.add("executor.kind", f"must be one of {', '.join(names())}, got {kind!r}")
        kind = "local"
    return kind, executor_class(kind).parse(p, body)
