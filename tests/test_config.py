"""The run config: parsing, every problem at once, defaults and the resume fingerprint."""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from engine.config import (
    JournalConfig,
    LocalServerConfig,
    ModelConfig,
    RunConfig,
    load_config,
    parse_config,
    read_document,
)
from engine.errors import ConfigError
from engine.tasks.distill import DistillConfig
from engine.tasks.preference import PreferenceConfig
from engine.tasks.preference.judge import ASPECTS

# The contract example: a multi-turn distillation against one OpenAI-compatible server.
EXAMPLE = """
task: distill
input: data/conversations.jsonl
output: out/distilled.jsonl
models:
  teacher:
    base_url: http://127.0.0.1:8080/v1/
    model: gpt-4o-mini
    params: {temperature: 0.7, max_tokens: 128, seed: 42}
distill:
  model: teacher
"""

NO_ENV: dict[str, str] = {}


def example() -> dict[str, Any]:
    raw = yaml.safe_load(EXAMPLE)
    assert isinstance(raw, dict)
    return raw


def parse(
    raw: dict[str, Any], *, folder: Path = Path("/cfg"), env: dict[str, str] = NO_ENV
) -> RunConfig:
    return parse_config(raw, folder / "job.yaml", env)


def problems(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(raw)
    assert info.value.problems, "a ConfigError must carry at least one problem"
    return info.value.problems


def one_problem(raw: dict[str, Any]) -> str:
    found = problems(raw)
    assert len(found) == 1, found
    return found[0]


def preference(**section: Any) -> dict[str, Any]:
    raw = example()
    del raw["distill"]
    raw["task"] = "preference"
    raw["models"] = {
        "a": {"base_url": "http://a.example/v1", "model": "m-a"},
        "b": {"base_url": "http://b.example/v1", "model": "m-b"},
        "judge": {"base_url": "http://j.example/v1", "model": "m-j"},
    }
    raw["preference"] = section
    return raw


# --- the contract example ----------------------------------------------------------


def test_example_parses_with_paths_relative_to_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "configs"
    config = parse_config(example(), folder / "nightly.yaml", NO_ENV)

    assert config.task == "distill"
    assert config.input == folder.resolve() / "data" / "conversations.jsonl"
    assert config.output == folder.resolve() / "out" / "distilled.jsonl"
    assert config.failed_output == folder.resolve() / "out" / "distilled.failed.jsonl"
    assert config.checkpoint_dir == tmp_path / "checkpoints" / "nightly"
    assert isinstance(config.section, DistillConfig)
    assert config.section.model == "teacher"
    assert config.section.system_prompt is None
    assert config.journal == JournalConfig(fsync="interval", fsync_interval_s=1.0)
    assert config.max_conversations is None
    assert config.shutdown_grace_s == 10.0
    assert config.progress_interval_s == 10.0
    assert config.models_used() == {"teacher"}


def test_example_model_gets_the_defaults() -> None:
    teacher = parse(example()).models["teacher"]
    assert teacher == ModelConfig(
        name="teacher",
        base_urls=("http://127.0.0.1:8080/v1",),  # the trailing slash is dropped
        model="gpt-4o-mini",
        api_key_env=None,
        max_concurrency=16,
        timeout_s=120.0,
        max_retries=6,
        params={"temperature": 0.7, "max_tokens": 128, "seed": 42},
        model_path=None,
        local=LocalServerConfig(),
    )
    assert not teacher.is_local
    assert teacher.api_key() is None


def test_absolute_paths_and_checkpoint_dir_are_kept(tmp_path: Path) -> None:
    raw = example()
    raw["input"] = str(tmp_path / "in.jsonl")
    raw["checkpoint_dir"] = "ck"
    config = parse(raw, folder=Path("/somewhere/else"))
    assert config.input == tmp_path / "in.jsonl"
    assert config.checkpoint_dir == Path("/somewhere/else").resolve() / "ck"


def test_task_defaults_to_distill() -> None:
    raw = example()
    del raw["task"]
    assert parse(raw).task == "distill"


def test_api_key_env_is_read_when_set(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = example()
    raw["models"]["teacher"]["api_key_env"] = "TURNSTILE_TEST_KEY"
    model = parse(raw, env={"TURNSTILE_TEST_KEY": "sk-1"}).models["teacher"]
    assert model.api_key_env == "TURNSTILE_TEST_KEY"
    monkeypatch.setenv("TURNSTILE_TEST_KEY", "sk-live")
    assert model.api_key() == "sk-live"  # read at use, not at parse


# --- every problem at once ------------------------------------------------------------


def test_every_problem_is_reported_at_once() -> None:
    raw = example()
    raw["colour"] = "blue"
    teacher = raw["models"]["teacher"]
    teacher["base_url"] = "htp://x"
    teacher["max_concurrency"] = 0
    teacher["api_key_env"] = "TURNSTILE_UNSET_KEY"
    raw["distill"]["model"] = "student"

    found = problems(raw)

    assert len(found) == 5, found
    by_key = {p.split(":", 1)[0]: p for p in found}
    assert set(by_key) == {
        "colour",
        "models.teacher.base_url",
        "models.teacher.max_concurrency",
        "models.teacher.api_key_env",
        "distill.model",
    }
    assert "unknown key" in by_key["colour"] and "allowed keys here" in by_key["colour"]
    assert "'htp://x' is not an http(s) URL" in by_key["models.teacher.base_url"]
    assert "http://127.0.0.1:8080/v1" in by_key["models.teacher.base_url"]
    assert "positive whole number, got 0" in by_key["models.teacher.max_concurrency"]
    assert "TURNSTILE_UNSET_KEY is not set" in by_key["models.teacher.api_key_env"]
    assert "export TURNSTILE_UNSET_KEY=" in by_key["models.teacher.api_key_env"]
    assert "'student' is not defined" in by_key["distill.model"]
    assert "(defined: teacher)" in by_key["distill.model"]


def test_config_error_message_lists_every_problem_one_per_line() -> None:
    raw = example()
    raw["colour"] = "blue"
    raw["shutdown_grace_s"] = -1
    with pytest.raises(ConfigError) as info:
        parse(raw)
    assert str(info.value).splitlines() == info.value.problems
    assert len(info.value.problems) == 2


def test_env_argument_is_used_instead_of_the_process_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TURNSTILE_TEST_KEY", "set-in-process")
    raw = example()
    raw["models"]["teacher"]["api_key_env"] = "TURNSTILE_TEST_KEY"
    assert "models.teacher.api_key_env:" in one_problem(raw)


@pytest.mark.parametrize(
    ("path", "value", "key", "fragment"),
    [
        (("task",), "summarise", "task", "must be one of distill, generate, preference"),
        (("input",), None, "input", "missing; set input: to a file path"),
        (("output",), "", "output", "must be a non-empty string"),
        (("output",), "data/conversations.jsonl", "output", "must not be the input file"),
        (("models",), None, "models", "missing; add at least one model"),
        (("models",), {}, "models", "is empty; add at least one model"),
        (("models",), ["teacher"], "models", "must be a mapping of keys, got list"),
        (("models", "teacher"), "http://x", "models.teacher", "must be a mapping"),
        (("models", "teacher", "base_url"), None, "models.teacher.base_url", "missing; set it"),
        (("models", "teacher", "base_url"), "http://", "models.teacher.base_url", "not an http"),
        (("models", "teacher", "base_url"), "ftp://x/v1", "models.teacher.base_url", "http(s)"),
        (("models", "teacher", "model"), None, "models.teacher.model", "e.g. model: gpt-4o-mini"),
        (("models", "teacher", "model"), "  ", "models.teacher.model", "non-empty string"),
        (("models", "teacher", "temperature"), 0.2, "models.teacher.temperature", "unknown key"),
        (("models", "teacher", "max_concurrency"), True, "models.teacher.max_concurrency", "True"),
        (("models", "teacher", "max_concurrency"), 2.5, "models.teacher.max_concurrency", "2.5"),
        (("models", "teacher", "timeout_s"), 0, "models.teacher.timeout_s", "positive number"),
        (("models", "teacher", "timeout_s"), "10", "models.teacher.timeout_s", "'10'"),
        (("models", "teacher", "max_retries"), -1, "models.teacher.max_retries", ">= 0"),
        (("models", "teacher", "params"), [1, 2], "models.teacher.params", "mapping"),
        (("distill",), None, "distill", "missing; add distill: {model:"),
        (("distill", "model"), None, "distill.model", "name one of the models"),
        (("distill", "system_prompt"), 7, "distill.system_prompt", "string or null"),
        (("distill", "temperature"), 1, "distill.temperature", "unknown key"),
        (("preference",), {"generators": ["teacher"]}, "preference", "only used with task"),
        (("max_conversations",), 0, "max_conversations", "positive whole number"),
        (("progress_interval_s",), -5, "progress_interval_s", "positive number"),
    ],
)
def test_each_problem_names_its_key_and_a_fix(
    path: tuple[str, ...], value: Any, key: str, fragment: str
) -> None:
    raw = example()
    target = raw
    for part in path[:-1]:
        target = target[part]
    if value is None:
        target.pop(path[-1], None)
    else:
        target[path[-1]] = value
    problem = one_problem(raw)
    assert problem.startswith(f"{key}: "), problem
    assert fragment in problem, problem


def test_max_retries_zero_is_allowed() -> None:
    raw = example()
    raw["models"]["teacher"]["max_retries"] = 0
    assert parse(raw).models["teacher"].max_retries == 0


def test_nan_timeout_is_refused() -> None:
    raw = example()
    raw["models"]["teacher"]["timeout_s"] = math.nan
    assert one_problem(raw).startswith("models.teacher.timeout_s: ")


# --- params ---------------------------------------------------------------------------


@pytest.mark.parametrize("reserved", ["messages", "model", "stream"])
def test_reserved_params_are_refused(reserved: str) -> None:
    raw = example()
    raw["models"]["teacher"]["params"][reserved] = True
    problem = one_problem(raw)
    assert problem.startswith(f"models.teacher.params.{reserved}: ")
    assert "remove it from params" in problem


def test_params_must_be_plain_json() -> None:
    raw = example()
    raw["models"]["teacher"]["params"]["stop"] = {"a", "b"}
    problem = one_problem(raw)
    assert problem.startswith("models.teacher.params: must hold plain JSON values")


def test_params_are_copied_out_of_the_raw_mapping() -> None:
    raw = example()
    config = parse(raw)
    raw["models"]["teacher"]["params"]["temperature"] = 0.0
    assert config.models["teacher"].params["temperature"] == 0.7


# --- the built-in local server --------------------------------------------------------


def test_local_base_url_needs_no_model() -> None:
    raw = example()
    raw["models"]["teacher"] = {"base_url": "local"}
    model = parse(raw).models["teacher"]
    assert model.is_local
    assert model.base_urls == ("local",)
    assert model.model == "SmolLM2-135M-Instruct"
    assert model.local == LocalServerConfig()


def test_local_model_name_defaults_to_the_gguf_stem() -> None:
    raw = example()
    raw["models"]["teacher"] = {
        "base_url": "local",
        "model_path": "/models/qwen2-0.5b.Q4_K_M.gguf",
        "local": {"parallel": 4, "ctx_size": 4096, "threads": 2, "port": 8081},
    }
    model = parse(raw).models["teacher"]
    assert model.model == "qwen2-0.5b.Q4_K_M"
    assert model.model_path == "/models/qwen2-0.5b.Q4_K_M.gguf"
    assert model.local == LocalServerConfig(parallel=4, ctx_size=4096, threads=2, port=8081)


def test_local_with_an_explicit_model_keeps_it() -> None:
    raw = example()
    raw["models"]["teacher"] = {"base_url": "local", "model": "served-name"}
    assert parse(raw).models["teacher"].model == "served-name"


@pytest.mark.parametrize(
    ("key", "value"), [("model_path", "/models/x.gguf"), ("local", {"ctx_size": 2048})]
)
def test_local_only_keys_are_refused_with_a_url(key: str, value: Any) -> None:
    raw = example()
    raw["models"]["teacher"][key] = value
    problem = one_problem(raw)
    assert problem.startswith(f"models.teacher.{key}: ")
    assert "only used with base_url: local" in problem


@pytest.mark.parametrize(
    ("local", "key", "fragment"),
    [
        ({"port": 70000}, "models.teacher.local.port", "1-65535"),
        ({"port": 0}, "models.teacher.local.port", "positive whole number"),
        ({"parallel": -1}, "models.teacher.local.parallel", "positive whole number"),
        ({"gpu": True}, "models.teacher.local.gpu", "unknown key"),
        ("big", "models.teacher.local", "must be a mapping"),
    ],
)
def test_local_server_settings_are_checked(local: Any, key: str, fragment: str) -> None:
    raw = example()
    raw["models"]["teacher"] = {"base_url": "local", "local": local}
    problem = one_problem(raw)
    assert problem.startswith(f"{key}: ") and fragment in problem, problem


# --- preference -----------------------------------------------------------------------


def test_preference_section_parses() -> None:
    config = parse(
        preference(generators=["a", "b"], num_generations=2, judge="judge", aspect="honesty")
    )
    assert config.section == PreferenceConfig(
        generators=("a", "b"), num_generations=2, judge="judge", aspect="honesty"
    )
    assert config.models_used() == {"a", "b", "judge"}


def test_preference_judge_is_optional() -> None:
    config = parse(preference(generators=["a"]))
    assert config.section == PreferenceConfig(
        generators=("a",), num_generations=1, judge=None, aspect="overall"
    )
    assert config.models_used() == {"a"}


@pytest.mark.parametrize("aspect", ASPECTS)
def test_every_judge_aspect_is_accepted(aspect: str) -> None:
    config = parse(preference(generators=["a", "b"], judge="judge", aspect=aspect))
    assert isinstance(config.section, PreferenceConfig) and config.section.aspect == aspect


@pytest.mark.parametrize(
    ("section", "key", "fragment"),
    [
        ({"generators": ["a", "c"]}, "preference.generators[1]", "'c' is not defined"),
        ({"generators": ["a", "a"]}, "preference.generators", "lists a model twice"),
        ({"generators": []}, "preference.generators", "non-empty list of model names"),
        ({"generators": "a"}, "preference.generators", "non-empty list of model names"),
        ({"generators": ["a", 3]}, "preference.generators[1]", "non-empty string"),
        ({"generators": ["a"], "judge": "oracle"}, "preference.judge", "'oracle' is not defined"),
        ({"generators": ["a"], "aspect": "style"}, "preference.aspect", "must be one of overall"),
        ({"generators": ["a"], "num_generations": 0}, "preference.num_generations", "positive"),
        ({"generators": ["a"], "pairs": 2}, "preference.pairs", "unknown key"),
    ],
)
def test_preference_problems(section: dict[str, Any], key: str, fragment: str) -> None:
    problem = one_problem(preference(**section))
    assert problem.startswith(f"{key}: ") and fragment in problem, problem


def test_preference_missing_and_distill_section_refused() -> None:
    raw = preference()
    del raw["preference"]
    raw["distill"] = {"model": "a"}
    found = problems(raw)
    assert [p.split(":", 1)[0] for p in found] == ["preference", "distill"]
    assert "missing" in found[0]
    assert "only used with task: distill" in found[1]


def test_unknown_model_message_lists_the_defined_ones() -> None:
    problem = one_problem(preference(generators=["a", "zz"]))
    assert "(defined: a, b, judge)" in problem


# --- journal --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["interval", "always", "never"])
def test_journal_fsync_modes(mode: str) -> None:
    raw = example()
    raw["journal"] = {"fsync": mode, "fsync_interval_s": 0.25}
    assert parse(raw).journal == JournalConfig(fsync=mode, fsync_interval_s=0.25)


@pytest.mark.parametrize(
    ("journal", "key", "fragment"),
    [
        ({"fsync": "sometimes"}, "journal.fsync", "must be one of interval, always, never"),
        ({"fsync_interval_s": 0}, "journal.fsync_interval_s", "positive number"),
        ({"fsync_interval_s": "1s"}, "journal.fsync_interval_s", "positive number"),
        ({"group": 10}, "journal.group", "unknown key"),
        ("always", "journal", "must be a mapping"),
    ],
)
def test_journal_problems(journal: Any, key: str, fragment: str) -> None:
    raw = example()
    raw["journal"] = journal
    problem = one_problem(raw)
    assert problem.startswith(f"{key}: ") and fragment in problem, problem


# --- load_config ----------------------------------------------------------------------


def test_load_config_reads_a_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(EXAMPLE, encoding="utf-8")
    config = load_config(path)
    assert config.config_path == path
    assert config.input == tmp_path.resolve() / "data" / "conversations.jsonl"
    assert config.models["teacher"].model == "gpt-4o-mini"


def test_load_config_reports_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("task: distill\nmodels: {teacher: [\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(f"{path}: not valid YAML")


def test_a_json_config_reads_as_its_yaml_form_does(tmp_path: Path) -> None:
    raw = yaml.safe_load(EXAMPLE)
    (tmp_path / "job.yaml").write_text(EXAMPLE, encoding="utf-8")
    (tmp_path / "job.json").write_text(orjson.dumps(raw).decode(), encoding="utf-8")
    from_yaml = load_config(tmp_path / "job.yaml")
    from_json = load_config(tmp_path / "job.json")
    assert replace(from_json, config_path=from_yaml.config_path) == from_yaml


def test_a_flow_style_yaml_config_is_still_yaml() -> None:
    # Starts with a brace like JSON, is not JSON: YAML reads it.
    assert read_document("{task: distill, models: {teacher: {model: m}}}") == {
        "task": "distill",
        "models": {"teacher": {"model": "m"}},
    }
    assert read_document('  {"a": 1.5e3}\n') == {"a": 1500.0}  # JSON's reading of 1.5e3


def test_broken_json_is_reported_as_yaml_sees_it(tmp_path: Path) -> None:
    path = tmp_path / "job.json"
    path.write_text('{"task": "distill",\n "models": {"teacher": [}\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems[0].startswith(f"{path}: not valid YAML")
    assert "line 2" in info.value.problems[0]


def test_load_config_refuses_a_yaml_list(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("- task\n- input\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_config(path)


def test_load_config_reports_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems[0].startswith(f"{path}: cannot read the config file")


def test_load_config_without_env_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TURNSTILE_UNSET_KEY", raising=False)
    path = tmp_path / "job.yaml"
    path.write_text(
        EXAMPLE.replace(
            "model: gpt-4o-mini", "model: gpt-4o-mini\n    api_key_env: TURNSTILE_UNSET_KEY"
        ),
        encoding="utf-8",
    )
    with pytest.raises(ConfigError, match=r"models\.teacher\.api_key_env: "):
        load_config(path)
    config = load_config(path, check_env=False)
    assert config.models["teacher"].api_key_env == "TURNSTILE_UNSET_KEY"


def test_load_config_without_env_check_still_reports_other_problems(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(EXAMPLE.replace("http://127.0.0.1:8080/v1/", "htp://x"), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"models\.teacher\.base_url: "):
        load_config(path, check_env=False)


# --- the resume fingerprint -----------------------------------------------------------


def _fingerprint(edit: Any) -> dict[str, Any]:
    raw = copy.deepcopy(example())
    raw["distill"]["system_prompt"] = "Be brief."
    edit(raw)
    return parse(raw).fingerprint_fields()


BASE = _fingerprint(lambda raw: None)


def _set(*path: str, value: Any) -> Any:
    def edit(raw: dict[str, Any]) -> None:
        target = raw
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value

    return edit


@pytest.mark.parametrize(
    "edit",
    [
        _set("models", "teacher", "params", value={"temperature": 0.2}),
        _set("models", "teacher", "params", "seed", value=43),
        _set("models", "teacher", "model", value="gpt-4o"),
        _set("distill", "system_prompt", value="Be thorough."),
        _set("distill", "system_prompt", value=None),
        _set("distill", "turns", value="as_in_input"),
    ],
    ids=["params", "seed", "model", "system_prompt", "no_system_prompt", "turns"],
)
def test_fingerprint_changes_with_what_changes_the_data(edit: Any) -> None:
    assert _fingerprint(edit) != BASE


@pytest.mark.parametrize(
    "edit",
    [
        _set("models", "teacher", "max_concurrency", value=64),
        _set("models", "teacher", "timeout_s", value=5),
        _set("models", "teacher", "max_retries", value=0),
        _set("models", "teacher", "base_url", value="https://elsewhere.example/v1"),
        _set("models", "spare", value={"base_url": "http://x/v1", "model": "other"}),
        _set("journal", value={"fsync": "always"}),
        _set("max_conversations", value=10),
    ],
    ids=[
        "max_concurrency",
        "timeout_s",
        "max_retries",
        "base_url",
        "unused_model",
        "journal",
        "max_conv",
    ],
)
def test_fingerprint_ignores_caps_timeouts_and_urls(edit: Any) -> None:
    assert _fingerprint(edit) == BASE


def test_fingerprint_of_a_preference_run() -> None:
    raw = preference(generators=["a", "b"], judge="judge")
    fields = parse(raw).fingerprint_fields()
    assert fields["task"] == "preference"
    assert set(fields["models"]) == {"a", "b", "judge"}
    assert fields["preference"] == {
        "generators": ["a", "b"],
        "num_generations": 1,
        "judge": "judge",
        "aspect": "overall",
    }
    raw["preference"]["aspect"] = "honesty"
    assert parse(raw).fingerprint_fields() != fields


# --- distill.turns and model names ------------------------------------------------------


def test_turns_default_to_every_user_and_are_in_the_fingerprint() -> None:
    config = parse(example())
    assert isinstance(config.section, DistillConfig)
    assert config.section.turns == "every_user"
    assert config.fingerprint_fields()["distill"]["turns"] == "every_user"


def test_turns_as_in_input_is_accepted() -> None:
    raw = example()
    raw["distill"]["turns"] = "as_in_input"
    config = parse(raw)
    assert isinstance(config.section, DistillConfig)
    assert config.section.turns == "as_in_input"


def test_an_unknown_turn_rule_names_both_rules() -> None:
    raw = example()
    raw["distill"]["turns"] = "each"
    problem = one_problem(raw)
    assert problem.startswith("distill.turns: ")
    assert "every_user" in problem and "as_in_input" in problem and "'each'" in problem


@pytest.mark.parametrize("name", ["a+b", "my model", "x/y", "tea:cher", "é"])
def test_model_names_must_be_plain(name: str) -> None:
    raw = example()
    raw["models"] = {name: raw["models"]["teacher"]}
    raw["distill"]["model"] = name
    found = problems(raw)
    assert any(p.startswith(f"models.{name}: ") and "letters, digits" in p for p in found), found


@pytest.mark.parametrize("name", ["teacher", "gen-1", "qwen2.5_7b", "A"])
def test_plain_model_names_are_accepted(name: str) -> None:
    raw = example()
    raw["models"] = {name: raw["models"]["teacher"]}
    raw["distill"]["model"] = name
    assert set(parse(raw).models) == {name}
