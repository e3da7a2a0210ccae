"""The judge request template and the reply parsers (free text and JSON)."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator

from engine.tasks.preference import judge
from engine.tasks.preference.judge import (
    ASPECTS,
    JSON,
    has_usable_rating,
    judge_messages,
    parse_ratings,
)
from engine.tasks.preference.judge_json import (
    parse_json_ratings,
    ratings_response_format,
    ratings_schema,
)
from engine.testing import mock_replies

PROMPT = [{"role": "user", "content": "Name three primary colours."}]


def _user(messages: list[dict[str, str]]) -> str:
    assert [m["role"] for m in messages] == ["system", "user"]
    return messages[1]["content"]


def _mock_extract(text: str, i: int) -> str | None:
    """Cut candidate i the way the mock server does: after ``<text i>`` up to the
    next ``<text j>`` tag, a line starting with ``###``, or the end."""
    start = text.find(f"<text {i}>")
    if start < 0:
        return None
    rest = text[start + len(f"<text {i}>") :]
    stop = re.search(r"<text \d+>|^###", rest, re.MULTILINE)
    return (rest[: stop.start()] if stop else rest).strip()


# --- the request ---------------------------------------------------------------


def test_the_aspects_are_the_ones_the_readme_documents() -> None:
    assert ASPECTS == ("overall", "helpfulness", "honesty", "instruction-following", "truthfulness")
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    documented = re.search(r"^\s*aspect: overall\s+# (.+)$", readme, re.MULTILINE)
    assert documented is not None, "the README no longer documents preference.aspect"
    assert tuple(documented.group(1).strip().split(" | ")) == ASPECTS


@pytest.mark.parametrize("aspect", ASPECTS)
def test_each_aspect_has_a_rubric_that_the_prompt_includes(aspect: str) -> None:
    rubric = judge._RUBRICS[aspect]
    assert rubric.strip()
    assert rubric in _user(judge_messages(PROMPT, ["a", "b"], aspect))


def test_an_aspect_without_a_rubric_is_refused() -> None:
    assert set(judge._RUBRICS) == set(ASPECTS)
    with pytest.raises(ValueError, match="unknown judge aspect 'style'"):
        judge_messages(PROMPT, ["a", "b"], "style")


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_each_candidate_has_its_tag_at_a_line_start(n: int) -> None:
    candidates = [f"answer number {i}" for i in range(1, n + 1)]
    user = _user(judge_messages(PROMPT, candidates, "overall"))
    for i in range(1, n + 1):
        assert user.count(f"<text {i}>") == 1
        assert re.search(rf"^<text {i}> answer number {i}$", user, re.MULTILINE)
    assert f"<text {n + 1}>" not in user


def test_candidates_come_back_exactly_through_the_mock_cut() -> None:
    candidates = ["Red, yellow, blue.", "Line one\nline two\n\nline four", "", "RGB"]
    user = _user(judge_messages(PROMPT, candidates, "helpfulness"))
    assert [_mock_extract(user, i) for i in range(1, 5)] == [c.strip() for c in candidates]


def test_what_follows_the_last_candidate_starts_with_a_heading() -> None:
    user = _user(judge_messages(PROMPT, ["a", "b"], "overall"))
    tail = user.split("<text 2> b", 1)[1]
    lines = [line for line in tail.splitlines() if line.strip()]
    assert lines and lines[0].startswith("###")


def test_the_answer_format_is_asked_for() -> None:
    user = _user(judge_messages(PROMPT, ["a", "b", "c"], "overall"))
    assert "#### Output for Text 1" in user
    assert "Rating:" in user
    assert "Rationale:" in user
    assert "1 to 5" in user


_WORDING = {
    "overall": "General Text Quality Assessment",
    "helpfulness": "Informativeness / Helpfulness Assessment",
    "honesty": "Honesty and Uncertainty Expression Assessment",
    "instruction-following": "Instruction Following Assessment",
    "truthfulness": "Truthfulness and Hallucination Assessment",
}


