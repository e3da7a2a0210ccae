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
def registry() -> dict[str, TaskKind]:
    """Every task, by name, found among this package's subpackages."""
    kinds: dict[str, TaskKind] = {}
    for module in pkgutil.iter_modules(__path__):
        if not module.ispkg:
            continue
        kind = getattr(importlib.import_module(f"{__name__}.{module.name}"), "KIND", None)
        if isinstance(kind, TaskKind):
            kinds[kind.name] = kind
    return dict(sorted(kinds.items()))


def kind_of(name: str) -> TaskKind:
    """The task called ``name``; KeyError when there is none."""
    return registry()[name]
