"""Configs a careless or hostile user writes: each is a config error (exit 2) naming the key,
caught before anything runs, never a crash, a hang or a fetch at run time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine.cli import build_parser
from engine.config import load_config, parse_config
from engine.errors import ConfigError
from engine.problems import MOST_CONCURRENCY, MOST_CONVERSATIONS, MOST_GENERATIONS
from tests.conftest import turnstile, write_jsonl


def distill(**top: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "task": "distill",
        "input": "in.jsonl",
        "output": "out.jsonl",
        "models": {"teacher": {"base_url": "http://127.0.0.1:8080/v1", "model": "m"}},
        "distill": {"model": "teacher"},
    }
    raw.update(top)
    return raw


def problems_of(raw: dict[str, Any], tmp_path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, tmp_path / "cfg.yaml", env={})
    return info.value.problems


# -- caps that size queues and task counts --------------------------------------------


@pytest.mark.parametrize(
    ("task", "key", "most"),
    [
        ("distill", "models.teacher.max_concurrency", MOST_CONCURRENCY),
        ("distill", "max_conversations", MOST_CONVERSATIONS),
        ("generate", "generate.num_generations", MOST_GENERATIONS),
        ("preference", "preference.num_generations", MOST_GENERATIONS),
    ],
)
def test_a_cap_past_its_sane_range_is_refused_naming_the_range(
    tmp_path: Path, task: str, key: str, most: int
) -> None:
    raw = distill()
    if task == "generate":
        raw.pop("distill")
        raw.update(task="generate", generate={"model": "teacher", "template": "{{ q }}"})
    elif task == "preference":
        raw.pop("distill")
        raw.update(task="preference", preference={"generators": ["teacher"]})
    *parents, last = key.split(".")
    target = raw
    for part in parents:
        target = target.setdefault(part, {})
    target[last] = 1_000_000_000
    [problem] = problems_of(raw, tmp_path)
    assert problem.startswith(f"{key}: ")
    assert f"from 1 to {most:,}" in problem and "1,000,000,000" in problem

    target[last] = most
    parse_config(raw, tmp_path / "cfg.yaml", env={})  # the top of the range is fine


# -- base URLs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("http:///v1", "names no host"),
        ("http://127.0.0.1:99999/v1", "1-65535"),
        ("http://127.0.0.1:0/v1", "1-65535"),
        ("http://127.0.0.1:80x/v1", "1-65535"),
        ("http://127.0.0.1:8080/v1 ", "holds a space"),
        (" http://127.0.0.1:8080/v1", "holds a space"),
        ("http://127.0.0.1: 8080/v1", "holds a space"),
    ],
)
def test_a_url_that_cannot_be_requested_is_a_config_error(
    tmp_path: Path, url: str, fragment: str
) -> None:
    raw = distill()
    raw["models"]["teacher"]["base_url"] = url
    [problem] = problems_of(raw, tmp_path)
    assert problem.startswith("models.teacher.base_url: ")
    assert fragment in problem and "not an http(s) URL" in problem


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8080/v1", "https://api.example.com/v1/", "http://[::1]:8080/v1"]
)
def test_usable_urls_still_pass(tmp_path: Path, url: str) -> None:
    raw = distill()
    raw["models"]["teacher"]["base_url"] = url
    parse_config(raw, tmp_path / "cfg.yaml", env={})


# -- YAML that expands past any real config -------------------------------------------

ALIAS_BOMB = """\
task: distill
input: in.jsonl
output: out.jsonl
distill: {model: teacher}
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]
models:
  teacher:
    base_url: http://127.0.0.1:8080/v1
    model: m
    params: {stop: *g}
"""


def test_a_yaml_alias_bomb_is_a_config_error_not_a_huge_manifest(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(ALIAS_BOMB)
    with pytest.raises(ConfigError) as info:
        load_config(path, check_env=False)
    [problem] = info.value.problems
    assert "expands to more than 100,000 values" in problem and "aliases" in problem


def test_an_alias_that_holds_itself_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(ALIAS_BOMB.split("a: &a")[0] + "loop: &loop [1, *loop]\n")
    with pytest.raises(ConfigError, match="holds itself"):
        load_config(path, check_env=False)


def test_aliases_in_a_config_of_ordinary_size_are_fine(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(
        ALIAS_BOMB.split("a: &a")[0]
        + "models:\n"
        + "  teacher: &t {base_url: 'http://127.0.0.1:8080/v1', model: m, params: {top_p: 1}}\n"
        + "  other: *t\n"
    )
    config = load_config(path, check_env=False)
    assert config.models["other"].params == {"top_p": 1}


async def test_an_alias_bomb_exits_2_before_anything_is_written(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(ALIAS_BOMB)
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "q"}])
    done = await turnstile("run", str(path), "--quiet")
    assert done.returncode == 2, done.stderr
    assert "expands to more than" in done.stderr
    assert not (tmp_path / "out.jsonl").exists()


# -- JSON Schema references -----------------------------------------------------------


def generate(schema: dict[str, Any]) -> dict[str, Any]:
    raw = distill()
    raw.pop("distill")
    raw.update(
        task="generate",
        generate={"model": "teacher", "template": "{{ q }}", "json_schema": schema},
    )
    return raw


@pytest.mark.parametrize(
    "ref", ["http://127.0.0.1:9/schema.json", "file:///etc/passwd", "#/$defs/missing"]
)
def test_a_json_schema_ref_outside_the_schema_is_refused_at_config_time(
    tmp_path: Path, ref: str
) -> None:
    schema = {"type": "object", "properties": {"a": {"$ref": ref}}}
    [problem] = problems_of(generate(schema), tmp_path)
    assert problem.startswith("generate.json_schema: ")
    assert repr(ref) in problem and "never fetched" in problem


def test_a_json_schema_ref_inside_the_schema_is_fine(tmp_path: Path) -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/n"}, "b": {"$ref": "#/properties/a"}},
        "$defs": {"n": {"type": "integer"}},
    }
    parse_config(generate(schema), tmp_path / "cfg.yaml", env={})


# -- the CLI's own flags ----------------------------------------------------------------


@pytest.mark.parametrize("port", ["70000", "-1", "http"])
def test_a_metrics_port_out_of_range_is_a_usage_error_naming_the_flag(
    port: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["run", "cfg.yaml", "--metrics-port", port])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--metrics-port" in err and "1 to 65535" in err
