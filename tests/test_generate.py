"""`task: generate` without a server: the section, the template, the schema, the journal
records, the output row, the filters' view and the card."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from engine.config import RunConfig, parse_config
from engine.errors import ConfigError
from engine.output.filters import FilterConfig, check_row
from engine.tasks import kind_of, registry
from engine.tasks.asking import TRY, Answer, Try, reply_record
from engine.tasks.generate import KIND, GenerateConfig
from engine.tasks.generate.attempts import Attempt, first_valid, invalid_count, seed_for
from engine.tasks.generate.task import _attempt as attempt_of
from engine.tasks.generate.task import output_row
from engine.tasks.structured import ReplyChecker, response_format, schema_problem
from engine.tasks.templates import BadTemplate, RenderError, compile_template, render

EXAMPLE = """
task: generate
input: data/topics.jsonl
output: out/questions.jsonl
models:
  writer:
    base_url: http://127.0.0.1:8080/v1
    model: served-writer
    params: {temperature: 0.7, seed: 5}
generate:
  model: writer
  template: "Write a {{ difficulty }} question about {{ topic }}."
"""
SCHEMA = {
    "type": "object",
    "properties": {"question": {"type": "string"}, "level": {"type": "integer"}},
    "required": ["question", "level"],
}


def raw_config(**section: Any) -> dict[str, Any]:
    raw = yaml.safe_load(EXAMPLE)
    raw["generate"].update(section)
    return raw


def parse(raw: dict[str, Any], folder: Path = Path("/cfg")) -> RunConfig:
    return parse_config(raw, folder / "job.yaml", {})


def problems(raw: dict[str, Any], folder: Path = Path("/cfg")) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(raw, folder)
    return info.value.problems


def one_problem(raw: dict[str, Any], folder: Path = Path("/cfg")) -> str:
    found = problems(raw, folder)
    assert len(found) == 1, found
    return found[0]


# --- the section -----------------------------------------------------------------------


def test_generate_is_a_registered_task() -> None:
    assert "generate" in registry()
    assert kind_of("generate") is KIND


def test_the_contract_example_parses_with_its_defaults() -> None:
    config = parse(raw_config())
    assert config.task == "generate"
    assert config.section == GenerateConfig(
        model="writer", template="Write a {{ difficulty }} question about {{ topic }}."
    )
    assert config.models_used() == {"writer"}


def test_the_fingerprint_holds_the_section_as_plain_values(tmp_path: Path) -> None:
    (tmp_path / "q.j2").write_text("About {{ topic }}.\n")
    raw = raw_config(
        template=None,
        template_file="q.j2",
        system_prompt="Be brief.",
        num_generations=3,
        json_schema=SCHEMA,
        max_invalid=0,
    )
    del raw["generate"]["template"]
    config = parse(raw, tmp_path)
    assert config.task_fields() == {
        "generate": {
            "model": "writer",
            "template": "About {{ topic }}.\n",  # the text, not the file's name
            "system_prompt": "Be brief.",
            "num_generations": 3,
            "json_schema": SCHEMA,
            "max_invalid": 0,
        }
    }
    orjson.dumps(config.fingerprint_fields())  # plain JSON


def test_a_template_file_is_read_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "q.j2").write_text("Line one {{ a }}\nline two {{ b }}\n")
    raw = raw_config(template_file="prompts/q.j2")
    del raw["generate"]["template"]
    section = parse(raw, tmp_path).section
    assert section.template == "Line one {{ a }}\nline two {{ b }}\n"
    assert section.template_file == "prompts/q.j2"


def test_template_and_template_file_together_are_refused() -> None:
    problem = one_problem(raw_config(template_file="q.j2"))
    assert problem.startswith("generate.template: and generate.template_file are both set")


def test_a_section_with_no_template_is_refused() -> None:
    raw = raw_config()
    del raw["generate"]["template"]
    problem = one_problem(raw)
    assert problem.startswith("generate.template: missing;")
    assert "template_file" in problem


def test_a_missing_section_is_refused() -> None:
    raw = raw_config()
    del raw["generate"]
    assert one_problem(raw).startswith("generate: missing;")


@pytest.mark.parametrize(
    ("template", "line", "fragment"),
    [
        ("Ask about {{ topic }.", 1, "unexpected '}'"),
        ("one\ntwo\n{% if topic %}three", 3, "endif"),
        ("{{ topic | no_such_filter }}", 1, "No filter named 'no_such_filter'"),
    ],
)
def test_a_template_that_does_not_compile_names_the_key_and_the_line(
    template: str, line: int, fragment: str
) -> None:
    problem = one_problem(raw_config(template=template))
    assert problem.startswith(f"generate.template: the template does not compile: line {line}:")
    assert fragment in problem


def test_a_template_file_that_does_not_compile_names_the_file_and_the_line(
    tmp_path: Path,
) -> None:
    (tmp_path / "q.j2").write_text("fine\n{{ broken }\n")
    raw = raw_config(template_file="q.j2")
    del raw["generate"]["template"]
    problem = one_problem(raw, tmp_path)
    assert problem.startswith(f"generate.template_file: {tmp_path / 'q.j2'}:")
    assert "line 2:" in problem


@pytest.mark.parametrize(
    ("content", "fragment"),
    [(None, "cannot read"), (b"   \n", "is empty"), (b"\xff\xfe bad", "not UTF-8")],
    ids=["missing", "empty", "not_utf8"],
)
def test_a_template_file_that_cannot_be_used_is_a_config_error(
    tmp_path: Path, content: bytes | None, fragment: str
) -> None:
    if content is not None:
        (tmp_path / "q.j2").write_bytes(content)
    raw = raw_config(template_file="q.j2")
    del raw["generate"]["template"]
    problem = one_problem(raw, tmp_path)
    assert problem.startswith("generate.template_file:")
    assert fragment in problem


@pytest.mark.parametrize(
    ("section", "key", "fragment"),
    [
        ({"template": ""}, "generate.template", "non-empty string"),
        ({"template": 3}, "generate.template", "non-empty string"),
        ({"model": "oracle"}, "generate.model", "'oracle' is not defined"),
        ({"system_prompt": 7}, "generate.system_prompt", "string or null"),
        ({"num_generations": 0}, "generate.num_generations", "positive whole number"),
        ({"max_invalid": -1}, "generate.max_invalid", "whole number >= 0"),
        ({"json_schema": "object"}, "generate.json_schema", "must be a mapping"),
        ({"json_schema": [1]}, "generate.json_schema", "must be a mapping"),
        ({"json_schema": {"type": "nope"}}, "generate.json_schema", "not a valid JSON Schema"),
        (
            {"json_schema": {"type": "object", "properties": {"a": {"type": 5}}}},
            "generate.json_schema",
            "$.properties.a.type",
        ),
        ({"json_schema": {1: {"type": "string"}}}, "generate.json_schema", "plain JSON"),
        ({"temperature": 1}, "generate.temperature", "unknown key"),
    ],
)
def test_each_problem_names_its_key(section: dict[str, Any], key: str, fragment: str) -> None:
    problem = one_problem(raw_config(**section))
    assert problem.startswith(f"{key}: "), problem
    assert fragment in problem, problem


def test_every_problem_is_reported_at_once() -> None:
    found = problems(raw_config(template="{{ x }", num_generations=-1, json_schema="x"))
    keys = sorted(p.split(":")[0] for p in found)
    assert keys == ["generate.json_schema", "generate.num_generations", "generate.template"]


def test_input_columns_may_map_only_the_id() -> None:
    assert parse({**raw_config(), "input_columns": {"id": "uid"}}).input_columns == {"id": "uid"}
    problem = one_problem({**raw_config(), "input_columns": {"messages": "chat"}})
    assert problem.startswith("input_columns.messages: unknown key")


# --- the template ----------------------------------------------------------------------


def test_the_template_is_filled_with_the_rows_columns() -> None:
    template = compile_template("Write a {{ difficulty }} question about {{ topic }}.")
    assert render(template, {"topic": "tides", "difficulty": "hard", "other": 1}) == (
        "Write a hard question about tides."
    )


def test_jinja_features_work_on_the_columns() -> None:
    template = compile_template(
        "{% for k in keywords %}{{ k | upper }}{% if not loop.last %}, {% endif %}{% endfor %}"
        "{% if note is defined %} ({{ note }}){% endif %} {{ level | default('any') }}"
    )
    assert render(template, {"keywords": ["a", "b"]}) == "A, B any"
    assert render(template, {"keywords": [], "note": "n", "level": 2}) == " (n) 2"


def test_a_missing_column_is_named() -> None:
    template = compile_template("Write a {{ difficulty }} question about {{ topic }}.")
    with pytest.raises(RenderError) as info:
        render(template, {"difficulty": "hard"})
    assert str(info.value) == "the template uses 'topic', which this row does not have"


def test_a_missing_field_of_a_column_keeps_jinjas_message() -> None:
    with pytest.raises(RenderError, match="has no attribute 'author'"):
        render(compile_template("{{ meta.author }}"), {"meta": {}})


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ topic.__class__ }}",
        "{{ cycler.__init__.__globals__ }}",
    ],
)
def test_the_sandbox_refuses_private_attributes(template: str) -> None:
    with pytest.raises(RenderError, match="unsafe"):
        render(compile_template(template), {"topic": "x"})


def test_the_sandbox_refuses_changing_the_row() -> None:
    row: dict[str, Any] = {"items": [1]}
    with pytest.raises(RenderError, match="unsafe"):
        render(compile_template("{{ items.append(2) }}"), row)
    assert row == {"items": [1]}


def test_any_error_of_the_template_is_a_render_error() -> None:
    with pytest.raises(RenderError, match="the template failed on this row"):
        render(compile_template("{{ a + b }}"), {"a": 1, "b": "x"})


def test_a_syntax_error_carries_its_line() -> None:
    with pytest.raises(BadTemplate) as info:
        compile_template("ok\nok\n{{ x }")
    assert info.value.line == 3
    assert str(info.value).startswith("line 3: ")


# --- the schema ------------------------------------------------------------------------


def test_response_format_asks_for_the_schema_strictly() -> None:
    assert response_format(SCHEMA, "generate") == {
        "type": "json_schema",
        "json_schema": {"name": "generate", "schema": SCHEMA, "strict": True},
    }


def test_schema_problem() -> None:
    assert schema_problem(SCHEMA) is None
    assert schema_problem({"type": "object", "required": "question"}) is not None
    problem = schema_problem({"properties": {"a": {"minLength": -1}}})
    assert problem is not None and "$.properties.a.minLength" in problem


def test_a_reply_that_fits_is_parsed() -> None:
    value, error = ReplyChecker(SCHEMA, "generate.json_schema").check(
        '{"question": "Why?", "level": 2}'
    )
    assert error is None
    assert value == {"question": "Why?", "level": 2}


@pytest.mark.parametrize(
    ("reply", "fragment"),
    [
        ("Sure! Here is the JSON: {not json", "the reply is not JSON"),
        ('```json\n{"question": "q", "level": 1}\n```', "the reply is not JSON"),
        ('{"question": "q"}', "'level' is a required property"),
        ('{"question": "q", "level": "two"}', "(at $.level)"),
        ("[1, 2]", "is not of type 'object'"),
    ],
)
def test_a_reply_that_does_not_fit_says_why(reply: str, fragment: str) -> None:
    value, error = ReplyChecker(SCHEMA, "generate.json_schema").check(reply)
    assert value is None
    assert error is not None and fragment in error, error


def test_a_long_reply_that_is_not_json_is_shortened_in_the_error() -> None:
    _, error = ReplyChecker(SCHEMA, "generate.json_schema").check("x" * 1000)
    assert error is not None and len(error) < 200


# --- the journal records ---------------------------------------------------------------


def attempt_record(line: int, attempt: Attempt) -> dict[str, Any]:
    """An attempt's journal record, as the context writes it for ``Try(slot, number)``."""
    answer = Answer(
        attempt.content,
        attempt.prompt_tokens,
        attempt.completion_tokens,
        attempt.finish_reason,
        attempt.trace,
        attempt.reasoning_tokens,
        attempt.error,
    )
    return reply_record(line, Try(attempt.slot, attempt.number), answer)


