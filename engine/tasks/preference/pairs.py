"""Preference pairs: which generation is chosen, which rejected, and the output row.

Pure functions. :func:`choose_pair` turns the judge's ratings for one prompt
into a chosen/rejected pair, or says why there is none; :func:`preference_row`
builds the output row in TRL's conversational preference format, where
``prompt`` holds the conversation and ``chosen``/``rejected`` each hold the one
assistant message that answers it, ready for ``DPOTrainer``/``ORPOTrainer``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engine.http.reasoning import with_trace

Message = dict[str, str]

NO_JUDGE = "no judge configured"

# The row's own keys, in output order; the input's other fields come first.
ROW_KEYS = (
    "id",
    "prompt",
    "generations",
    "generation_models",
    "ratings",
    "rationales",
    "chosen",
    "rejected",
    "chosen_model",
    "rejected_model",
    "chosen_generator",
    "rejected_generator",
    "chosen_rating",
    "rejected_rating",
    "pair_error",
    "generation_errors",
    "usage",
)
# The generations cut off by max_tokens (0-based, finish_reason "length"): written
# after ``usage``, only when there are any, as distillation's ``truncated_turns``.
TRUNCATED_KEY = "truncated_generations"
# Each generation's reasoning trace (None where it had none), parallel to
# ``generations``: written after it, only when some generation had a trace.
REASONING_KEY = "generation_reasoning"
# A pairwise judge's verdicts, every one ({a, b, order, winner, rationale}): written
# after ``rationales``, only with judge_format: pairwise (engine.tasks.preference.pairwise).
JUDGEMENTS_KEY = "judgements"
# Every key the row writes itself: an input field of one of these names is dropped,
# so ``filters.truncated`` never obeys an input column.
_OWN_KEYS = frozenset({*ROW_KEYS, TRUNCATED_KEY, REASONING_KEY, JUDGEMENTS_KEY})


@dataclass(frozen=True, slots=True)
class Pair:
    """The chosen and rejected generation (0-based indices), or why there is no pair.

    Either both indices are set and ``error`` is ``None``, or both are
    ``None`` and ``error`` says why.
    """

    chosen_index: int | None
    rejected_index: int | None
    error: str | None

    @property
    def ok(self) -> bool:
        """Whether this is a real pair."""
        return self.error is None


def choose_pair(ratings: Sequence[int | None]) -> Pair:
    """Pick the highest-rated generation as chosen and the lowest as rejected.

    ``None`` ratings (unrated or failed generations) are ignored. Ties go to
    the lower index, for chosen and rejected alike, so the result depends only
    on the ratings and their order. There is no pair when fewer than two
    generations are rated or when every rating is the same: a pair of equals
    teaches a preference trainer nothing.
    """
    rated = [(i, r) for i, r in enumerate(ratings) if r is not None]
    if not rated:
        return Pair(None, None, "no generation could be rated")
    if len(rated) < 2:
        return Pair(
            None,
            None,
            f"fewer than two rated generations ({len(rated)} of {len(ratings)} rated)",
        )
    chosen, best = rated[0]
    rejected, worst = rated[0]
    for i, r in rated[1:]:
        if r > best:  # strictly: an equal rating keeps the lower index
            chosen, best = i, r
        if r < worst:
            rejected, worst = i, r
    if best == worst:
        return Pair(None, None, f"all ratings are equal ({best})")
    return Pair(chosen, rejected, None)


def preference_row(
    *,
    extra: Mapping[str, Any],
    row_id: Any,
    prompt: Sequence[Message],
    generations: Sequence[str | None],
    generation_models: Sequence[str],
    generation_errors: Sequence[Mapping[str, Any]],
    usage: Mapping[str, Any],
    judged: bool,
    ratings: Sequence[int | None] | None = None,
    rationales: Sequence[str | None] | None = None,
    truncated: Sequence[int] = (),
    reasoning: Sequence[str | None] | None = None,
    generators: Sequence[str | None] | None = None,
    judgements: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Build one output row for a prompt: its generations, ratings and pair.

    ``generators`` names the config's generator entry that made each generation
    (None for one the input row brought): ``chosen_generator`` and
    ``rejected_generator`` tell two entries apart that serve the same model with
    different params, where ``chosen_model`` and ``rejected_model`` are the same.

    ``reasoning`` holds each generation's trace (None where it had none): written as
    :data:`REASONING_KEY` when any is set, and carried by the chosen and rejected
    assistant messages as ``reasoning_content``.

    ``judgements``: a pairwise judge's verdicts, written as :data:`JUDGEMENTS_KEY`
    after ``rationales`` when given (the ``ratings`` are then its round robin's points).

    Keys, in order: the input's other fields (``extra``), then :data:`ROW_KEYS`,
    then :data:`TRUNCATED_KEY` when ``truncated`` (indices into ``generations``
    of those cut off by max_tokens) is not empty. An ``extra`` key that collides
    with one of those is dropped, so the row's own value wins and its place in
    the order is fixed.

    ``generations[i]`` was written by ``generation_models[i]``; a generation
    that failed is ``None`` (its error is in ``generation_errors``) and is never
    paired, even if a rating is given for it. ``chosen`` and ``rejected`` are
    each a list holding one assistant message (TRL's conversational format with
    a separate ``prompt``); ``pair_error`` is ``None`` when there is a pair and
    says why otherwise, with the pair fields ``None``.

    With ``judged=False`` (no judge configured) the row carries the
    generations only: ``ratings``, ``rationales`` and every pair field are
    ``None`` and ``pair_error`` is ``"no judge configured"``; the ``ratings``
    and ``rationales`` arguments are ignored. With ``judged=True`` both must be
    given, one entry per generation.

    Raises ValueError when the per-generation sequences differ in length:
    that is the caller's bug, not data.
    """
    n = len(generations)
    if len(generation_models) != n:
        raise ValueError(f"{len(generation_models)} generation models for {n} generations")
    if any(not 0 <= i < n for i in truncated):
        raise ValueError(f"truncated generations {list(truncated)} for {n} generations")
    traces = list(reasoning) if reasoning is not None else [None] * n
    if len(traces) != n:
        raise ValueError(f"{len(traces)} reasoning traces for {n} generations")
    makers = list(generators) if generators is not None else [None] * n
    if len(makers) != n:
        raise ValueError(f"{len(makers)} generators for {n} generations")
    row: dict[str, Any] = {k: v for k, v in extra.items() if k not in _OWN_KEYS}
    row["id"] = row_id
    row["prompt"] = [dict(m) for m in prompt]
    row["generations"] = list(generations)
    if any(trace is not None for trace in traces):
        row[REASONING_KEY] = traces
    row["generation_models"] = list(generation_models)
    for key, value in _judged_fields(
        generations, generation_models, judged, ratings, rationales, traces, makers
    ).items():
        row[key] = value
        if key == "rationales" and judgements is not None:
            row[JUDGEMENTS_KEY] = [dict(j) for j in judgements]
    row["generation_errors"] = [dict(e) for e in generation_errors]
    row["usage"] = dict(usage)
    if truncated:
        row[TRUNCATED_KEY] = sorted(set(truncated))
    return row


