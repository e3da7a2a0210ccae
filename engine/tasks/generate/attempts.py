"""A row's generations as the journal holds them: one record per reply, and its replay. Pure.

Every reply is journaled when it lands, valid or not: a resumed run asks again
for neither a valid generation nor an invalid reply already counted against
``max_invalid``. Record (besides the writer's emits)::

    {"k": "gg", "l": line, "s": slot, "a": attempt, "c": text, "p": prompt_tokens,
     "o": completion_tokens, "f": finish_reason, "e": why the reply is invalid, or null,
     "r": the reasoning trace, "n": reasoning tokens}   # r and n only when there are any

``c`` is the answer only: a reasoning model's trace is ``r``.

``s`` is the generation (0-based, its place in ``generations``), ``a`` the
request for it (0 first, then one more after each invalid reply).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from engine.tasks.base import Records

ATTEMPT = "gg"


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


def attempt_record(line: int, attempt: Attempt) -> dict[str, Any]:
    record: dict[str, Any] = {
        "k": ATTEMPT,
        "l": line,
        "s": attempt.slot,
        "a": attempt.number,
        "c": attempt.content,
        "p": attempt.prompt_tokens,
        "o": attempt.completion_tokens,
        "f": attempt.finish_reason,
        "e": attempt.error,
    }
    if attempt.trace is not None:
        record["r"] = attempt.trace
    if attempt.reasoning_tokens:
        record["n"] = attempt.reasoning_tokens
    return record


def attempts_from(records: Records, slots: int) -> dict[int, list[Attempt]]:
    """Each generation's journaled replies in request order, for slots ``0..slots-1``.

    A record repeated (a reply journaled twice) counts once; the replies of a slot
    are kept up to the first gap in their numbers, so the next request's number is
    always the count of those kept.
    """
    by_slot: dict[int, dict[int, Attempt]] = {}
    for record in records:
        slot, number = record.get("s"), record.get("a")
        if record.get("k") != ATTEMPT or not isinstance(slot, int) or not isinstance(number, int):
            continue
        if not 0 <= slot < slots or isinstance(slot, bool) or isinstance(number, bool):
            continue
        error = record.get("e")
        reason = record.get("f")
        trace = record.get("r")
        by_slot.setdefault(slot, {}).setdefault(
            number,
            Attempt(
                slot=slot,
                number=number,
                content=str(record.get("c", "")),
                prompt_tokens=_count(record.get("p")),
                completion_tokens=_count(record.get("o")),
                finish_reason=reason if isinstance(reason, str) else None,
                error=None if error is None else str(error),
                trace=trace if isinstance(trace, str) else None,
                reasoning_tokens=_count(record.get("n")),
            ),
        )
    out: dict[int, list[Attempt]] = {}
    for slot, numbered in by_slot.items():
        kept: list[Attempt] = []
        while len(kept) in numbered:
            kept.append(numbered[len(kept)])
        out[slot] = kept
    return out


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


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
