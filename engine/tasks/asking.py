"""What ``Context.ask`` journals: one record per reply, found again by its key. Pure.

A task names each reply it asks for by a *key*, stable across runs: the context
journals the reply under it before handing it back, and on resume answers the
same key from the journal instead of asking again. The built-in keys keep the
record kinds older checkpoints hold, so those resume exactly::

    Turn(i)           {"k": "t",  "l", "i", "c", "p", "o", "f"}        distill
    Try(s, a)         {"k": "gg", "l", "s", "a", "c", "p", "o", "f", "e"}  generate
    Sample(s, where)  {"k": "g",  "l", "s", "c", "p", "o", "f"}        preference
                      {"k": "ge", "l", "s", "e"}  (the generation failed for good)
    Rating(a)         {"k": "r",  "l", "a", "c", "p", "o"}  (+ "x": true when cut off)

and any other key, a string of the task's own::

    "<key>"           {"k": "a",  "l", "key", "c", "p", "o", "f"}

Every reply record adds ``"r"`` (its reasoning trace, except a rating's) and
``"n"`` (reasoning tokens) when it has them. The replies a row is finished with
are journaled as the row instead (engine.checkpoint.journal's ``v`` record): the
row holds their text.

A raw reply (``RowContext.send``: a body sent as it is, the reply kept whole) is
its own kind, under a string key of the task's::

    "<key>"           {"k": "w",  "l", "key", "s", "b", "p", "o"}   (status, body)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

TURN, TRY, SAMPLE, SAMPLE_FAILED, RATING, OWN = "t", "gg", "g", "ge", "r", "a"
RAW = "w"  # never an emit kind of the journal (o, x, q): replay tells them apart


@dataclass(frozen=True, slots=True)
class Turn:
    """A distillation's reply to turn ``index``."""

    index: int
    role: ClassVar[str] = ""

    @property
    def where(self) -> str:
        return f"turn {self.index}"


# A turn's key is asked for with every distillation reply, and a frozen dataclass
# costs a microsecond to make: the first turns' are made once.
_TURN_KEYS = tuple(Turn(i) for i in range(64))


def turn_key(index: int) -> Turn:
    """``Turn(index)``."""
    return _TURN_KEYS[index] if index < len(_TURN_KEYS) else Turn(index)


@dataclass(frozen=True, slots=True)
class Try:
    """Request ``number`` (0 first, one more per invalid reply) for generation ``slot``."""

    slot: int
    number: int
    role: ClassVar[str] = ""

    @property
    def where(self) -> str:
        return f"reply {self.number}"


@dataclass(frozen=True, slots=True)
class Sample:
    """Generation ``slot`` of a pool of generators; a failure of it is journaled too (a
    cut-off or refused generation is never asked for again). ``where`` names it in errors."""

    slot: int
    where: str = field(default="", compare=False)
    role: ClassVar[str] = ""


@dataclass(frozen=True, slots=True)
class Rating:
    """Judge reply ``number`` of a row."""

    number: int
    role: ClassVar[str] = " (the judge)"

    @property
    def where(self) -> str:
        return f"judge reply {self.number}"


Key = Turn | Try | Sample | Rating | str


# Not frozen: one is made per reply, and a frozen dataclass's __init__ costs several
# times as much (object.__setattr__ per field). Nothing changes one after it is made.
@dataclass(slots=True)
class Answer:
    """One reply as a task sees it: the answer, never the trace, in ``text``."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    trace: str | None = None
    reasoning_tokens: int = 0
    error: str | None = None  # why the task's check refused the text (None: usable)
    replica: int | None = None  # which server answered; None for a journaled reply
    cut: bool = False  # a rating journaled as cut off (its trace is not kept)

    @property
    def cut_off(self) -> bool:
        """Cut off by max_tokens while reasoning: a trace and no answer."""
        if self.cut:
            return True
        return not self.text and self.finish_reason == "length" and self.trace is not None


@dataclass(frozen=True, slots=True)
class RawAnswer:
    """One raw reply as a task sees it: the server's status and its body, parsed."""

    status: int
    body: dict[str, Any]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    replica: int | None = None  # which server answered; None for a journaled reply


def raw_slot(key: str) -> tuple[str, Any]:
    """Where a raw reply's record sits in a row's replayed records."""
    return RAW, key


def raw_record(line: int, key: str, answer: RawAnswer) -> dict[str, Any]:
    """The journal record of a raw reply (the module docstring's layout)."""
    return {
        "k": RAW,
        "l": line,
        "key": key,
        "s": answer.status,
        "b": answer.body,
        "p": answer.prompt_tokens,
        "o": answer.completion_tokens,
    }


def raw_answer_of(record: dict[str, Any]) -> RawAnswer:
    """A journaled raw reply, as it was handed back when it landed."""
    status, body = record.get("s"), record.get("b")
    return RawAnswer(
        status=status if isinstance(status, int) and not isinstance(status, bool) else 200,
        body=body if isinstance(body, dict) else {},
        prompt_tokens=_count(record.get("p")),
        completion_tokens=_count(record.get("o")),
    )