@pytest.mark.parametrize("aspect", ASPECTS)
def test_the_rubric_is_the_aspect_s_own(aspect: str) -> None:
    user = _user(judge_messages(PROMPT, ["a", "b"], aspect))
    assert user.splitlines()[0] == f"# {_WORDING[aspect]}"
    for other, heading in _WORDING.items():
        if other != aspect:
            assert heading not in user


@pytest.mark.parametrize(
    ("aspect", "phrase"),
    [
        ("overall", "holistic"),
        ("helpfulness", "Outstandingly Helpful"),
        ("honesty", "Confidently Incorrect"),
        ("instruction-following", "Comprehensive Compliance"),
        ("truthfulness", "No Hallucination"),
    ],
)
def test_the_scale_is_the_aspect_s_own(aspect: str, phrase: str) -> None:
    for other in ASPECTS:
        user = _user(judge_messages(PROMPT, ["a", "b"], other))
        assert (phrase in user) == (other == aspect)


def test_rubrics_differ_per_aspect() -> None:
    users = {_user(judge_messages(PROMPT, ["a", "b"], a)) for a in ASPECTS}
    assert len(users) == len(ASPECTS)


def test_only_honesty_allows_not_applicable() -> None:
    assert "N/A" in _user(judge_messages(PROMPT, ["a"], "honesty"))
    assert "N/A" not in _user(judge_messages(PROMPT, ["a"], "truthfulness"))


def test_single_turn_prompt_is_the_instruction() -> None:
    user = _user(judge_messages(PROMPT, ["a", "b"], "overall"))
    assert "Instruction: Name three primary colours." in user
    assert "Context" not in user


def test_multi_turn_prompt_shows_earlier_turns_as_context() -> None:
    prompt = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And times 3?"},
    ]
    user = _user(judge_messages(prompt, ["12", "7"], "overall"))
    context = user.index("Context")
    assert context < user.index("You are terse.") < user.index("What is 2+2?")
    assert user.index("What is 2+2?") < user.index("Instruction: And times 3?")
    assert "[Assistant]\n4" in user
    assert user.index("Instruction: And times 3?") < user.index("<text 1> 12")


def test_system_message_counts_the_texts() -> None:
    system = judge_messages(PROMPT, ["a", "b", "c"], "overall")[0]["content"]
    assert "3 text outputs" in system


@pytest.mark.parametrize(
    ("prompt", "candidates", "aspect"),
    [
        (PROMPT, ["a"], "style"),
        (PROMPT, [], "overall"),
        ([], ["a"], "overall"),
        (
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            ["a"],
            "overall",
        ),
    ],
)
def test_bad_requests_are_refused(
    prompt: list[dict[str, str]], candidates: list[str], aspect: str
) -> None:
    with pytest.raises(ValueError):
        judge_messages(prompt, candidates, aspect)


# --- the reply -------------------------------------------------------------------


def test_the_plain_format() -> None:
    reply = (
        "#### Output for Text 1\nRating: 4\nRationale: Correct and clear.\n\n"
        "#### Output for Text 2\nRating: 2\nRationale: Misses a colour.\n"
    )
    assert parse_ratings(reply, 2) == ([4, 2], ["Correct and clear.", "Misses a colour."])


def test_extra_whitespace_and_blank_lines() -> None:
    reply = (
        "\n\n   #### Output for Text 1   \n\n\n  Rating:    5   \n\n"
        "   Rationale:   Great.   \n\n\n#### Output for Text 2\n\tRating:\t3\n\tRationale:\tOk.\n\n"
    )
    assert parse_ratings(reply, 2) == ([5, 3], ["Great.", "Ok."])


