"""Tasks as plug-ins: each subpackage of ``engine.tasks`` that exports ``KIND`` is one.

``task:`` in a config names one (``distill``, ``preference``, ``generate``); see
``engine.tasks.base`` for what a task provides. A task defined outside this
package is added with :func:`register`.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from typing import Any

from engine.tasks.base import TaskKind

_REGISTERED: dict[str, TaskKind[Any]] = {}


def register(kind: TaskKind[Any]) -> TaskKind[Any]:
    """Add a task defined outside this package (``task: <kind.name>`` then runs it).

    A name already taken by another task is a ValueError; registering the same kind
    again is fine.
    """
    taken = _REGISTERED.get(kind.name)
    if taken is None and kind.name in _package_names():
        raise ValueError(f"task {kind.name!r} is already a built-in task; choose another name")
    if taken is not None and taken is not kind:
        raise ValueError(f"task {kind.name!r} is already registered; choose another name")
    _REGISTERED[kind.name] = kind
    return kind


def names() -> tuple[str, ...]:
    """Every task's name: the subpackages of this package, none of them imported (a run
    imports only its own task, and so only what that task needs: Jinja2, jsonschema),
    and the registered tasks."""
    return tuple(sorted({*_package_names(), *_REGISTERED}))


@functools.cache
def _package_names() -> tuple[str, ...]:
    return tuple(m.name for m in pkgutil.iter_modules(__path__) if m.ispkg)


def kind_of(name: str) -> TaskKind[Any]:
    """The task called ``name`` (registered, or its subpackage's ``KIND``); KeyError when
    there is none."""
    registered = _REGISTERED.get(name)
    return registered if registered is not None else _built_in(name)


@functools.cache
def _built_in(name: str) -> TaskKind[Any]:
    if name not in _package_names():
        raise KeyError(name)
    kind = getattr(importlib.import_module(f"{__name__}.{name}"), "KIND", None)
    if not isinstance(kind, TaskKind) or kind.name != name:
        raise KeyError(name)
    return kind


def registry() -> dict[str, TaskKind[Any]]:
    """Every task, by name (imports every built-in one)."""
    kinds: dict[str, TaskKind[Any]] = dict(_REGISTERED)
    for name in _package_names():
        try:
            kinds[name] = kind_of(name)
        except KeyError:
            continue
    return kinds
