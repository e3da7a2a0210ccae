"""Quality filters: each rule fires and does not fire; config problems name their keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine.output.filters import (
    FilterConfig,
    Reply,
    check_row,
    filtered_path,
    filtered_record,
    parse_filters,
    repeated_ngrams,
    rule_of,
)
from engine.tasks import kind_of
from engine.tasks.preference.pairs import preference_row

DISTILL = kind_of("distill")
PREFERENCE = kind_of("preference")

GOOD = "Paris is the capital of France, and it sits on the Seine."

# The rules that need no settings, switched on (all rules are off by default).
ON = FilterConfig(empty=True, same_as_previous=True)


def distill_row(*replies: str, **extra: Any) -> dict[str, Any]:
    messages: list[dict[str, str]] = [{"role": "system", "content": "be brief"}]
    for i, reply in enumerate(replies):
        messages.append({"role": "user", "content": f"question {i}"})
        messages.append({"role": "assistant", "content": reply})
    return {"id": "r", "messages": messages, "model": "m", **extra}


def pref_row(chosen: str | None, rejected: str | None, **extra: Any) -> dict[str, Any]:
    paired = chosen is not None
    return {
        "id": "p",
        "prompt": [{"role": "user", "content": "q"}],
        "generations": [chosen or "g0", rejected or "g1"],
        "generation_models": ["a", "b"],
        "chosen": [{"role": "assistant", "content": chosen}] if paired else None,
        "rejected": [{"role": "assistant", "content": rejected}] if paired else None,
        "chosen_model": "a" if paired else None,
        "rejected_model": "b" if paired else None,
        **extra,
    }


class Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, key: str, message: str) -> None:
        self.items.append(f"{key}: {message}")


def parsed(raw: Any) -> tuple[FilterConfig, list[str]]:
    p = Problems()
    return parse_filters(raw, p), p.items


# --- each rule ---------------------------------------------------------------------------


def test_a_good_row_passes_the_defaults() -> None:
    assert check_row(distill_row(GOOD, "Berlin is the capital of Germany."), DISTILL, ON) is None


def test_empty_fires_on_whitespace_and_names_the_turn() -> None:
    reason = check_row(distill_row(GOOD, "  \n "), DISTILL, ON)
    assert reason == "empty: the reply in turn 1 is empty"
    assert rule_of(reason) == "empty"
    assert check_row(distill_row(GOOD, " "), DISTILL, FilterConfig(empty=False)) is None


def test_truncated_fires_only_when_asked() -> None:
    row = distill_row(GOOD, "cut off mid", truncated_turns=[1])
    assert check_row(row, DISTILL, ON) is None
    reason = check_row(row, DISTILL, FilterConfig(truncated=True))
    assert reason == "truncated: the reply in turn 1 was cut off by max_tokens"
    assert check_row(distill_row(GOOD), DISTILL, FilterConfig(truncated=True)) is None


def test_min_and_max_chars_count_the_reply_without_outer_whitespace() -> None:
    cfg = FilterConfig(min_chars=5, max_chars=60)
    assert check_row(distill_row(GOOD, "  ok  "), DISTILL, cfg) == (
        "min_chars: the reply in turn 1 has 2 characters (min 5)"
    )
    assert check_row(distill_row("x" * 61), DISTILL, cfg) == (
        "max_chars: the reply in turn 0 has 61 characters (max 60)"
    )
    assert check_row(distill_row("x" * 60, "  hello  "), DISTILL, cfg) is None


def test_same_as_previous_fires_on_a_repeated_turn() -> None:
    reason = check_row(distill_row(GOOD, f" {GOOD}\n"), DISTILL, ON)
    assert reason == "same_as_previous: the reply in turn 1 repeats the assistant turn before it"
    assert check_row(distill_row(GOOD, GOOD), DISTILL, FilterConfig(same_as_previous=False)) is None
    assert check_row(distill_row(GOOD, GOOD + "!"), DISTILL, ON) is None


def test_repetition_fires_above_the_share_of_repeated_ngrams() -> None:
    looping = "I am sure that this is right. " * 6
    assert repeated_ngrams(looping, 4) > 0.75
    assert repeated_ngrams(GOOD, 4) == 0.0
    assert repeated_ngrams("too short", 4) == 0.0
    cfg = FilterConfig(repetition=0.5)
    reason = check_row(distill_row(GOOD, looping), DISTILL, cfg)
    assert reason is not None and reason.startswith("repetition: ")
    assert "of 4-grams repeated in turn 1 (max 50%)" in reason
    assert check_row(distill_row(GOOD, looping), DISTILL, ON) is None
    assert check_row(distill_row(GOOD), DISTILL, cfg) is None


def test_repetition_share_is_exact() -> None:
    # 8 words, 5 4-grams: "a b c d", "b c d a", "c d a b", "d a b c", "a b c d" (a repeat).
    assert repeated_ngrams("a b c d a b c d", 4) == pytest.approx(1 / 5)
    assert repeated_ngrams("A b c d a B c D", 4) == pytest.approx(1 / 5)  # case-blind


def test_deny_fires_on_a_matching_regex() -> None:
    cfg = FilterConfig(deny=(r"(?i)as an ai\b", "^Sorry"))
    reason = check_row(distill_row(GOOD, "Well, as an AI model I cannot."), DISTILL, cfg)
    assert reason == "deny: the reply in turn 1 matches '(?i)as an ai\\\\b'"
    assert check_row(distill_row("I'm Sorry"), DISTILL, cfg) is None  # ^ anchors
    assert check_row(distill_row("Sorry, no."), DISTILL, cfg) is not None
    assert check_row(distill_row(GOOD), DISTILL, cfg) is None


def test_rules_are_checked_in_order_across_turns() -> None:
    cfg = FilterConfig(empty=True, deny=("Paris",))
    # Turn 0 matches deny, turn 1 is empty: empty comes first in the rule order.
    assert rule_of(check_row(distill_row(GOOD, ""), DISTILL, cfg) or "") == "empty"


# --- preference rows -------------------------------------------------------------------------


def test_a_preference_row_is_filtered_when_its_chosen_or_rejected_fails() -> None:
    cfg = FilterConfig(empty=True, deny=("As an AI",))
    assert check_row(pref_row(GOOD, "Lyon."), PREFERENCE, cfg) is None
    assert check_row(pref_row(GOOD, "As an AI, no."), PREFERENCE, cfg) == (
        "deny: the reply in rejected (b) matches 'As an AI'"
    )
    assert check_row(pref_row("", "Lyon."), PREFERENCE, cfg) == (
        "empty: the reply in chosen (a) is empty"
    )


def test_identical_chosen_and_rejected_is_same_as_previous() -> None:
    assert check_row(pref_row(GOOD, GOOD), PREFERENCE, ON) == (
        "same_as_previous: chosen and rejected are identical"
    )
    assert check_row(pref_row(GOOD, GOOD), PREFERENCE, FilterConfig(same_as_previous=False)) is None


def test_a_reply_that_repeats_the_prompts_last_assistant_turn() -> None:
    row = pref_row(GOOD, "Lyon.")
    row["prompt"] = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "Lyon."},
        {"role": "user", "content": "again?"},
    ]
    assert check_row(row, PREFERENCE, ON) == (
        "same_as_previous: the reply in rejected (b) repeats the assistant turn before it"
    )


def test_an_unpaired_row_has_each_generation_checked() -> None:
    row = pref_row(None, None)
    row["generations"] = [GOOD, None, "   "]
    assert check_row(row, PREFERENCE, ON) == ("empty: the reply in generation 2 is empty")
    row["generations"] = [GOOD, None]
    assert check_row(row, PREFERENCE, ON) is None


def task_pref_row(
    texts: tuple[str, str], ratings: tuple[int, int], truncated: tuple[int, ...] = (), **extra: Any
) -> dict[str, Any]:
    """A preference row as the task builds it: ``truncated`` is what the server said."""
    return preference_row(
        extra=extra,
        row_id="p",
        prompt=[{"role": "user", "content": "q"}],
        generations=list(texts),
        generation_models=["a", "b"],
        generation_errors=[],
        usage={},
        judged=True,
        ratings=list(ratings),
        rationales=[None, None],
        truncated=truncated,
    )


def test_a_preference_reply_cut_off_by_max_tokens_is_filtered() -> None:
    cut = FilterConfig(truncated=True)
    rejected_cut = task_pref_row((GOOD, "cut off mid"), (5, 1), truncated=(1,))
    assert rejected_cut["truncated_generations"] == [1]
    assert check_row(rejected_cut, PREFERENCE, cut) == (
        "truncated: the reply in rejected (b) was cut off by max_tokens"
    )
    assert check_row(rejected_cut, PREFERENCE, ON) is None  # only when asked
    chosen_cut = task_pref_row(("cut off mid", GOOD), (5, 1), truncated=(0,))
    assert check_row(chosen_cut, PREFERENCE, cut) == (
        "truncated: the reply in chosen (a) was cut off by max_tokens"
    )
    # Unpaired (equal ratings): every generation is checked.
    unpaired = task_pref_row((GOOD, "cut off mid"), (3, 3), truncated=(1,))
    assert unpaired["chosen"] is None
    assert check_row(unpaired, PREFERENCE, cut) == (
        "truncated: the reply in generation 1 was cut off by max_tokens"
    )
    assert check_row(task_pref_row((GOOD, "whole"), (5, 1)), PREFERENCE, cut) is None


def test_an_input_column_named_like_the_truncation_record_is_not_obeyed() -> None:
    row = task_pref_row((GOOD, "Lyon is not the capital."), (5, 1), truncated_generations=[0, 1])
    assert "truncated_generations" not in row  # the task's own key: the input's is dropped
    assert check_row(row, PREFERENCE, FilterConfig(truncated=True)) is None
    # And the input's value never overrides what the task recorded.
    row = task_pref_row((GOOD, "cut off mid"), (5, 1), truncated=(1,), truncated_generations=[0])
    assert row["truncated_generations"] == [1]


# --- config ------------------------------------------------------------------------------


def test_no_filters_section_gives_the_defaults() -> None:
    cfg, problems = parsed(None)
    assert problems == []
    assert cfg == FilterConfig()
    assert not cfg.active  # filters are opt-in: no row is held back unless asked


def test_a_full_section_parses() -> None:
    cfg, problems = parsed(
        {
            "empty": False,
            "truncated": True,
            "repetition": 0.5,
            "repetition_ngram": 3,
            "min_chars": 1,
            "max_chars": 100,
            "deny": ["As an AI"],
            "same_as_previous": False,
        }
    )
    assert problems == []
    assert cfg.repetition == 0.5 and cfg.repetition_ngram == 3
    assert cfg.deny == ("As an AI",) and cfg.patterns[0].pattern == "As an AI"
    assert cfg.as_dict()["deny"] == ["As an AI"]


def test_every_problem_is_reported_with_its_key() -> None:
    _, problems = parsed(
        {
            "empty": "yes",
            "repetition": 1.5,
            "repetition_ngram": 0,
            "min_chars": 10,
            "max_chars": 5,
            "deny": ["ok", "[unclosed", 3],
            "colour": "red",
        }
    )
    keys = [p.split(":", 1)[0] for p in problems]
    assert "filters.empty" in keys
    assert "filters.repetition" in keys
    assert "filters.repetition_ngram" in keys
    assert "filters.min_chars" in keys
    assert "filters.colour" in keys
    assert "filters.deny[2]" in keys
    bad_regex = [p for p in problems if p.startswith("filters.deny[1]")]
    assert bad_regex and "not a valid regex (unterminated character set" in bad_regex[0]


def test_a_section_that_is_not_a_mapping() -> None:
    cfg, problems = parsed(["empty"])
    assert problems == ["filters: must be a mapping of keys, got list"]
    assert cfg == FilterConfig()
    _, problems = parsed({"deny": "As an AI"})
    assert problems == ["filters.deny: must be a list of regular expressions, e.g. ['As an AI']"]


def test_all_rules_off_is_inactive() -> None:
    assert not FilterConfig(empty=False, same_as_previous=False).active


def test_the_filtered_record_and_path() -> None:
    row = {"id": 1, "messages": [], "filter": "an input field of that name"}
    assert filtered_record(row, "empty: x") == {"id": 1, "messages": [], "filter": "empty: x"}
    assert filtered_path(Path("out/distilled.jsonl")) == Path("out/distilled.filtered.jsonl")


def test_the_filters_check_what_the_task_offers_as_replies() -> None:
    class OneReply:
        def replies(self, row: Any) -> Any:
            yield Reply(row["text"], "the text")

        def row_problem(self, row: Any, cfg: FilterConfig) -> str | None:
            return "whole row: vetoed" if row.get("veto") else None

    assert check_row({"text": " "}, OneReply(), ON) == "empty: the reply in the text is empty"
    assert check_row({"text": "fine"}, OneReply(), ON) is None
    assert check_row({"text": "fine", "veto": True}, OneReply(), ON) == "whole row: vetoed"