def attempts_from(records: list[dict[str, Any]], slots: int) -> dict[int, list[Attempt]]:
    """Each slot's journaled attempts, as the task replays them through its row context."""
    ctx, _ = _context(parse(raw_config(num_generations=slots)))
    row = ctx.row(0, records)
    out: dict[int, list[Attempt]] = {}
    for slot in range(slots):
        while (answer := row.replayed(Try(slot, len(out.get(slot, []))))) is not None:
            out.setdefault(slot, []).append(attempt_of(slot, len(out.get(slot, [])), answer))
    return out


def test_attempt_records_round_trip_and_are_a_kind_of_their_own() -> None:
    attempt = Attempt(1, 0, '{"a": 1}', 10, 4, "stop", None)
    record = attempt_record(7, attempt)
    assert record["k"] == TRY == "gg" and record["l"] == 7
    assert TRY not in ("t", "g", "ge", "r", "o", "x", "q")
    assert attempts_from([orjson.loads(orjson.dumps(record))], 2) == {1: [attempt]}


def test_replay_keeps_each_slots_attempts_in_order_once_up_to_a_gap() -> None:
    def rec(slot: int, number: int, error: str | None = None) -> dict[str, Any]:
        return attempt_record(0, Attempt(slot, number, f"s{slot}a{number}", 1, 1, "stop", error))

    records = [
        rec(0, 1),
        rec(0, 0, "bad"),
        rec(0, 0, "bad"),  # journaled twice: counts once
        rec(1, 0, "bad"),
        rec(1, 2),  # after a gap: the slot goes on from attempt 1
        rec(5, 0),  # no such slot
        {"k": "g", "l": 0, "s": 0, "c": "a preference record"},
        {"k": "gg", "l": 0, "s": "0", "a": 0},
    ]
    replayed = attempts_from(records, 2)
    assert [a.content for a in replayed[0]] == ["s0a0", "s0a1"]
    assert [a.content for a in replayed[1]] == ["s1a0"]
    assert first_valid(replayed[0]) == replayed[0][1]
    assert invalid_count(replayed[0]) == 1
    assert first_valid(replayed[1]) is None


