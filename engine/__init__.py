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
from engine.estimate import Estimate, ModelEstimate, aestimate, estimate
from engine.stats import Summary

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

# Tracebacks and docs show the public path of these names.
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("engine."):
        _obj.__module__ = "engine"
del _name, _obj