def _judged_fields(
    generations: Sequence[str | None],
    models: Sequence[str],
    judged: bool,
    ratings: Sequence[int | None] | None,
    rationales: Sequence[str | None] | None,
    traces: Sequence[str | None],
    makers: Sequence[str | None],
) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "ratings": None,
        "rationales": None,
        "chosen": None,
        "rejected": None,
        "chosen_model": None,
        "rejected_model": None,
        "chosen_generator": None,
        "rejected_generator": None,
        "chosen_rating": None,
        "rejected_rating": None,
        "pair_error": NO_JUDGE,
    }
    if not judged:
        return fields
    n = len(generations)
    if ratings is None or rationales is None:
        raise ValueError("a judged row needs ratings and rationales")
    if len(ratings) != n or len(rationales) != n:
        raise ValueError(
            f"{len(ratings)} ratings and {len(rationales)} rationales for {n} generations"
        )
    fields["ratings"] = list(ratings)
    fields["rationales"] = list(rationales)
    # A failed generation has no text to train on, whatever rating it got.
    pairable = [r if g is not None else None for g, r in zip(generations, ratings, strict=True)]
    pair = choose_pair(pairable)
    fields["pair_error"] = pair.error
    if pair.chosen_index is None or pair.rejected_index is None:
        return fields
    c, r = pair.chosen_index, pair.rejected_index
    chosen, rejected = generations[c], generations[r]
    assert chosen is not None and rejected is not None  # choose_pair skips failed ones
    fields["chosen"] = [with_trace(chosen, traces[c])]
    fields["rejected"] = [with_trace(rejected, traces[r])]
    fields["chosen_model"] = models[c]
    fields["rejected_model"] = models[r]
    fields["chosen_generator"] = makers[c]
    fields["rejected_generator"] = makers[r]
    fields["chosen_rating"] = ratings[c]
    fields["rejected_rating"] = ratings[r]
    return fields