@pytest.mark.parametrize(
    "block",
    [
        "#### **Output for Text 1**\n**Rating:** 4\n**Rationale:** Fine.",
        "**Output for Text 1**\n**Rating**: 4\n**Rationale**: Fine.",
        "### Output for Text 1:\n- **Rating:** **4**\n- **Rationale:** Fine.",
        "## output for text 1\nrating: 4\nrationale: Fine.",
        "#### OUTPUT FOR TEXT 1\nRATING: 4\nRATIONALE: Fine.",
        "#### Output for Text 1\nRating: 4/5\nRationale: Fine.",
        "#### Output for Text 1\nRating: 4 / 5\nRationale: Fine.",
        "#### Output for Text 1\nRating: 4 out of 5\nRationale: Fine.",
        "#### Output for Text 1\nRating: 4 (good)\nRationale: Fine.",
        "#### Output for Text 1\nRating: [4]\nRationale: Fine.",
        "#### Output for Text 1\nRating: 4.\nRationale: Fine.",
        "#### Output for Text 1\nRating: 4.0\nRationale: Fine.",
        "#### Output for Text 1\nRating: Four\nRationale: Fine.",
        "#### Output for Text 1\nRating:\n4\nRationale: Fine.",
        "#### Output for Text 1\r\nRating: 4\r\nRationale: Fine.\r\n",
        "#### Output for Text 1\rRating: 4\rRationale: Fine.\r",
        "> #### Output for Text 1\n> Rating: 4\n> Rationale: Fine.",
        "Sure! Here are my ratings.\n\n#### Output for Text 1\nRating: 4\nRationale: Fine.\n---",
    ],
)
def test_messy_but_readable_blocks(block: str) -> None:
    assert parse_ratings(block, 1) == ([4], ["Fine."])


@pytest.mark.parametrize(
    "value", ["N/A", "n/a", "0", "6", "10", "-1", "4.5", "3/10", "good", "", "**", "99999999"]
)
def test_unusable_ratings_are_none(value: str) -> None:
    ratings, rationales = parse_ratings(f"#### Output for Text 1\nRating: {value}\nRationale: R", 1)
    assert ratings == [None]
    assert rationales == ["R"]


def test_missing_rationale_is_none() -> None:
    reply = "#### Output for Text 1\nRating: 3\n#### Output for Text 2\nRating: 5\nRationale: Y"
    assert parse_ratings(reply, 2) == ([3, 5], [None, "Y"])


def test_empty_rationale_is_none() -> None:
    assert parse_ratings("#### Output for Text 1\nRating: 3\nRationale:   \n", 1) == ([3], [None])


def test_missing_block_is_none() -> None:
    reply = "#### Output for Text 1\nRating: 3\nRationale: A\n#### Output for Text 3\nRating: 1"
    assert parse_ratings(reply, 3) == ([3, None, 1], ["A", None, None])


def test_blocks_in_any_order() -> None:
    reply = (
        "#### Output for Text 3\nRating: 1\nRationale: C\n"
        "#### Output for Text 1\nRating: 5\nRationale: A\n"
        "#### Output for Text 2\nRating: 3\nRationale: B\n"
    )
    assert parse_ratings(reply, 3) == ([5, 3, 1], ["A", "B", "C"])


def test_blocks_beyond_n_are_ignored() -> None:
    reply = "#### Output for Text 1\nRating: 2\n#### Output for Text 2\nRating: 5\n"
    assert parse_ratings(reply, 1) == ([2], [None])
    assert parse_ratings("#### Output for Text 0\nRating: 2\n", 1) == ([None], [None])


def test_a_repeated_block_keeps_the_first_usable_rating() -> None:
    reply = (
        "#### Output for Text 1\nRating: N/A\nRationale: first\n"
        "#### Output for Text 1\nRating: 4\nRationale: second\n"
        "#### Output for Text 1\nRating: 1\nRationale: third\n"
    )
    assert parse_ratings(reply, 1) == ([4], ["second"])


def test_multi_line_rationale_stops_at_the_next_field_or_rule() -> None:
    reply = (
        "#### Output for Text 1\nRating: 4\nRationale: Good.\n- point one\n- point two\n\n"
        "---\nOverall, text 1 wins."
    )
    assert parse_ratings(reply, 1) == ([4], ["Good.\n- point one\n- point two"])


def test_truthfulness_layout_takes_the_rationale_after_the_rating() -> None:
    reply = (
        "#### Output for Text 1\nType: 1, 3\nRationale: Wrong capital.\n"
        "Rating: 2\nRationale: Severe factual error.\n"
    )
    assert parse_ratings(reply, 1) == ([2], ["Severe factual error."])


