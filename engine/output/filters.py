"""Quality filters for finished rows. Pure: a row and the rules in, the rule that fired out.

Which texts of a row are its replies is the task's to say (``RowView``, which
each ``TaskKind`` is): a distillation row's are the assistant messages of its
``messages`` (turn *i* is the *i*-th of them); a preference row's are its
``chosen`` and ``rejected`` messages (a pair is only as good as its worse half),
or each of its ``generations`` when it has no pair; a generate row's are its
``generations``.

Rules, checked in this order, the first that fires wins:

- ``empty`` (default off): a reply that is empty or whitespace;
- ``truncated`` (default off): a reply cut off by ``max_tokens`` (finish_reason
  ``length``), as the task recorded it in the row: the distillation row's
  ``truncated_turns``, the preference and generate rows' ``truncated_generations``.
  They are the tasks' own keys: an input column of such a name is dropped from the
  row, never obeyed;
- ``min_chars`` / ``max_chars``: a reply's length in characters, outer whitespace
  not counted;
- ``same_as_previous`` (default off): a reply identical (outer whitespace aside) to
  the assistant message before it; for a preference row, to the prompt's last
  assistant message, or chosen identical to rejected;
- ``repetition``: more than this fraction of a reply's word n-grams
  (``repetition_ngram`` words, default 4, lower-cased, split on whitespace) repeat
  an earlier n-gram of the same reply. Text without spaces between words (Chinese,
  Japanese) is one word to this rule, so it never fires there;
- ``deny``: a reply matching any of these regular expressions (``re.search``;
  case-sensitive unless the pattern says ``(?i)``).

- ``judge`` (``filters.judge: {model, template, min_score}``): a model scores the
  finished conversation 1-10, asked through the row's context once the rules above
  pass (engine.output.quality); a row scored below ``min_score`` is filtered.

A filtered row goes to ``<output stem>.filtered.jsonl`` as :func:`filtered_record`
makes it: the whole row plus ``filter``, the rule and a short detail.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from engine.output.quality import QualityJudge, parse_judge
from engine.problems import Problems

FILTER_KEY = "filter"
_KEYS = (
    "empty",
    "truncated",
    "repetition",
    "repetition_ngram",
    "min_chars",
    "max_chars",
    "deny",
    "same_as_previous",
    "judge",
)


@dataclass(frozen=True, slots=True)
class FilterConfig:
    """The rules a finished row must pass; see the module docstring for each."""

    empty: bool = False
    truncated: bool = False
    repetition: float | None = None
    repetition_ngram: int = 4
    min_chars: int | None = None
    max_chars: int | None = None
    deny: tuple[str, ...] = ()
    same_as_previous: bool = False
    judge: QualityJudge | None = None  # a model scores each finished conversation
    patterns: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Compiled once; parse_filters has already reported any pattern that fails.
        object.__setattr__(self, "patterns", tuple(re.compile(p) for p in self.deny))

    @property
    def active(self) -> bool:
        """Whether any string rule is on (a run with none can skip the check; the judge
        is asked apart, engine.tasks.base)."""
        return bool(
            self.empty
            or self.truncated
            or self.repetition is not None
            or self.min_chars is not None
            or self.max_chars is not None
            or self.deny
            or self.same_as_previous
        )

    def models(self) -> set[str]:
        """The models the filters ask (the judge's)."""
        return {self.judge.model} if self.judge is not None else set()

    def as_dict(self) -> dict[str, Any]:
        """Plain values, for the manifest or a dataset card (``judge`` only when set, so
        checkpoints made before it existed still resume)."""
        fields: dict[str, Any] = {
            "empty": self.empty,
            "truncated": self.truncated,
            "repetition": self.repetition,
            "repetition_ngram": self.repetition_ngram,
            "min_chars": self.min_chars,
            "max_chars": self.max_chars,
            "deny": list(self.deny),
            "same_as_previous": self.same_as_previous,
        }
        if self.judge is not None:
            fields["judge"] = self.judge.as_dict()
        return fields


def filtered_path(output: Path) -> Path:
    """Where filtered rows go: ``<output stem>.filtered.jsonl`` next to the output."""
    return output.with_name(output.stem + ".filtered.jsonl")


def filtered_record(row: Mapping[str, Any], reason: str) -> dict[str, Any]:
    """The filtered file's record: the whole row, then ``filter`` (the reason)."""
    out = {k: v for k, v in row.items() if k != FILTER_KEY}
    out[FILTER_KEY] = reason
    return out


def rule_of(reason: str) -> str:
    """The rule's name from a reason such as ``"empty: turn 2 is empty"``."""
    return reason.split(":", 1)[0]


# -- parsing ----------------------------------------------------------------------------


def parse_filters(
    raw: Any,
    problems: Problems,
    models: Mapping[str, Any] | None = None,
    base: Path | None = None,
) -> FilterConfig:
    """Validate the ``filters:`` section; every problem is reported, keyed by its name.

    ``models`` (the names under ``models:``) checks ``judge.model``; ``base`` is the
    folder ``judge.template`` is relative to (the config's)."""
    if raw is None:
        return FilterConfig()
    if not isinstance(raw, Mapping):
        problems.add("filters", f"must be a mapping of keys, got {type(raw).__name__}")
        return FilterConfig()
    for name in raw:
        if name not in _KEYS:
            problems.add(f"filters.{name}", f"unknown key; allowed keys here: {', '.join(_KEYS)}")
    defaults = FilterConfig()

    def flag(key: str) -> bool:
        default: bool = getattr(defaults, key)
        value = raw.get(key, default)
        if not isinstance(value, bool):
            problems.add(f"filters.{key}", f"must be true or false, got {value!r}")
            return default
        return value

    def count(key: str, default: int | None, least: int) -> int | None:
        value = raw.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            problems.add(f"filters.{key}", f"must be a whole number >= {least}, got {value!r}")
            return default
        return value

    repetition = raw.get("repetition")
    if repetition is not None and (
        isinstance(repetition, bool)
        or not isinstance(repetition, int | float)
        or not math.isfinite(repetition)
        or not 0 <= repetition < 1
    ):
        problems.add(
            "filters.repetition",
            f"must be a fraction from 0 up to (not including) 1, e.g. 0.5, got {repetition!r}",
        )
        repetition = None
    min_chars = count("min_chars", None, 0)
    max_chars = count("max_chars", None, 0)
    if min_chars is not None and max_chars is not None and min_chars > max_chars:
        problems.add(
            "filters.min_chars", f"is more than filters.max_chars ({min_chars} > {max_chars})"
        )
    return FilterConfig(
        empty=flag("empty"),
        truncated=flag("truncated"),
        repetition=None if repetition is None else float(repetition),
        repetition_ngram=count("repetition_ngram", 4, 1) or 4,
        min_chars=min_chars,
        max_chars=max_chars,
        deny=_patterns(raw.get("deny"), problems),
        same_as_previous=flag("same_as_previous"),
        judge=parse_judge(raw.get("judge"), problems, models, base or Path.cwd()),
    )


def _patterns(raw: Any, problems: Problems) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        problems.add("filters.deny", "must be a list of regular expressions, e.g. ['As an AI']")
        return ()
    good: list[str] = []
    for i, pattern in enumerate(raw):
        key = f"filters.deny[{i}]"
        if not isinstance(pattern, str) or not pattern:
            problems.add(key, f"must be a non-empty string, got {pattern!r}")
            continue
        try:
            re.compile(pattern)
        except re.error as exc:
            problems.add(key, f"not a valid regex ({exc}); fix it or remove it")
            continue
        good.append(pattern)
    return tuple(good)


# -- checking ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """One reply to check: its text, where it is (for the reason), and its neighbours."""

    text: str
    where: str
    previous: str | None = None
    truncated: bool = False


class RowView(Protocol):
    """What a task shows the filters of its finished rows (a ``TaskKind``)."""

    def replies(self, row: Mapping[str, Any]) -> Iterator[Reply]: ...

    def row_problem(self, row: Mapping[str, Any], cfg: FilterConfig) -> str | None: ...


def check_row(row: Mapping[str, Any], view: RowView, cfg: FilterConfig) -> str | None:
    """The first rule the row fails, as ``"rule: detail"``, or None when it passes."""
    replies = list(view.replies(row))
    for rule in _RULES:
        for reply in replies:
            detail = rule(reply, cfg)
            if detail is not None:
                return detail
    return view.row_problem(row, cfg)


def messages_of(value: Any) -> list[Mapping[str, Any]]:
    return [m for m in list_of(value) if isinstance(m, Mapping)]


def list_of(value: Any) -> Sequence[Any]:
    return value if isinstance(value, list | tuple) else ()


def ints_of(value: Any) -> set[int]:
    return {i for i in list_of(value) if isinstance(i, int) and not isinstance(i, bool)}


def text_of(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    return content if isinstance(content, str) else ""


# -- the rules: each takes a reply and the config, and returns "rule: detail" or None ----


def _empty(reply: Reply, cfg: FilterConfig) -> str | None:
    if cfg.empty and not reply.text.strip():
        return f"empty: the reply in {reply.where} is empty"
    return None


def _truncated(reply: Reply, cfg: FilterConfig) -> str | None:
    if cfg.truncated and reply.truncated:
        return f"truncated: the reply in {reply.where} was cut off by max_tokens"
    return None


def _min_chars(reply: Reply, cfg: FilterConfig) -> str | None:
    size = len(reply.text.strip())
    if cfg.min_chars is not None and size < cfg.min_chars:
        return f"min_chars: the reply in {reply.where} has {size} characters (min {cfg.min_chars})"
    return None


def _max_chars(reply: Reply, cfg: FilterConfig) -> str | None:
    size = len(reply.text.strip())
    if cfg.max_chars is not None and size > cfg.max_chars:
        return f"max_chars: the reply in {reply.where} has {size} characters (max {cfg.max_chars})"
    return None


def _same_as_previous(reply: Reply, cfg: FilterConfig) -> str | None:
    if not cfg.same_as_previous or reply.previous is None or not reply.text.strip():
        return None
    if reply.text.strip() == reply.previous.strip():
        return f"same_as_previous: the reply in {reply.where} repeats the assistant turn before it"
    return None


def _repetition(reply: Reply, cfg: FilterConfig) -> str | None:
    if cfg.repetition is None:
        return None
    n = cfg.repetition_ngram
    share = repeated_ngrams(reply.text, n)
    if share > cfg.repetition:
        return (
            f"repetition: {share:.0%} of {n}-grams repeated in {reply.where} "
            f"(max {cfg.repetition:.0%})"
        )
    return None


def _deny(reply: Reply, cfg: FilterConfig) -> str | None:
    for pattern in cfg.patterns:
        if pattern.search(reply.text):
            return f"deny: the reply in {reply.where} matches {pattern.pattern!r}"
    return None


_RULES = (_empty, _truncated, _min_chars, _max_chars, _same_as_previous, _repetition, _deny)


def repeated_ngrams(text: str, n: int) -> float:
    """The fraction of the text's word n-grams that repeat an earlier one (0 when it has
    fewer than two n-grams)."""
    words = text.lower().split()
    total = len(words) - n + 1
    if total < 2:
        return 0.0
    grams = {tuple(words[i : i + n]) for i in range(total)}
    return (total - len(grams)) / total