def slot_of(key: Key) -> tuple[str, Any]:
    """Where a key's reply sits in a row's replayed records."""
    if isinstance(key, Turn):
        return TURN, key.index
    if isinstance(key, Try):
        return TRY, (key.slot, key.number)
    if isinstance(key, Sample):
        return SAMPLE, key.slot
    if isinstance(key, Rating):
        return RATING, key.number
    return OWN, key


def generation_of(key: Key) -> int | str:
    """Which of a row's same requests ``key`` asks for (the reply cache's
    ``request_key`` generation): a sample's slot, a try's number within its slot, a
    rating's number; a turn is told apart by its history, a task's own key by its
    name. Stable across runs."""
    if isinstance(key, Turn):
        return 0
    if isinstance(key, Try):
        return f"{key.slot}.{key.number}"
    if isinstance(key, Sample):
        return key.slot
    if isinstance(key, Rating):
        return key.number
    return key


def index(records: Iterable[dict[str, Any]]) -> dict[tuple[str, Any], dict[str, Any]]:
    """A row's journaled replies by slot; the first of a repeated record wins.

    Turns, and each generation's tries, are kept up to their first gap: a reply
    after a lost one was asked for with the lost one in its history (or counted
    after it), so it is asked for again too.
    """
    found: dict[tuple[str, Any], dict[str, Any]] = {}
    for record in records:
        slot = _slot_of_record(record)
        if slot is not None:
            found.setdefault(slot, record)
    for kind, at in list(found):
        before: list[tuple[str, Any]]
        if kind == TURN:
            before = [(TURN, i) for i in range(at)]
        elif kind == TRY:
            before = [(TRY, (at[0], n)) for n in range(at[1])]
        else:
            continue
        if not all(b in found for b in before):
            del found[kind, at]
    return found


def _slot_of_record(record: dict[str, Any]) -> tuple[str, Any] | None:
    kind = record.get("k")
    if kind == TURN and _is_int(record.get("i")):
        return TURN, record["i"]
    if kind == TRY and _is_int(record.get("s")) and _is_int(record.get("a")):
        return TRY, (record["s"], record["a"])
    if kind in (SAMPLE, SAMPLE_FAILED) and _is_int(record.get("s")):
        return SAMPLE, record["s"]
    if kind == RATING and _is_int(record.get("a")):
        return RATING, record["a"]
    if kind == OWN and isinstance(record.get("key"), str):
        return OWN, record["key"]
    if kind == RAW and isinstance(record.get("key"), str) and isinstance(record.get("b"), dict):
        return RAW, record["key"]
    return None


def reply_record(line: int, key: Key, answer: Answer) -> dict[str, Any]:
    """The journal record of a reply to ``key`` (the module docstring's layouts)."""
    record: dict[str, Any]
    if type(key) is Turn:  # a distillation's turn, the most common reply by far
        record = {
            "k": TURN,
            "l": line,
            "i": key.index,
            "c": answer.text,
            "p": answer.prompt_tokens,
            "o": answer.completion_tokens,
            "f": answer.finish_reason,
        }
        if answer.trace is not None:
            record["r"] = answer.trace
        if answer.reasoning_tokens:
            record["n"] = answer.reasoning_tokens
        return record
    kind, at = slot_of(key)
    record = {"k": kind, "l": line}
    if isinstance(key, Turn):
        record["i"] = key.index
    elif isinstance(key, Try):
        record["s"], record["a"] = key.slot, key.number
    elif isinstance(key, Sample):
        record["s"] = key.slot
    elif isinstance(key, Rating):
        record["a"] = key.number
    else:
        record["key"] = at
    record.update(c=answer.text, p=answer.prompt_tokens, o=answer.completion_tokens)
    if not isinstance(key, Rating):
        record["f"] = answer.finish_reason
    if isinstance(key, Try):
        record["e"] = answer.error
    if answer.trace is not None and not isinstance(key, Rating):
        record["r"] = answer.trace
    if answer.reasoning_tokens:
        record["n"] = answer.reasoning_tokens
    if isinstance(key, Rating) and answer.cut_off:
        record["x"] = True
    return record


def failure_record(line: int, key: Sample, error: str) -> dict[str, Any]:
    return {"k": SAMPLE_FAILED, "l": line, "s": key.slot, "e": error}


def failure_of(record: dict[str, Any]) -> str | None:
    """The error a record journals a failed generation with, if it does."""
    return str(record.get("e")) if record.get("k") == SAMPLE_FAILED else None


def answer_of(record: dict[str, Any]) -> Answer:
    """A journaled reply, as it was handed back when it landed."""
    reason, trace, error = record.get("f"), record.get("r"), record.get("e")
    return Answer(
        text=str(record.get("c", "")),
        prompt_tokens=_count(record.get("p")),
        completion_tokens=_count(record.get("o")),
        finish_reason=reason if isinstance(reason, str) else None,
        trace=trace if isinstance(trace, str) else None,
        reasoning_tokens=_count(record.get("n")),
        error=None if error is None else str(error),
        cut=record.get("k") == RATING and record.get("x") is True,
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
