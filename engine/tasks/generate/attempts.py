"""A row's generations: one ``Attempt`` per reply, and the rules over them. Pure.

Every reply is asked for under ``Try(slot, number)`` and so journaled when it
lands, valid or not (``engine.tasks.asking``): a resumed run asks again for
neither a valid generation nor an invalid reply already counted against
``max_invalid``. ``slot`` is the generation (0-based, its place in
``generations``), ``number`` the request for it (0 first, then one more after
each invalid reply).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Attempt:
    """One reply for one generation: its text, its cost, and why it was refused, if it was."""

    slot: int
    number: int
    content: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None  # None: a valid reply
    trace: str | None = None  # the reasoning trace, when the reply had one
    reasoning_tokens: int = 0

    @property
    def valid(self) -> bool:
        return self.error is None

    @property
    def cut_off(self) -> bool:
        """Cut off by max_tokens while reasoning: a trace and no answer."""
        return not self.content and self.finish_reason == "length" and self.trace is not None


def first_valid(attempts: Iterable[Attempt]) -> Attempt | None:
    return next((a for a in attempts if a.valid), None)


def invalid_count(attempts: Iterable[Attempt]) -> int:
    return sum(1 for a in attempts if not a.valid)


def seed_for(seed: Any, slot: int, number: int, slots: int) -> int | None:
    """The seed of request ``number`` for generation ``slot`` of ``slots``, or None
    when the model's params hold no integer seed.

    Generation j's first request gets seed + j; each re-request after an invalid
    reply moves on by ``slots``, so no two requests of a row share a seed (the same
    seed would give the same invalid reply again).
    """
    if not _is_int(seed):
        return None
    base: int = seed
    return base + number * slots + slot


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
