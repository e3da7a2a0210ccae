"""The mock server's structured judges: pairwise verdicts and dialogue scores. Pure.

Two kinds of judge request get a JSON answer of their own (whatever the request's
``response_format``):

- a pairwise one (its last user message holds ``[The Start of Answer A]`` ...
  ``[The End of Answer A]`` and the same for B, as
  ``engine.tasks.preference.pairwise`` writes it): ``{"winner", "rationale"}``. The
  unbiased verdict prefers the answer of higher :func:`answer_quality` (a tie when
  equal). With ``position_bias`` P, a draw from the request's hash makes the judge
  answer ``"A"`` (the answer shown first) for a share P of requests, whatever the
  answers: a position-biased judge, deterministic, that swapping the order exposes.
- a dialogue one (``[The Start of the Dialogue]``, as ``engine.output.quality``
  writes it): ``{"score": 1-10, "reason"}``, the score :func:`dialogue_score`.

A candidate may force its quality with ``[[quality=N]]`` and a dialogue its score
with ``[[score=N]]``, so tests can make known cases.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import orjson

_ANSWER = re.compile(r"\[The Start of Answer ([AB])\]\n(.*?)\n\[The End of Answer \1\]", re.S)
_DIALOGUE = re.compile(r"\[The Start of the Dialogue\]\n(.*?)\n\[The End of the Dialogue\]", re.S)
_QUALITY = re.compile(r"\[\[quality=(\d{1,6})\]\]")
_SCORE = re.compile(r"\[\[score=(10|[1-9])\]\]")


def answer_quality(text: str) -> int:
    """The mock judge's hidden quality of one answer (0-999999; forced by ``[[quality=N]]``)."""
    forced = _QUALITY.search(text)
    if forced is not None:
        return int(forced.group(1))
    return int(hashlib.sha256(text.strip().encode()).hexdigest()[:8], 16) % 1_000_000


def unbiased_winner(first: str, second: str) -> str:
    """``"A"``, ``"B"`` or ``"tie"``: the verdict of a judge with no position bias."""
    qa, qb = answer_quality(first), answer_quality(second)
    return "A" if qa > qb else "B" if qb > qa else "tie"


def bias_draw(prompt: str) -> float:
    """The request's draw in [0, 1): below ``position_bias``, the judge says ``"A"``."""
    return int(hashlib.sha256(f"position {prompt}".encode()).hexdigest()[:13], 16) / 16**13


def pairwise_verdict(prompt: str, position_bias: float = 0.0) -> dict[str, str] | None:
    """The verdict on a pairwise prompt, or None when ``prompt`` is not one."""
    answers = dict(_ANSWER.findall(prompt))
    if "A" not in answers or "B" not in answers:
        return None
    if bias_draw(prompt) < position_bias:
        return {"winner": "A", "rationale": "The mock judge prefers the answer it read first."}
    winner = unbiased_winner(answers["A"], answers["B"])
    if winner == "tie":
        return {"winner": winner, "rationale": "The mock judge finds the answers equal."}
    return {"winner": winner, "rationale": f"The mock judge finds answer {winner} better."}


def dialogue_score(dialogue: str) -> int:
    """The mock judge's score of a dialogue, 1-10 (forced by ``[[score=N]]``)."""
    forced = _SCORE.search(dialogue)
    if forced is not None:
        return int(forced.group(1))
    return 1 + int(hashlib.sha256(dialogue.strip().encode()).hexdigest()[:8], 16) % 10


def quality_score(prompt: str) -> dict[str, Any] | None:
    """The score of a dialogue-judging prompt, or None when ``prompt`` is not one."""
    match = _DIALOGUE.search(prompt)
    if match is None:
        return None
    score = dialogue_score(match.group(1))
    return {"score": score, "reason": f"The mock judge scores this dialogue {score} of 10."}


def judge_json(messages: list[dict[str, Any]], position_bias: float = 0.0) -> str | None:
    """The JSON reply of a structured judge request (its last user message), or None."""
    last = next(
        (str(m.get("content", "")) for m in reversed(messages) if m.get("role") == "user"), None
    )
    if last is None or "[The Start of" not in last:
        return None
    value = pairwise_verdict(last, position_bias) or quality_score(last)
    return None if value is None else orjson.dumps(value).decode()