def test_seeds_differ_for_every_generation_and_re_request() -> None:
    assert [seed_for(5, j, 0, 3) for j in range(3)] == [5, 6, 7]  # generation j: seed + j
    seeds = {seed_for(5, j, a, 3) for j in range(3) for a in range(4)}
    assert len(seeds) == 12
    assert seed_for(None, 1, 0, 3) is None
    assert seed_for(True, 1, 0, 3) is None


# --- the output row and the filters' view ----------------------------------------------


def test_own_keys_override_input_fields_and_come_after_them() -> None:
    record = {"id": "r1", "topic": "t", "generations": "old", "truncated_generations": [0]}
    prompt = [{"role": "user", "content": "q"}]
    row = output_row(record, "r1", prompt, ["a"], "served", {"prompt_tokens": 1}, [])
    assert list(row) == ["topic", "id", "prompt", "generations", "model", "usage"]
    assert row["generations"] == ["a"]
    assert "truncated_generations" not in row  # the input's column is never obeyed
    row = output_row(record, "r1", prompt, ["a"], "served", {}, [0])
    assert row["truncated_generations"] == [0]


def test_replies_are_each_generation_and_objects_are_compact_json() -> None:
    row = {"generations": ["plain text", {"question": "Why?", "n": [1, 2]}]}
    replies = list(KIND.replies(row))
    assert [r.text for r in replies] == ["plain text", '{"question":"Why?","n":[1,2]}']
    assert [r.where for r in replies] == ["generation 0", "generation 1"]
    assert not any(r.truncated for r in replies)


