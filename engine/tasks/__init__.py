"""Tasks as plug-ins: each subpackage of ``engine.tasks`` that exports ``KIND`` is one.

``task:`` in a config names one (``distill``, ``preference``, ``generate``); see
``engine.tasks.base`` for what a task provides.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil

from engine.tasks.base import TaskKind


@functools.cache
def names() -> tuple[str, ...]:
    """Every task's name: the subpackages of this package, none of them imported (a run
    imports only its own task, and so only what that task needs: Jinja2, jsonschema)."""
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if m.ispkg))


@functools.cache
def kind_of(name: str) -> TaskKind:
    """The task called ``name`` (its subpackage's ``KIND``); KeyError when there is none."""
    if name not in names():
        raise KeyError(name)
    kind = getattr(importlib.import_module(f"{__name__}.{name}"), "KIND", None)
    if not isinstance(kind, TaskKind) or kind.name != name:
        raise KeyError(name)
    return kind


def registry() -> dict[str, TaskKind]:
    """Every task, by name (imports them all)."""
    kinds: dict[str, TaskKind] = {}
    for name in names():
        try:
            kinds[name] = kind_of(name)
        except KeyError:
            continue
    return kinds