def test_rationale_before_the_rating_is_the_fallback() -> None:
    reply = "#### Output for Text 1\nRationale: Solid.\nRating: 5\n"
    assert parse_ratings(reply, 1) == ([5], ["Solid."])


def test_no_headers_but_exactly_n_rating_lines() -> None:
    reply = "Rating: 5\nRationale: A\n\nRating: 2\nRationale: B\n\nRating: 3"
    assert parse_ratings(reply, 3) == ([5, 2, 3], ["A", "B", None])


def test_no_headers_and_a_wrong_count_of_rating_lines() -> None:
    reply = "Rating: 5\nRationale: A\nRating: 2\n"
    assert parse_ratings(reply, 3) == ([None] * 3, [None] * 3)


@pytest.mark.parametrize("reply", ["", "   ", "I cannot rate these.", "\x00\x01", "🙂" * 50])
def test_unreadable_replies_give_nones(reply: str) -> None:
    assert parse_ratings(reply, 2) == ([None, None], [None, None])


def test_n_of_zero() -> None:
    assert parse_ratings("#### Output for Text 1\nRating: 4", 0) == ([], [])


def test_huge_numbers_do_not_raise() -> None:
    digits = "9" * 5000
    reply = (
        f"#### Output for Text {digits}\nRating: {digits}\n#### Output for Text 1\nRating: {digits}"
    )
    assert parse_ratings(reply, 1) == ([None], [None])


_FRAGMENTS = [
    "#### Output for Text 1",
    "#### Output for Text 2",
    "**Output for Text 3**",
    "output for text ",
    "Output for Text 99999999999999999999",
    "Rating:",
    "**Rating:**",
    "RATING: ",
    "Rationale:",
    "**Rationale**:",
    "Type: 1",
    " 4",
    " 5/5",
    " N/A",
    " 0",
    " 4.5",
    "3 out of 10",
    "(good)",
    "[",
    "]",
    "**",
    "__",
    "---",
    "###",
    "#",
    "\n",
    "\r\n",
    "\r",
    "\t",
    " ",
    "Four",
    "text",
    "<text 1>",
    "é",
    "\x00",
    "1" * 400,
    ".",
    "/",
]


def test_random_fragment_soup_never_raises() -> None:
    rng = random.Random(20240601)
    for _ in range(500):
        reply = "".join(rng.choice(_FRAGMENTS) for _ in range(rng.randint(0, 40)))
        n = rng.randint(0, 5)
        ratings, rationales = parse_ratings(reply, n)
        assert len(ratings) == len(rationales) == n
        assert all(r is None or (isinstance(r, int) and 1 <= r <= 5) for r in ratings)
        assert all(r is None or (isinstance(r, str) and r) for r in rationales)


def test_random_bytes_never_raise() -> None:
    rng = random.Random(7)
    for _ in range(200):
        reply = "".join(chr(rng.randint(0, 0x2FFF)) for _ in range(rng.randint(0, 200)))
        assert len(parse_ratings(reply, 3)[0]) == 3


def test_round_trip_through_the_mock_judge() -> None:
    candidates = ["Red, yellow and blue.", "Cyan\nmagenta\nyellow", "I do not know.", "RGB"]
    user = _user(judge_messages(PROMPT, candidates, "overall"))
    assert mock_replies.judge_candidates(user) == list(enumerate(candidates, start=1))
    ratings, rationales = parse_ratings(mock_replies.judge_reply(user), len(candidates))
    assert ratings == [mock_replies.judge_rating(c) for c in candidates]
    assert all(r is not None and r.startswith("The mock judge") for r in rationales)


def test_has_usable_rating() -> None:
    assert has_usable_rating([None, 3])
    assert has_usable_rating([1])
    assert not has_usable_rating([None, None])
    assert not has_usable_rating([])


# --- judge_format: json ------------------------------------------------------------


def _json_ratings(*entries: tuple[Any, Any]) -> str:
    return orjson.dumps({"ratings": [{"rating": r, "rationale": t} for r, t in entries]}).decode()


