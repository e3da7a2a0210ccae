"""Pairwise judging, pure: verdict parsing, order correction, the round robin, flips."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from engine.problems import Problems
from engine.tasks.preference import KIND, PairwiseConfig
from engine.tasks.preference.pairs import JUDGEMENTS_KEY, preference_row
from engine.tasks.preference.pairwise import (
    AB,
    BA,
    ORDER_DEPENDENT,
    Judgement,
    flip_rate,
    flips_of,
    judge_pair_messages,
    pair_key,
    pairs_of,
    parse_verdict,
    score,
    verdict_schema,
    won_by,
)
from engine.testing.mock_judges import judge_json, pairwise_verdict, unbiased_winner

PROMPT = [{"role": "user", "content": "Name the primary colours."}]


def verdict(winner: str, rationale: str = "because") -> str:
    return orjson.dumps({"winner": winner, "rationale": rationale}).decode()


@pytest.mark.parametrize("winner", ["A", "B", "tie"])
def test_a_verdict_that_fits_the_schema_is_read(winner: str) -> None:
    assert parse_verdict(verdict(winner, "  A is right. ")) == (winner, "A is right.", None)


@pytest.mark.parametrize(
    "reply",
    [
        "A is better",  # not JSON
        '{"winner": "C", "rationale": "x"}',  # not one of A, B, tie
        '{"winner": "a", "rationale": "x"}',  # case matters: the schema's enum
        '{"winner": "A"}',  # no rationale
        '{"winner": "A", "rationale": "x", "score": 3}',  # a key the schema forbids
        "",
        '{"winner": "A", "rationale": "x"',  # cut off
    ],
)
def test_an_unparsable_verdict_says_why_and_never_raises(reply: str) -> None:
    winner, rationale, problem = parse_verdict(reply)
    assert winner is None and rationale is None
    assert problem is not None


def test_the_schema_is_strict_and_an_empty_rationale_reads_as_none() -> None:
    schema = verdict_schema()
    assert schema["required"] == ["winner", "rationale"]
    assert schema["additionalProperties"] is False
    assert parse_verdict(verdict("tie", "   ")) == ("tie", None, None)


@pytest.mark.parametrize(
    ("order", "winner", "expected"),
    [(AB, "A", 0), (AB, "B", 1), (BA, "A", 1), (BA, "B", 0), (AB, "tie", None), (BA, None, None)],
)
def test_order_correction_names_the_candidate(order: str, winner: str, expected: int) -> None:
    assert won_by(0, 1, order, winner) == expected


def both(a: int, b: int, ab: str, ba: str) -> list[Judgement]:
    return [Judgement(a, b, AB, ab, None), Judgement(a, b, BA, ba, None)]


def test_a_verdict_that_survives_the_swap_picks_the_pair() -> None:
    # Candidate 1 wins in both orders: B when shown second, A when shown first.
    outcome = score(2, both(0, 1, "B", "A"))
    assert (outcome.chosen, outcome.rejected, outcome.error) == (1, 0, None)
    assert outcome.flipped == () and outcome.both_orders == 1 and not outcome.drop


def test_a_verdict_that_flips_with_the_order_is_a_tie_or_a_drop() -> None:
    # "A" both times: the judge picked whichever it saw first.
    tie = score(2, both(0, 1, "A", "A"))
    assert (tie.chosen, tie.rejected, tie.error) == (None, None, ORDER_DEPENDENT)
    assert tie.flipped == ((0, 1),) and tie.points == (2, 2) and not tie.drop
    drop = score(2, both(0, 1, "B", "B"), "drop")
    assert drop.error == ORDER_DEPENDENT and drop.drop


def test_a_tie_against_a_win_is_a_flip_too() -> None:
    outcome = score(2, both(0, 1, "A", "tie"))
    assert outcome.flipped == ((0, 1),) and outcome.error == ORDER_DEPENDENT


def test_a_tie_in_both_orders_is_no_pair_but_no_flip() -> None:
    outcome = score(2, both(0, 1, "tie", "tie"))
    assert outcome.flipped == () and outcome.chosen is None
    assert outcome.error is not None and "tie" in outcome.error


def test_without_swap_one_verdict_decides() -> None:
    outcome = score(2, [Judgement(0, 1, AB, "A", None)])
    assert (outcome.chosen, outcome.rejected, outcome.both_orders) == (0, 1, 0)


def test_the_round_robin_picks_the_most_and_fewest_order_corrected_wins() -> None:
    # 2 beats 0 and 1 in both orders; 0 and 1 flip (a tie); so 0 and 1 tie for worst,
    # and the earlier candidate (0) is rejected.
    judgements = both(0, 1, "A", "A") + both(0, 2, "B", "A") + both(1, 2, "B", "A")
    outcome = score(3, judgements)
    assert outcome.points == (2 + 0, 2 + 0, 4 + 4)
    assert (outcome.chosen, outcome.rejected, outcome.error) == (2, 0, None)
    assert outcome.flipped == ((0, 1),) and outcome.both_orders == 3


def test_ties_in_points_go_to_candidate_order() -> None:
    # A cycle: 0 > 1, 1 > 2, 2 > 0, every verdict consistent: all equal, no pair.
    cycle = both(0, 1, "A", "B") + both(1, 2, "A", "B") + both(0, 2, "B", "A")
    assert score(3, cycle).chosen is None
    # 0 and 1 both beat 2 and tie each other: chosen is 0, the earlier one.
    judgements = both(0, 1, "tie", "tie") + both(0, 2, "A", "B") + both(1, 2, "A", "B")
    outcome = score(3, judgements)
    assert (outcome.chosen, outcome.rejected) == (0, 2)


def test_with_drop_a_round_robin_drops_only_when_its_pair_flipped() -> None:
    keep = both(0, 1, "A", "A") + both(0, 2, "B", "A") + both(1, 2, "B", "A")
    assert not score(3, keep, "drop").drop  # 0-1 flipped, but the pair is 2 and 0
    flipped_pair = both(0, 1, "A", "B") + both(0, 2, "A", "A") + both(1, 2, "A", "B")
    outcome = score(3, flipped_pair, "drop")
    assert (outcome.chosen, outcome.rejected) == (0, 2) and outcome.drop


def test_flips_are_counted_from_written_judgements() -> None:
    written = [j.as_dict() for j in both(0, 1, "A", "A") + both(0, 2, "B", "A")]
    written.append({"a": 1, "b": 2, "order": "ab", "winner": "A", "rationale": None})
    assert flips_of(written) == (1, 2)  # 1-2 was judged in one order only
    assert flips_of(None) == (0, 0) and flips_of([1, "x", {"a": "0"}]) == (0, 0)
    assert flip_rate(1, 8) == "12.5% (1 of 8 pairs)"
    assert flip_rate(0, 0) == "no pair judged in both orders"


def test_the_request_shows_both_answers_and_the_key_names_pair_order_and_try() -> None:
    messages = judge_pair_messages(PROMPT, "Red, yellow, blue.", "RGB")
    user = messages[-1]["content"]
    assert "[The Start of Answer A]\nRed, yellow, blue.\n[The End of Answer A]" in user
    assert "[The Start of Answer B]\nRGB\n[The End of Answer B]" in user
    texts = ["x", "y", "z"]
    assert pair_key(0, 2, BA, 1, texts).startswith("pair 0-2 ba 1 ")
    assert pair_key(0, 2, BA, 1, texts) != pair_key(0, 2, BA, 1, ["x", "y", "w"])
    assert pairs_of(3) == [(0, 1), (0, 2), (1, 2)]
    with pytest.raises(ValueError):
        judge_pair_messages([{"role": "assistant", "content": "hi"}], "a", "b")


def test_the_row_keeps_every_verdict_after_the_rationales() -> None:
    judgements = [j.as_dict() for j in both(0, 1, "B", "A")]
    row = preference_row(
        extra={"judgements": "an input column of that name is dropped"},
        row_id="r",
        prompt=PROMPT,
        generations=["one", "two"],
        generation_models=["m", "m"],
        generation_errors=[],
        usage={},
        judged=True,
        ratings=[0, 4],
        rationales=[None, None],
        judgements=judgements,
    )
    keys = list(row)
    assert keys.index(JUDGEMENTS_KEY) == keys.index("rationales") + 1
    assert row[JUDGEMENTS_KEY] == judgements
    assert row["chosen"] == [{"role": "assistant", "content": "two"}]
    assert judgements[0] == {"a": 0, "b": 1, "order": "ab", "winner": "B", "rationale": None}


def test_the_mock_judge_is_unbiased_by_default_and_biased_on_request() -> None:
    first, second = "an answer [[quality=3]]", "another [[quality=9]]"
    prompt = judge_pair_messages(PROMPT, first, second)[-1]["content"]
    assert unbiased_winner(first, second) == "B"
    assert pairwise_verdict(prompt) == {
        "winner": "B",
        "rationale": "The mock judge finds answer B better.",
    }
    assert pairwise_verdict(prompt, 1.0) is not None
    assert pairwise_verdict(prompt, 1.0)["winner"] == "A"  # type: ignore[index]
    assert pairwise_verdict("no answers here") is None
    reply = judge_json([{"role": "user", "content": prompt}])
    assert reply is not None and parse_verdict(reply)[0] == "B"


def test_the_mock_s_bias_fires_for_about_its_share_of_requests() -> None:
    # Deterministic: the draw is the request's hash. 2,000 distinct pairs at P = 0.2.
    hits = 0
    for i in range(2000):
        prompt = judge_pair_messages(PROMPT, f"a{i} [[quality=1]]", f"b{i} [[quality=2]]")
        verdict_ = pairwise_verdict(prompt[-1]["content"], 0.2)
        assert verdict_ is not None
        hits += verdict_["winner"] == "A"
    assert abs(hits / 2000 - 0.2) < 0.04  # 4.5 standard errors (0.0089)


def parse_pairwise(raw: Any, tmp_path: Path) -> tuple[Any, Problems]:
    p = Problems()
    section = KIND.parse_section(raw, {"judge": object(), "a": object()}, p, tmp_path)  # type: ignore[dict-item]
    return section, p


def test_the_config_reads_pairwise_and_refuses_what_does_not_fit(tmp_path: Path) -> None:
    section, p = parse_pairwise(
        {"generators": ["a"], "judge": "judge", "judge_format": "pairwise"}, tmp_path
    )
    assert not p.items and section.pairwise == PairwiseConfig()
    fields = KIND.section_fields(section)
    assert fields["pairwise"] == {"swap": True, "template": None, "on_disagree": "tie"}

    (tmp_path / "pair.j2").write_text("{{ prompt[-1].content }} A: {{ a }} B: {{ b }}")
    raw = {
        "generators": ["a"],
        "judge": "judge",
        "judge_format": "pairwise",
        "pairwise": {"swap": False, "template": "pair.j2", "on_disagree": "drop"},
    }
    section, p = parse_pairwise(raw, tmp_path)
    assert not p.items
    assert section.pairwise.swap is False and section.pairwise.on_disagree == "drop"
    assert section.pairwise.template_text.startswith("{{ prompt")

    (tmp_path / "bad.j2").write_text("{{ generations[0] }}")
    raw["pairwise"] = {"swap": "yes", "on_disagree": "coin", "template": "bad.j2", "x": 1}
    _, p = parse_pairwise(raw, tmp_path)
    keys = {item.split(":", 1)[0] for item in p.items}
    assert {
        "preference.pairwise.swap",
        "preference.pairwise.on_disagree",
        "preference.pairwise.template",
        "preference.pairwise.x",
    } <= keys

    _, p = parse_pairwise(
        {"generators": ["a"], "judge": "judge", "pairwise": {"swap": True}}, tmp_path
    )
    assert [item.split(":", 1)[0] for item in p.items] == ["preference.pairwise"]
