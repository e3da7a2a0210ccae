"""Turnstile: a streaming, checkpointed engine for LLM-generated training data.

From Python::

    import engine

    summary = engine.run("run.yaml")              # or a dict shaped like the YAML
    print(summary.rows_ok, summary.rows_failed, summary.output)
    engine.export("run.yaml", format="parquet", to="out.parquet")
    guess = engine.estimate("run.yaml", sample=20)   # runs 20 rows, projects the rest
    print(guess.usd, guess.usd_low, guess.usd_high, guess.time_s)

``await engine.arun(config)`` does the same inside a running event loop. Neither
installs signal handlers or exits the process: errors are raised as the classes
below (``ConfigError.problems`` lists every problem of a config), and a run that
was stopped resumes where it stopped on the next call with the same config.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from engine._api import arun, export, run
from engine.errors import (
    CheckpointError,
    ConfigError,
    ExecutorError,
    ExportError,
    InputError,
    LocalServerError,
    ModelDown,
    ModelError,
    TurnstileError,
)
from engine.stats import Summary

if TYPE_CHECKING:
    from engine.estimate import Estimate, ModelEstimate, aestimate, estimate

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "Estimate",
    "ExecutorError",
    "ExportError",
    "InputError",
    "LocalServerError",
    "ModelDown",
    "ModelError",
    "ModelEstimate",
    "Summary",
    "TurnstileError",
    "aestimate",
    "arun",
    "estimate",
    "export",
    "run",
]

# engine.estimate's names are imported when first used: a run never needs them.
_LAZY = frozenset({"Estimate", "ModelEstimate", "aestimate", "estimate"})


def _public(obj: Any) -> Any:
    """``obj`` with its public path: tracebacks and docs show ``engine.NAME``."""
    if getattr(obj, "__module__", "").startswith("engine."):
        obj.__module__ = "engine"
    return obj


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    module = importlib.import_module("engine.estimate")  # binds engine.estimate: _Package

    for lazy in _LAZY:
        setattr(sys.modules[__name__], lazy, _public(getattr(module, lazy)))
    return globals()[name]


class _Package(types.ModuleType):
    """The package, keeping ``engine.estimate`` the function: importing the submodule of
    that name binds the module here (as it did when the function was imported eagerly,
    after it), so the function is bound in its place."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "estimate" and isinstance(value, types.ModuleType):
            value = _public(value.estimate)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
for _name in __all__:
    if _name not in _LAZY:
        _public(globals()[_name])
del _name
