"""A judge prompt of the user's own: reading, checking and rendering the template, and
the config keys that choose the judge's prompt and reply format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine.config import RunConfig, parse_config
from engine.errors import ConfigError
from engine.tasks.preference import PreferenceConfig
from engine.tasks.preference.judge_template import (
    BadTemplate,
    RenderError,
    compile_template,
    read_template,
    render_judge,
)
from engine.testing.mock_replies import judge_candidates

PROMPT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "Name a colour."},
]
TEMPLATE = """\
Rate {{ generations | length }} answers for {{ aspect }}.
{% for m in prompt %}[{{ m.role }}] {{ m.content }}
{% endfor %}
{%- for g in generations %}<text {{ loop.index }}> {{ g }}
{% endfor %}### Output
"""


def write(tmp_path: Path, text: str, name: str = "judge.j2") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- rendering -------------------------------------------------------------------


def test_the_template_gets_the_prompt_the_generations_and_the_aspect(tmp_path: Path) -> None:
    template = compile_template(read_template(write(tmp_path, TEMPLATE)))

    messages = render_judge(template, PROMPT, ["red", "blue"], "honesty")

    assert messages == [
        {
            "role": "user",
            "content": (
                "Rate 2 answers for honesty.\n"
                "[system] be brief\n"
                "[user] Name a colour.\n"
                "<text 1> red\n"
                "<text 2> blue\n"
                "### Output"  # Jinja2 drops the file's one trailing newline
            ),
        }
    ]
    # What the mock judge (and an UltraFeedback-style reader) sees as the candidates.
    assert judge_candidates(messages[0]["content"]) == [(1, "red"), (2, "blue")]


def test_rendering_leaves_the_callers_values_alone() -> None:
    template = compile_template("{{ prompt[0].content }} {{ generations[0] }}")
    prompt = [{"role": "user", "content": "q"}]
    generations = ["a"]

    assert render_judge(template, prompt, generations, "overall")[0]["content"] == "q a"
    with pytest.raises(RenderError, match="judge template failed"):
        render_judge(compile_template("{{ generations.append('x') }}"), prompt, generations, "x")
    assert generations == ["a"] and prompt == [{"role": "user", "content": "q"}]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("{{ generations[5] }}", "judge template failed on this row"),  # past the last one
        ("{{ ''.__class__.__mro__ }}", "judge template failed on this row"),  # the sandbox
        ("{% if false %}x{% endif %}  ", "rendered empty text"),
    ],
    ids=["undefined_index", "sandbox", "empty"],
)
def test_a_template_that_fails_on_a_row_says_why(text: str, fragment: str) -> None:
    with pytest.raises(RenderError, match=fragment):
        render_judge(compile_template(text), PROMPT, ["a", "b"], "overall")


# --- reading and checking ----------------------------------------------------------


def test_a_syntax_error_names_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, "line one\n{% for g in generations %}\n{{ g }\n")

    with pytest.raises(BadTemplate) as info:
        read_template(path)

    assert info.value.line == 3
    assert str(info.value).startswith(f"{path}, line 3: the template does not compile: ")
    assert str(info.value).endswith("fix that line")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("{{ generation }} {{ row.x }}", "uses 'generation', 'row', which the judge template"),
        ("   \n", "is empty; write the judge's prompt in it"),
        (None, "cannot read"),
    ],
    ids=["unknown_variable", "empty", "missing"],
)
def test_a_template_that_cannot_be_used_is_refused(
    tmp_path: Path, text: str | None, fragment: str
) -> None:
    path = tmp_path / "judge.j2"
    if text is not None:
        path.write_text(text)
    with pytest.raises(BadTemplate, match=fragment):
        read_template(path)


def test_globals_loops_and_set_names_are_not_unknown_variables(tmp_path: Path) -> None:
    text = "{% set k = generations | length %}{% for i in range(k) %}{{ loop.index }}{% endfor %}"
    assert read_template(write(tmp_path, text)) == text


# --- the config keys -------------------------------------------------------------


def config(folder: Path, **section: Any) -> RunConfig:
    raw = {
        "task": "preference",
        "input": "in.jsonl",
        "output": "out.jsonl",
        "models": {
            "a": {"base_url": "http://a.example/v1", "model": "m-a"},
            "judge": {"base_url": "http://j.example/v1", "model": "m-j"},
        },
        "preference": section,
    }
    return parse_config(raw, folder / "job.yaml", {})


def problems(folder: Path, **section: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config(folder, **section)
    return info.value.problems


def test_the_template_is_read_relative_to_the_configs_folder(tmp_path: Path) -> None:
    (tmp_path / "prompts").mkdir()
    write(tmp_path / "prompts", TEMPLATE)

    parsed = config(tmp_path, generators=["a"], judge="judge", judge_template="prompts/judge.j2")

    assert parsed.section == PreferenceConfig(
        generators=("a",),
        judge="judge",
        judge_template="prompts/judge.j2",
        judge_template_text=TEMPLATE,
    )
    fields = parsed.fingerprint_fields()["preference"]
    assert fields["judge_template"] == TEMPLATE  # the text: editing the file is a change
    assert "judge_format" not in fields  # the default leaves old fingerprints as they were
    card = parsed.kind.card_text(parsed)
    assert "Jinja2 judge template `prompts/judge.j2`" in card
    assert "free-text UltraFeedback blocks" in card


def test_judge_format_json_is_in_the_fingerprint_and_the_card(tmp_path: Path) -> None:
    plain = config(tmp_path, generators=["a"], judge="judge")
    parsed = config(tmp_path, generators=["a"], judge="judge", judge_format="json")

    assert parsed.section.judge_format == "json"
    assert parsed.fingerprint_fields()["preference"]["judge_format"] == "json"
    assert parsed.fingerprint_fields() != plain.fingerprint_fields()
    card = parsed.kind.card_text(parsed)
    assert "UltraFeedback template, aspect: overall" in card and "as JSON" in card


def test_a_bad_template_is_a_config_problem_naming_the_key_and_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "ok\n{% if %}\n")

    [problem] = problems(tmp_path, generators=["a"], judge="judge", judge_template="judge.j2")

    assert problem.startswith(f"preference.judge_template: {path}, line 2: ")


@pytest.mark.parametrize(
    ("section", "key", "fragment"),
    [
        ({"judge": "judge", "judge_format": "xml"}, "preference.judge_format", "ultrafeedback"),
        ({"judge": "judge", "judge_template": 3}, "preference.judge_template", "non-empty"),
        (
            {"generators": ["a"], "judge_format": "json"},
            "preference.judge_format",
            "no preference.judge",
        ),
        ({"generators": []}, "preference.generators", "when there is no judge"),
        ({}, "preference.generators", "when there is no judge"),
    ],
    ids=["unknown_format", "template_not_a_path", "format_without_judge", "empty", "neither"],
)
def test_judge_key_problems(
    tmp_path: Path, section: dict[str, Any], key: str, fragment: str
) -> None:
    [problem] = problems(tmp_path, **section)
    assert problem.startswith(f"{key}: ") and fragment in problem, problem


@pytest.mark.parametrize("generators", [[], None], ids=["empty", "absent"])
def test_a_judge_alone_needs_no_generators(tmp_path: Path, generators: list[str] | None) -> None:
    section: dict[str, Any] = {"judge": "judge"}
    if generators is not None:
        section["generators"] = generators

    parsed = config(tmp_path, **section)

    assert parsed.section.generators == ()
    assert parsed.models_used() == {"judge"}
    assert parsed.kind.build(parsed).optional_models() == frozenset()
    assert "the generations came with the input" in parsed.kind.card_text(parsed)
