"""The judge filter: a model scores each finished conversation 1-10. Pure.

``filters.judge: {model, template, min_score}``. Once a row has passed the string
rules (engine.output.filters), the judge model is asked to score the conversation
(``messages``) once: a JSON reply ``{"score": 1-10, "reason": "..."}`` under
``response_format`` (:func:`quality_schema`), validated, asked again once when it
does not fit. The score and reason land in the row as ``quality: {score, reason}``;
a row scored below ``min_score`` goes to the filtered file with them (rule
``judge``). A row whose judge gave no usable score in two replies is kept, with
``quality: {score: null, reason: <why>}``: a judge that ignored the format says
nothing about the conversation.

The request goes through the row's ``Context.ask`` (engine.tasks.base), so it is
journaled like any reply and counted in the judge model's requests; this module
builds the request and reads the reply. Jinja2 and jsonschema are imported only
when a run uses the filter.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jinja2 import Template

    from engine.problems import Problems
    from engine.tasks.structured import ReplyChecker

Message = dict[str, str]

QUALITY_KEY = "quality"  # the row's {score, reason}
RULE = "judge"  # the filtered file's rule
SCORES = tuple(range(1, 11))
TRIES = 2  # a reply that does not fit is asked again once
VARIABLES = ("messages",)
_KEYS = ("model", "template", "min_score")

_RUBRIC = (
    "You are a strict reviewer of training data for a chat assistant. Read the "
    "conversation between a user and an assistant and score the assistant's side of it "
    "from 1 to 10:\n"
    "- 9-10: every reply is correct, helpful, on point and well written; the assistant "
    "follows the user across turns.\n"
    "- 7-8: good, with small slips of accuracy, focus or style.\n"
    "- 4-6: usable in parts; mistakes, padding, repetition or turns that miss the user's "
    "point.\n"
    "- 1-3: wrong, unhelpful, incoherent, repetitive or unsafe.\n"
    "Answer with one JSON object and nothing else: "
    '{"score": <an integer from 1 to 10>, "reason": "<why, in one or two sentences>"}.'
)


@dataclass(frozen=True, slots=True)
class QualityJudge:
    """``filters.judge``: which model scores, with which prompt, and the least score kept."""

    model: str
    min_score: int = 7
    template: str | None = None  # the file, as the config names it
    template_text: str | None = None  # its text, read and checked with the config
    compiled: Template | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.template_text is not None and self.compiled is None:
            from engine.tasks.templates import ENV

            object.__setattr__(self, "compiled", ENV.from_string(self.template_text))

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "template": self.template_text, "min_score": self.min_score}


def parse_judge(
    raw: Any, problems: Problems, models: Mapping[str, Any] | None, base: Path
) -> QualityJudge | None:
    """``filters.judge``; problems name the key. ``models``: the names under ``models:``
    (None: not checked here)."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        problems.add("filters.judge", "must be a mapping, e.g. {model: judge, min_score: 7}")
        return None
    for name in raw:
        if name not in _KEYS:
            problems.add(
                f"filters.judge.{name}", f"unknown key; allowed keys here: {', '.join(_KEYS)}"
            )
    model = raw.get("model")
    if not isinstance(model, str) or not model:
        problems.add("filters.judge.model", "must name a model under models:, e.g. judge")
        return None
    if models is not None and model not in models:
        known = ", ".join(sorted(models)) or "none"
        problems.add(
            "filters.judge.model", f"{model!r} is not a model under models: (known: {known})"
        )
        return None
    min_score = raw.get("min_score", 7)
    if isinstance(min_score, bool) or not isinstance(min_score, int) or min_score not in SCORES:
        problems.add("filters.judge.min_score", f"must be a whole number 1-10, got {min_score!r}")
        min_score = 7
    template = raw.get("template")
    text = None
    if template is not None:
        if not isinstance(template, str) or not template:
            problems.add("filters.judge.template", "must be a Jinja2 file's path, or null")
            template = None
        else:
            text = _read(template, base, problems)
            if text is None:
                template = None
    return QualityJudge(model=model, min_score=min_score, template=template, template_text=text)


def _read(name: str, base: Path, problems: Problems) -> str | None:
    from engine.tasks.preference.judge_template import read_template
    from engine.tasks.templates import BadTemplate

    path = Path(name).expanduser()
    try:
        return read_template(path if path.is_absolute() else base / path, VARIABLES)
    except BadTemplate as exc:
        problems.add("filters.judge.template", str(exc))
        return None


def quality_schema() -> dict[str, Any]:
    """The JSON Schema of a score: ``{"score": 1-10, "reason": "..."}``, strict."""
    return {
        "type": "object",
        "properties": {
            "score": {"type": "integer", "enum": list(SCORES)},
            "reason": {"type": "string"},
        },
        "required": ["score", "reason"],
        "additionalProperties": False,
    }


def quality_request_fields() -> dict[str, Any]:
    from engine.tasks.structured import response_format

    return {"response_format": response_format(quality_schema(), "quality")}


def dialogue_of(row: Mapping[str, Any]) -> list[Message] | None:
    """The conversation a row holds (its ``messages``), or None when it holds none."""
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    out: list[Message] = []
    for m in messages:
        if isinstance(m, Mapping) and isinstance(m.get("role"), str):
            content = m.get("content")
            out.append({"role": m["role"], "content": content if isinstance(content, str) else ""})
    return out or None


def quality_messages(
    judge: QualityJudge, messages: Sequence[Message]
) -> tuple[list[Message] | None, str | None]:
    """The request (the built-in rubric and the conversation, or the config's template
    rendered with ``messages`` as one user message), or None and why the template
    failed on this row."""
    if judge.compiled is not None:
        try:
            text = judge.compiled.render(messages=[dict(m) for m in messages])
        except Exception as exc:  # user code on user data: this row's judging only
            return None, f"the filters.judge template failed on this row: {exc}"
        if not text.strip():
            return None, "the filters.judge template rendered empty text for this row"
        return [{"role": "user", "content": text}], None
    turns = "\n\n".join(
        f"[{m.get('role', 'unknown').capitalize()}]\n{m.get('content', '')}" for m in messages
    )
    user = (
        f"[The Start of the Dialogue]\n{turns}\n[The End of the Dialogue]\n\n"
        "Score the assistant's side of this dialogue. Reply with the JSON object."
    )
    return [{"role": "system", "content": _RUBRIC}, {"role": "user", "content": user}], None


@functools.cache
def _checker() -> ReplyChecker:
    from engine.tasks.structured import ReplyChecker

    return ReplyChecker(quality_schema(), "the filters.judge score schema")


def parse_quality(reply: str) -> tuple[int | None, str | None, str | None]:
    """``(score, reason, None)`` for a reply that fits :func:`quality_schema`, else
    ``(None, None, why not)``. Never raises on a string."""
    value, problem = _checker().check(reply if isinstance(reply, str) else repr(reply))
    if problem is not None:
        return None, None, problem
    return int(value["score"]), value["reason"].strip() or None, None


def quality_verdict(score: int | None, reason: str | None, min_score: int) -> str | None:
    """The filtered file's reason for a row scored below ``min_score``, or None to keep it."""
    if score is None or score >= min_score:
        return None
    why = f": {reason}" if reason else ""
    return f"{RULE}: scored {score} of 10 (min_score {min_score}){why}"


def ask_key(number: int) -> str:
    """The journal key of judge reply ``number`` for a row's quality."""
    return f"quality {number}"
