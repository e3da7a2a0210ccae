"""Pairwise judging: two answers at a time, in both orders, and a round robin. Pure.

With ``judge_format: pairwise`` the judge is shown two candidate answers to one
prompt, A then B, and answers ``{"winner": "A" | "B" | "tie", "rationale": "..."}``
under ``response_format`` (:func:`verdict_schema`). LLM judges favour whichever
answer they see first, so with ``pairwise.swap`` every pair is judged again with
the answers swapped, and only a verdict that survives the swap counts: one that
flips is an *order-dependent verdict* (a tie, or the row is dropped, as
``pairwise.on_disagree`` says).

The functions here take values and return values: :func:`judge_pair_messages`
(the built-in request), :func:`parse_verdict` (a reply to a winner), :func:`won_by`
(order correction: which candidate a positional verdict names), :func:`score`
(the round robin: points per candidate, the flips, the pair) and
:func:`flips_of` (the flip count of a row's judgements, for status and reports).
``engine.tasks.preference.task`` asks the judge; nothing here does I/O.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engine.tasks.structured import ReplyChecker, response_format

Message = dict[str, str]

A, B, TIE = "A", "B", "tie"
WINNERS = (A, B, TIE)
AB, BA = "ab", "ba"  # "ab": candidate a shown first (as A), "ba": b first
TIE_ON_DISAGREE, DROP_ON_DISAGREE = "tie", "drop"
ON_DISAGREE = (TIE_ON_DISAGREE, DROP_ON_DISAGREE)
ORDER_DEPENDENT = "order-dependent verdict"
VERDICT_TRIES = 2  # a reply that does not fit the schema is asked again once
# Points in the round robin, per verdict: a win, a tie. Integers, so a candidate's
# points read as its rating and the highest and lowest pick the pair.
WIN_POINTS, TIE_POINTS = 2, 1

_SYSTEM = (
    "You are an impartial judge. Compare two answers to the user's last message and "
    "decide which one is better: more helpful, correct, honest and on point. Do not let "
    "the order in which the answers appear, their length or the names of assistants "
    "influence you. Answer with one JSON object and nothing else: "
    '{"winner": "A" | "B" | "tie", "rationale": "<why, in one or two sentences>"}.'
)


def verdict_schema() -> dict[str, Any]:
    """The JSON Schema a pairwise verdict must fit (OpenAI strict mode's shape)."""
    return {
        "type": "object",
        "properties": {
            "winner": {"type": "string", "enum": list(WINNERS)},
            "rationale": {"type": "string"},
        },
        "required": ["winner", "rationale"],
        "additionalProperties": False,
    }


def verdict_response_format() -> dict[str, Any]:
    """The request field asking for a reply that fits :func:`verdict_schema`."""
    return response_format(verdict_schema(), "verdict")


def judge_pair_messages(prompt: Sequence[Message], first: str, second: str) -> list[Message]:
    """The built-in request: the conversation, then answer A (``first``) and B (``second``).

    Each answer sits between ``[The Start of Answer X]`` and ``[The End of Answer X]``
    lines (MT-Bench's layout), which the mock server reads back.
    """
    if not prompt or prompt[-1].get("role") != "user":
        raise ValueError("the prompt to judge must end with a user turn")
    turns = "\n\n".join(
        f"[{m.get('role', 'unknown').capitalize()}]\n{m.get('content', '')}" for m in prompt
    )
    user = (
        f"[The Start of the Conversation]\n{turns}\n[The End of the Conversation]\n\n"
        f"[The Start of Answer A]\n{first}\n[The End of Answer A]\n\n"
        f"[The Start of Answer B]\n{second}\n[The End of Answer B]\n\n"
        "Which answer to the user's last message is better? Reply with the JSON object."
    )
    return [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": user}]


@functools.cache
def _checker() -> ReplyChecker:
    return ReplyChecker(verdict_schema(), "the pairwise verdict schema")


def parse_verdict(reply: str) -> tuple[str | None, str | None, str | None]:
    """``(winner, rationale, None)`` for a reply that fits :func:`verdict_schema`, else
    ``(None, None, why not)``. Never raises on a string."""
    value, problem = _checker().check(reply if isinstance(reply, str) else repr(reply))
    if problem is not None:
        return None, None, problem
    rationale = value["rationale"].strip() or None
    return str(value["winner"]), rationale, None


def pair_key(a: int, b: int, order: str, number: int, texts: Sequence[str]) -> str:
    """The journal key of one verdict: the pair, its order, the try, and a digest of the
    two answers (a resumed row whose candidates came out otherwise asks afresh)."""
    digest = hashlib.sha256(f"{texts[a]}\0{texts[b]}".encode()).hexdigest()[:12]
    return f"pair {a}-{b} {order} {number} {digest}"


def orders(swap: bool) -> tuple[str, ...]:
    return (AB, BA) if swap else (AB,)


def pairs_of(n: int) -> list[tuple[int, int]]:
    """Every pair of ``n`` candidates, ``a < b``, in candidate order."""
    return list(itertools.combinations(range(n), 2))


@dataclass(frozen=True, slots=True)
class Judgement:
    """One verdict: candidates ``a`` < ``b``, the ``order`` shown (``"ab"``: a as A), the
    judge's ``winner`` as it answered (``"A"``, ``"B"``, ``"tie"``), and why."""

    a: int
    b: int
    order: str
    winner: str
    rationale: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "order": self.order,
            "winner": self.winner,
            "rationale": self.rationale,
        }


def won_by(a: int, b: int, order: str, winner: str | None) -> int | None:
    """The candidate a positional verdict names (order corrected), or None for a tie or no
    usable verdict."""
    if winner not in (A, B):
        return None
    first, second = (a, b) if order == AB else (b, a)
    return first if winner == A else second


@dataclass(frozen=True, slots=True)
class Outcome:
    """The round robin's result: each candidate's points, the pairs whose verdict changed
    with the order, the pair chosen (indices) or why there is none, and whether the row
    is to be dropped (``on_disagree: drop``)."""

    points: tuple[int, ...]
    flipped: tuple[tuple[int, int], ...]
    both_orders: int  # pairs judged in both orders
    chosen: int | None
    rejected: int | None
    error: str | None
    drop: bool = False


def score(n: int, judgements: Iterable[Judgement], on_disagree: str = TIE_ON_DISAGREE) -> Outcome:
    """Points per candidate from every verdict, order corrected, and the pair they pick.

    Each verdict gives its winner :data:`WIN_POINTS`, or both :data:`TIE_POINTS` for a
    tie (an unusable verdict is a tie). A pair judged in both orders whose winners
    differ flipped: its two verdicts are replaced by two ties, so a position-biased
    verdict moves nothing. Chosen is the most points, rejected the fewest, ties broken
    by candidate order (the earlier one); equal points for all leave no pair. With two
    candidates a flip leaves no pair (``order-dependent verdict``); with
    ``on_disagree: drop`` a flip of the chosen-and-rejected pair (with two candidates,
    the pair) drops the row.
    """
    by_pair: dict[tuple[int, int], list[Judgement]] = {}
    for j in judgements:
        by_pair.setdefault((j.a, j.b), []).append(j)
    points = [0] * n
    flipped: list[tuple[int, int]] = []
    both = 0
    for (a, b), verdicts in by_pair.items():
        winners = [won_by(a, b, j.order, j.winner) for j in verdicts]
        if len({j.order for j in verdicts}) == 2:
            both += 1
            if len(set(winners)) > 1:
                flipped.append((a, b))
                winners = [None] * len(winners)
        for w in winners:
            if w is None:
                points[a] += TIE_POINTS
                points[b] += TIE_POINTS
            else:
                points[w] += WIN_POINTS
    chosen, rejected, error = _best_and_worst(points)
    drop = False
    if n == 2 and flipped:
        chosen, rejected, error = None, None, ORDER_DEPENDENT
        drop = on_disagree == DROP_ON_DISAGREE
    elif chosen is not None and rejected is not None:
        drop = on_disagree == DROP_ON_DISAGREE and tuple(sorted((chosen, rejected))) in flipped
        if drop:
            error = ORDER_DEPENDENT
    return Outcome(tuple(points), tuple(flipped), both, chosen, rejected, error, drop)


def _best_and_worst(points: Sequence[int]) -> tuple[int | None, int | None, str | None]:
    if len(points) < 2:
        return None, None, f"fewer than two candidates to compare ({len(points)})"
    best = max(range(len(points)), key=lambda i: (points[i], -i))
    worst = min(range(len(points)), key=lambda i: (points[i], i))
    if points[best] == points[worst]:
        return None, None, "the judge preferred no answer (every verdict a tie)"
    return best, worst, None


def flips_of(judgements: Any) -> tuple[int, int]:
    """``(flipped, judged in both orders)`` over a row's ``judgements`` as written (a
    list of ``{a, b, order, winner}``); anything else counts as none."""
    if not isinstance(judgements, list):
        return 0, 0
    seen: dict[tuple[Any, Any], dict[str, int | None]] = {}
    for j in judgements:
        if not isinstance(j, Mapping):
            continue
        a, b, order = j.get("a"), j.get("b"), j.get("order")
        if not isinstance(a, int) or not isinstance(b, int) or order not in (AB, BA):
            continue
        winner = j.get("winner")
        seen.setdefault((a, b), {})[order] = won_by(
            a, b, order, winner if isinstance(winner, str) else None
        )
    both = [v for v in seen.values() if len(v) == 2]
    return sum(1 for v in both if v[AB] != v[BA]), len(both)


def flip_rate(flipped: int, both: int) -> str:
    """A flip rate as the displays write it: ``12.5% (5 of 40 pairs)``."""
    if not both:
        return "no pair judged in both orders"
    return f"{100 * flipped / both:.1f}% ({flipped} of {both} pairs)"