def test_filters_see_truncated_generations() -> None:
    row = {"generations": ["whole", "cut"], "truncated_generations": [1]}
    reason = check_row(row, KIND, FilterConfig(truncated=True))
    assert reason == "truncated: the reply in generation 1 was cut off by max_tokens"
    assert check_row({"generations": ["x"]}, KIND, FilterConfig(truncated=True)) is None
    deny = FilterConfig(deny=("Why",))
    assert check_row({"generations": [{"q": "Why?"}]}, KIND, deny) is not None


# --- the card --------------------------------------------------------------------------


def test_the_card_names_the_model_the_template_and_the_count() -> None:
    config = parse(raw_config(num_generations=2))
    text = KIND.card_text(config)
    assert "`served-writer`" in text
    assert "Write a {{ difficulty }} question about {{ topic }}." in text
    assert "2 generation(s)" in text
    assert "no schema" in text
    assert "strings" in KIND.card_usage(config, pairs_only=False)
    assert KIND.tags == ("generation",)


def test_the_card_says_when_replies_follow_a_schema(tmp_path: Path) -> None:
    (tmp_path / "q.j2").write_text("one {{ a }}\ntwo\nthree\n")
    raw = raw_config(template_file="q.j2", json_schema=SCHEMA)
    del raw["generate"]["template"]
    config = parse(raw, tmp_path)
    text = KIND.card_text(config)
    assert "json_schema" in text and "3-line Jinja2 template from `q.j2`" in text
    assert "JSON values" in KIND.card_usage(config, pairs_only=False)