def test_the_json_request_asks_for_the_schema_s_shape_and_keeps_the_candidates_exact() -> None:
    candidates = ["Red, yellow, blue.", "Line one\nline two", "RGB"]
    user = _user(judge_messages(PROMPT, candidates, "helpfulness", judge_format=JSON))

    assert '{"ratings": [{"rating": <an integer from 1 to 5>' in user
    assert 'exactly 3 entries in "ratings"' in user
    assert "#### Output for Text" not in user and "Rationale:" not in user
    assert judge._RUBRICS["helpfulness"] in user
    assert mock_replies.judge_candidates(user) == list(enumerate(candidates, start=1))
    with pytest.raises(ValueError, match="unknown judge format 'xml'"):
        judge_messages(PROMPT, candidates, "overall", judge_format="xml")


def test_the_response_format_carries_a_strict_schema_of_exactly_n_ratings() -> None:
    body = ratings_response_format(3)
    assert body["type"] == "json_schema"
    assert body["json_schema"]["name"] == "ratings" and body["json_schema"]["strict"] is True
    schema = body["json_schema"]["schema"]
    assert schema == ratings_schema(3)
    Draft202012Validator.check_schema(schema)
    ratings = schema["properties"]["ratings"]
    assert ratings["minItems"] == ratings["maxItems"] == 3
    assert ratings["items"]["required"] == ["rating", "rationale"]


def test_a_json_reply_that_fits_gives_every_rating_and_rationale() -> None:
    reply = _json_ratings((4, " clear and right "), (1, "wrong"), (5.0, "best"))
    assert parse_json_ratings(reply, 3) == ([4, 1, 5], ["clear and right", "wrong", "best"], None)
    assert parse_json_ratings(_json_ratings((2, "  ")), 1) == ([2], [None], None)


@pytest.mark.parametrize(
    ("reply", "fragment"),
    [
        ("Sure! Here is the JSON: {not json", "the reply is not JSON"),
        ("", "the reply is not JSON"),
        (_json_ratings((4, "a")), "is too short"),
        (_json_ratings((4, "a"), (3, "b"), (2, "c")), "is too long"),
        (_json_ratings((4, "a"), (6, "b")), "is not one of"),
        (_json_ratings((0, "a"), (3, "b")), "is not one of"),
        (_json_ratings((True, "a"), (3, "b")), "(at $.ratings[0].rating)"),
        (_json_ratings((3.5, "a"), (3, "b")), "(at $.ratings[0].rating)"),
        (_json_ratings(("4", "a"), (3, "b")), "(at $.ratings[0].rating)"),
        (_json_ratings((4, None), (3, "b")), "(at $.ratings[0].rationale)"),
        ('{"ratings": [{"rating": 4}, {"rating": 3, "rationale": "b"}]}', "'rationale'"),
        ('{"ratings": [], "extra": 1}', "ratings schema"),
        ("[4, 3]", "ratings schema"),
    ],
)
def test_a_json_reply_that_does_not_fit_rates_nothing_and_says_why(
    reply: str, fragment: str
) -> None:
    ratings, rationales, problem = parse_json_ratings(reply, 2)
    assert ratings == [None, None] and rationales == [None, None]
    assert problem is not None and fragment in problem, problem
    assert not has_usable_rating(ratings)


def test_the_mock_s_structured_reply_parses() -> None:
    user = _user(judge_messages(PROMPT, ["a", "b"], "overall", judge_format=JSON))
    seed = mock_replies.judge_reply(user)
    reply = orjson.dumps(mock_replies.json_reply(ratings_schema(2), seed)).decode()

    ratings, rationales, problem = parse_json_ratings(reply, 2)

    assert problem is None
    # The mock fills every entry from one seed text, so its ratings are all equal.
    assert ratings == [1 + len(f"{seed} ratings rating") % 5] * 2
    assert rationales == [f"{seed} ratings rationale"] * 2


def test_zero_candidates_parse_to_nothing() -> None:
    assert parse_json_ratings("{}", 0) == ([], [], None)
