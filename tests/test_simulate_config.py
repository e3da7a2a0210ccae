"""distill.user: the simulated user's config section; every problem names its key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from engine.config import RunConfig, parse_config
from engine.errors import ConfigError
from engine.tasks.distill import KIND, UserConfig

EXAMPLE = """
task: distill
input: in.jsonl
output: out/distilled.jsonl
models:
  teacher: {base_url: "http://127.0.0.1:8080/v1", model: big}
  asker: {base_url: "http://127.0.0.1:8081/v1", model: small}
distill:
  model: teacher
  user:
    model: asker
    turns: 4
    system_prompt: "You are a curious student. Ask one short follow-up question."
"""


def config(**user: Any) -> dict[str, Any]:
    raw = yaml.safe_load(EXAMPLE)
    raw["distill"]["user"].update(user)
    raw["distill"]["user"] = {k: v for k, v in raw["distill"]["user"].items() if v != "-"}
    return dict(raw)


def parse(raw: dict[str, Any]) -> RunConfig:
    return parse_config(raw, Path("/cfg/job.yaml"), {})


def problems(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(raw)
    return info.value.problems


def test_the_contract_example_parses_with_its_defaults() -> None:
    run = parse(config())
    user = KIND.section(run).user
    assert user == UserConfig(
        model="asker",
        turns=4,
        system_prompt="You are a curious student. Ask one short follow-up question.",
        template=None,
        end_marker="[END]",
        max_similar=0.9,
    )
    assert run.models_used() == {"teacher", "asker"}
    fields = KIND.section_fields(KIND.section(run))
    assert fields["user"]["turns"] == 4 and fields["user"]["max_similar"] == 0.9


def test_without_user_the_fingerprint_is_as_before() -> None:
    raw = config()
    del raw["distill"]["user"]
    assert "user" not in KIND.section_fields(KIND.section(parse(raw)))


def test_a_template_instead_of_a_system_prompt() -> None:
    raw = config(system_prompt="-", template="You are {{ persona }}.", end_marker=None)
    user = KIND.section(parse(raw)).user
    assert user is not None and user.template == "You are {{ persona }}."
    assert user.system_prompt is None and user.end_marker is None


@pytest.mark.parametrize(
    ("user", "key", "words"),
    [
        ({"template": "x"}, "distill.user.system_prompt", "both set"),
        ({"system_prompt": "-"}, "distill.user.system_prompt", "missing"),
        ({"system_prompt": "-", "template": "{% if %}"}, "distill.user.template", "compile"),
        ({"turns": "-"}, "distill.user.turns", "missing"),
        ({"turns": 0}, "distill.user.turns", "positive"),
        ({"model": "nobody"}, "distill.user.model", "not defined"),
        ({"max_similar": 0}, "distill.user.max_similar", "above 0"),
        ({"max_similar": 1.5}, "distill.user.max_similar", "at most 1"),
        ({"end_marker": ""}, "distill.user.end_marker", "non-empty"),
        ({"persona": "x"}, "distill.user.persona", "unknown key"),
    ],
)
def test_each_problem_names_its_key(user: dict[str, Any], key: str, words: str) -> None:
    found = problems(config(**user))
    assert len(found) == 1, found
    assert found[0].startswith(f"{key}:") and words in found[0], found


def test_user_must_be_a_mapping() -> None:
    raw = config()
    raw["distill"]["user"] = "asker"
    assert problems(raw) == ["distill.user: must be a mapping of keys, got str"]


def test_the_card_and_status_name_the_simulator() -> None:
    run = parse(config())
    section = KIND.section(run)
    assert "`small` played the user" in KIND.card_text(run)
    assert "up to 4 user messages" in KIND.card_text(run)
    assert "`simulated_turns`" in KIND.card_usage(run, pairs_only=False)
    assert "simulated user (model asker)" in KIND.describe(section)
