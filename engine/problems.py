"""Config problems, collected instead of raised, so a user fixes a config in one pass.

Every section parser (the run's, each task's, the filters') adds to one
``Problems``; each problem names its key and the fix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# Sane ranges for the keys that size a run's queues and tasks: a value far past them is a
# typo (a cap of 10^9 once started 2 x 10^9 row workers before a request went out).
MOST_CONCURRENCY = 100_000  # models.<name>.max_concurrency, per replica
MOST_CONVERSATIONS = 1_000_000  # max_conversations: rows in flight
MOST_GENERATIONS = 1_000  # num_generations per row (generate, preference)


class Problems:
    """Collects problems while parsing, so every one is reported at once."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, key: str, message: str) -> None:
        self.items.append(f"{key}: {message}")

    def unknown(self, key: str, raw: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
        for name in raw:
            if name not in allowed:
                self.add(
                    f"{key}.{name}" if key else str(name),
                    f"unknown key; allowed keys here: {', '.join(allowed)}",
                )

    def mapping(self, key: str, value: Any) -> Mapping[str, Any] | None:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.add(key, f"must be a mapping of keys, got {type(value).__name__}")
            return None
        return value

    def positive_int(
        self, key: str, value: Any, default: int | None, *, most: int | None = None
    ) -> int | None:
        """A whole number >= 1, and at most ``most`` when given (a sane range: a value
        far past anything real is a typo, and would size queues and task counts)."""
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            self.add(key, f"must be a positive whole number, got {value!r}")
            return default
        if most is not None and value > most:
            self.add(key, f"must be from 1 to {most:,}, got {value:,}")
            return default
        return value

    def non_negative_int(self, key: str, value: Any, default: int) -> int:
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            self.add(key, f"must be a whole number >= 0, got {value!r}")
            return default
        return value

    def positive_float(self, key: str, value: Any, default: float) -> float:
        if value is None:
            return default
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value <= 0
        ):
            self.add(key, f"must be a positive number of seconds, got {value!r}")
            return default
        return float(value)

    def string(self, key: str, value: Any, *, required: bool, fix: str) -> str | None:
        if value is None:
            if required:
                self.add(key, f"missing; {fix}")
            return None
        if not isinstance(value, str) or not value.strip():
            self.add(key, f"must be a non-empty string; {fix}")
            return None
        return value

    def section(
        self, key: str, raw: Any, allowed: tuple[str, ...], example: str
    ) -> Mapping[str, Any] | None:
        """A required section of known keys; None (with a problem) when it is missing or
        not a mapping. ``example`` shows how to write it."""
        if raw is None:
            self.add(key, f"missing; add {key}: {example}")
            return None
        body = self.mapping(key, raw)
        if body is not None:
            self.unknown(key, body, allowed)
        return body

    def model_ref(self, key: str, value: Any, models: Mapping[str, Any]) -> str | None:
        """A model name that must be defined under ``models:``."""
        name = self.string(key, value, required=True, fix="name one of the models under models:")
        if name is not None and models and name not in models:
            known = ", ".join(sorted(models)) or "none"
            self.add(key, f"model {name!r} is not defined under models: (defined: {known})")
        return name
