"""Choosing the preference pair and building the output row."""

from __future__ import annotations

from typing import Any

import pytest

from engine.tasks.preference.pairs import NO_JUDGE, ROW_KEYS, Pair, choose_pair, preference_row

# --- choose_pair -----------------------------------------------------------------


def test_highest_is_chosen_lowest_rejected() -> None:
    assert choose_pair([3, 5, 1, 4]) == Pair(1, 2, None)
    assert choose_pair([3, 5, 1, 4]).ok


def test_ties_go_to_the_lower_index() -> None:
    assert choose_pair([5, 2, 5, 2]) == Pair(0, 1, None)
    assert choose_pair([1, 4, 4, 1, 3]) == Pair(1, 0, None)


def test_nulls_are_ignored() -> None:
    assert choose_pair([None, 2, None, 4]) == Pair(3, 1, None)
    assert choose_pair([None, 5, 1, None]) == Pair(1, 2, None)


def test_all_equal_is_no_pair() -> None:
    pair = choose_pair([3, 3, None, 3])
    assert pair == Pair(None, None, "all ratings are equal (3)")
    assert not pair.ok


def test_one_rated_is_no_pair() -> None:
    assert choose_pair([None, 4, None]) == Pair(
        None, None, "fewer than two rated generations (1 of 3 rated)"
    )
    assert choose_pair([4]) == Pair(None, None, "fewer than two rated generations (1 of 1 rated)")


@pytest.mark.parametrize("ratings", [[None, None, None], [None], []])
def test_none_rated_is_no_pair(ratings: list[int | None]) -> None:
    assert choose_pair(ratings) == Pair(None, None, "no generation could be rated")


def test_two_rated_distinct_is_a_pair() -> None:
    assert choose_pair([2, 1]) == Pair(0, 1, None)


# --- preference_row ----------------------------------------------------------------

PROMPT = [{"role": "user", "content": "Name a colour."}]


def _row(**overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "extra": {"source": "unit", "lang": "en"},
        "row_id": "row-7",
        "prompt": PROMPT,
        "generations": ["Red.", "Blue, probably.", "Green!"],
        "generation_models": ["a", "b", "c"],
        "generation_errors": [],
        "usage": {"prompt_tokens": 30, "completion_tokens": 12},
        "judged": True,
        "ratings": [4, 2, 5],
        "rationales": ["ok", "hedges", "great"],
    }
    args.update(overrides)
    return preference_row(**args)


def test_row_keys_and_their_order() -> None:
    row = _row()
    assert list(row) == ["source", "lang", *ROW_KEYS]
    assert ROW_KEYS == (
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


def test_a_paired_row() -> None:
    row = _row()
    assert row["id"] == "row-7"
    assert row["prompt"] == PROMPT
    assert row["generations"] == ["Red.", "Blue, probably.", "Green!"]
    assert row["generation_models"] == ["a", "b", "c"]
    assert row["ratings"] == [4, 2, 5]
    assert row["rationales"] == ["ok", "hedges", "great"]
    assert row["chosen"] == [{"role": "assistant", "content": "Green!"}]
    assert row["rejected"] == [{"role": "assistant", "content": "Blue, probably."}]
    assert (row["chosen_model"], row["rejected_model"]) == ("c", "b")
    assert (row["chosen_rating"], row["rejected_rating"]) == (5, 2)
    assert row["pair_error"] is None
    assert row["generation_errors"] == []
    assert row["usage"] == {"prompt_tokens": 30, "completion_tokens": 12}


_PAIR_FIELDS = (
    "chosen",
    "rejected",
    "chosen_model",
    "rejected_model",
    "chosen_generator",
    "rejected_generator",
    "chosen_rating",
    "rejected_rating",
)


def test_two_generators_of_one_model_are_told_apart_by_their_names() -> None:
    # Two entries serving one model with other params (say temperature 0.2 and 1.0):
    # the served name is the same, the generator entry says which won.
    row = _row(
        generation_models=["qwen", "qwen", "input"],
        generators=["cold", "hot", None],
        ratings=[2, 5, 3],
    )
    assert (row["chosen_model"], row["rejected_model"]) == ("qwen", "qwen")
    assert (row["chosen_generator"], row["rejected_generator"]) == ("hot", "cold")
    brought = _row(generators=["cold", "hot", None], ratings=[3, 1, 5])
    assert (brought["chosen_generator"], brought["rejected_generator"]) == (None, "hot")
    with pytest.raises(ValueError, match="generators for 3 generations"):
        _row(generators=["cold"])


def test_an_unpaired_row_keeps_its_ratings() -> None:
    row = _row(ratings=[3, 3, None], rationales=["a", "b", None])
    assert row["ratings"] == [3, 3, None]
    assert row["rationales"] == ["a", "b", None]
    assert all(row[k] is None for k in _PAIR_FIELDS)
    assert row["pair_error"] == "all ratings are equal (3)"
    assert list(row) == ["source", "lang", *ROW_KEYS]


def test_no_judge_carries_generations_only() -> None:
    row = _row(judged=False, ratings=None, rationales=None)
    assert list(row) == ["source", "lang", *ROW_KEYS]
    assert row["generations"] == ["Red.", "Blue, probably.", "Green!"]
    assert row["ratings"] is None
    assert row["rationales"] is None
    assert all(row[k] is None for k in _PAIR_FIELDS)
    assert row["pair_error"] == NO_JUDGE == "no judge configured"


def test_no_judge_ignores_stray_ratings() -> None:
    row = _row(judged=False)
    assert row["ratings"] is None
    assert row["pair_error"] == NO_JUDGE


def test_a_failed_generation_is_never_paired() -> None:
    errors = [{"index": 1, "model": "b", "error": "HTTP 400: context too long"}]
    row = _row(
        generations=["Red.", None, "Green!"],
        ratings=[4, 1, 5],
        generation_errors=errors,
    )
    assert row["generations"] == ["Red.", None, "Green!"]
    assert row["rejected"] == [{"role": "assistant", "content": "Red."}]
    assert row["chosen_model"] == "c"
    assert row["generation_errors"] == errors


def test_failed_generations_leave_too_few_to_pair() -> None:
    row = _row(generations=["Red.", None, None], ratings=[4, None, None])
    assert row["pair_error"] == "fewer than two rated generations (1 of 3 rated)"


def test_colliding_extra_fields_are_dropped() -> None:
    row = _row(extra={"chosen": "theirs", "usage": 1, "id": "x", "keep": True})
    assert list(row) == ["keep", *ROW_KEYS]
    assert row["id"] == "row-7"
    assert row["chosen"] == [{"role": "assistant", "content": "Green!"}]


def test_the_row_does_not_share_the_caller_s_containers() -> None:
    prompt = [{"role": "user", "content": "hi"}]
    usage = {"prompt_tokens": 1}
    row = _row(prompt=prompt, usage=usage)
    row["prompt"][0]["content"] = "changed"
    row["usage"]["prompt_tokens"] = 99
    assert prompt[0]["content"] == "hi"
    assert usage == {"prompt_tokens": 1}


@pytest.mark.parametrize(
    "overrides",
    [
        {"generation_models": ["a", "b"]},
        {"ratings": [1, 2]},
        {"rationales": ["x"]},
        {"ratings": None},
        {"rationales": None},
    ],
)
def test_mismatched_lengths_are_refused(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        _row(**overrides)
