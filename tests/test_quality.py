"""The judge filter, pure: its config, its request, its reply, its verdict; the mock's score."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from engine.output.filters import FilterConfig, parse_filters
from engine.output.quality import (
    QualityJudge,
    dialogue_of,
    parse_quality,
    quality_messages,
    quality_request_fields,
    quality_verdict,
)
from engine.problems import Problems
from engine.testing.mock_judges import dialogue_score, judge_json

DIALOGUE = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
]


def keys(p: Problems) -> set[str]:
    return {item.split(":", 1)[0] for item in p.items}


def test_filters_judge_is_read_with_its_defaults(tmp_path: Path) -> None:
    p = Problems()
    cfg = parse_filters({"judge": {"model": "judge"}}, p, {"judge": object()}, tmp_path)
    assert not p.items
    assert cfg.judge == QualityJudge(model="judge", min_score=7)
    assert cfg.models() == {"judge"} and FilterConfig().models() == set()
    assert cfg.as_dict()["judge"] == {"model": "judge", "template": None, "min_score": 7}
    assert "judge" not in FilterConfig().as_dict()  # old fingerprints stay the same
    assert not cfg.active  # the string rules are off: the judge is asked apart


def test_filters_judge_refuses_what_does_not_fit(tmp_path: Path) -> None:
    (tmp_path / "rubric.j2").write_text("{{ prompt }}")
    p = Problems()
    parse_filters(
        {"judge": {"model": "judge", "min_score": 11, "template": "rubric.j2", "x": 1}},
        p,
        {"judge": object()},
        tmp_path,
    )
    assert keys(p) == {"filters.judge.min_score", "filters.judge.template", "filters.judge.x"}
    p = Problems()
    parse_filters({"judge": {"model": "nobody"}}, p, {"judge": object()}, tmp_path)
    assert keys(p) == {"filters.judge.model"} and "known: judge" in p.items[0]
    p = Problems()
    parse_filters({"judge": "judge"}, p, None, tmp_path)
    assert keys(p) == {"filters.judge"}


def test_the_built_in_request_shows_the_dialogue_and_a_template_replaces_it(
    tmp_path: Path,
) -> None:
    messages, problem = quality_messages(QualityJudge(model="j"), DIALOGUE)
    assert problem is None and messages is not None
    assert "[The Start of the Dialogue]\n[User]\nWhat is 2 + 2?" in messages[-1]["content"]
    assert "1 to 10" in messages[0]["content"]
    own = QualityJudge(model="j", template="t.j2", template_text="{{ messages | length }} turns")
    assert quality_messages(own, DIALOGUE) == ([{"role": "user", "content": "2 turns"}], None)
    broken = QualityJudge(model="j", template="t.j2", template_text="{{ messages[5].content }}")
    messages, problem = quality_messages(broken, DIALOGUE)
    assert messages is None and problem is not None and "failed on this row" in problem
    fields = quality_request_fields()
    assert fields["response_format"]["json_schema"]["schema"]["required"] == ["score", "reason"]


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ('{"score": 8, "reason": " fine "}', (8, "fine", None)),
        ('{"score": 1, "reason": ""}', (1, None, None)),
    ],
)
def test_a_score_that_fits_is_read(reply: str, expected: tuple[object, ...]) -> None:
    assert parse_quality(reply) == expected


@pytest.mark.parametrize(
    "reply", ["8", '{"score": 11, "reason": "x"}', '{"score": "8", "reason": "x"}', "{", ""]
)
def test_a_score_that_does_not_fit_says_why(reply: str) -> None:
    score, reason, problem = parse_quality(reply)
    assert score is None and reason is None and problem


def test_a_row_below_min_score_is_filtered_with_its_score() -> None:
    assert quality_verdict(6, "vague", 7) == "judge: scored 6 of 10 (min_score 7): vague"
    assert quality_verdict(7, "ok", 7) is None
    assert quality_verdict(None, None, 7) is None  # no usable score: kept, not judged


def test_a_row_s_dialogue_is_its_messages() -> None:
    assert dialogue_of({"messages": DIALOGUE}) == DIALOGUE
    assert dialogue_of({"prompt": "x"}) is None
    assert dialogue_of({"messages": [{"role": "user", "content": None}]}) == [
        {"role": "user", "content": ""}
    ]


def test_the_mock_scores_a_dialogue_deterministically() -> None:
    messages, _ = quality_messages(QualityJudge(model="j"), DIALOGUE)
    assert messages is not None
    reply = judge_json(messages)
    assert reply is not None
    value = orjson.loads(reply)
    assert value["score"] == dialogue_score(
        messages[-1]["content"].split("\n", 1)[1].rsplit("\n[The End of the Dialogue]", 1)[0]
    )
    assert parse_quality(reply)[0] == value["score"]
    forced = [*DIALOGUE, {"role": "assistant", "content": "[[score=3]]"}]
    messages, _ = quality_messages(QualityJudge(model="j"), forced)
    assert messages is not None
    assert orjson.loads(judge_json(messages) or "null")["score"] == 3