# --- a row's replay, with no server: what the journal holds is never asked for again ---


class _Writer:
    """Collects what a row writes (the runner's Writer, minus the files)."""

    def __init__(self) -> None:
        self.out: list[dict[str, Any]] = []
        self.failed_rows: list[dict[str, Any]] = []

    def hand_over(self, line: int, row: dict[str, Any], records: Any = ()) -> None:
        self.out.append(row)

    async def failed(self, line: int, row: dict[str, Any]) -> None:
        self.failed_rows.append(row)


def _context(config: RunConfig) -> tuple[Any, _Writer]:
    from engine.stats import RunStats
    from engine.tasks.base import Context

    writer = _Writer()
    # No clients: a request would be a KeyError.
    return Context(config, KIND, writer, {}, RunStats()), writer  # type: ignore[arg-type]


def _attempt(slot: int, number: int, content: str, error: str | None = None) -> dict[str, Any]:
    return attempt_record(3, Attempt(slot, number, content, 10, 5, "stop", error))


async def test_a_row_whose_generations_are_all_journaled_finishes_without_a_request() -> None:
    config = parse(raw_config(num_generations=2, json_schema=SCHEMA))
    ctx, writer = _context(config)
    records = [
        _attempt(1, 0, "not json", "the reply is not JSON"),
        _attempt(0, 0, '{"question": "a", "level": 1}'),
        _attempt(1, 1, '{"question": "b", "level": 2}'),
    ]
    task = KIND.build(config)

    await task.process({"topic": "t", "difficulty": "easy"}, ctx.row(3, records))

    [row] = writer.out
    assert row["id"] == 3
    assert row["generations"] == [{"question": "a", "level": 1}, {"question": "b", "level": 2}]
    # the invalid one too
    assert row["usage"] == {"prompt_tokens": 30, "completion_tokens": 15, "reasoning_tokens": 0}
    assert row["model"] == "served-writer"
    assert ctx.stats.turns_resumed == 3


async def test_a_generation_whose_tries_are_journaled_as_spent_fails_without_a_request() -> None:
    config = parse(raw_config(json_schema=SCHEMA, max_invalid=1))
    ctx, writer = _context(config)
    records = [_attempt(0, 0, "x", "first reason"), _attempt(0, 1, "y", "second reason")]

    row = ctx.row(3, records)
    await KIND.build(config).process({"id": "r", "topic": "t", "difficulty": "d"}, row)

    assert writer.out == []
    [failed] = writer.failed_rows
    assert failed["id"] == "r" and failed["generation"] == 0
    assert (
        failed["error"]
        == "generation 0: 2 invalid replies (max_invalid: 1); the last: second reason"
    )
