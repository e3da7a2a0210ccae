"""End to end: `task: preference` with two generators and a judge on the mock server."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
import yaml

from engine.config import load_config
from engine.stats import RunStats
from engine.tasks.asking import Sample
from engine.tasks.base import Context
from engine.tasks.preference.judge import judge_messages
from engine.tasks.preference.judge_json import ratings_schema
from engine.testing.mock_replies import json_reply, judge_rating
from engine.testing.mock_server import Faults, MockServer, reply_for, request_key
from tests.conftest import by_id, kill_after, read_jsonl, turnstile, write_jsonl


def prompts(n: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for i in range(n):
        if i % 3 == 0:
            rows.append({"id": f"p{i}", "prompt": f"explain topic number {i}", "level": i % 2})
        else:
            rows.append(
                {
                    "id": f"p{i}",
                    "messages": [
                        {"role": "system", "content": "answer well"},
                        {"role": "user", "content": f"first question {i}"},
                        {"role": "assistant", "content": "an earlier answer"},
                        {"role": "user", "content": f"follow-up question {i}"},
                        {"role": "assistant", "content": "to be dropped from the prompt"},
                    ],
                }
            )
    return rows


def prefs_config(
    folder: Path,
    base_url: str,
    *,
    caps: tuple[int, int, int] = (4, 4, 2),
    num_generations: int = 1,
    judge: bool = True,
    b_model: str = "gen-b",
    retries: int = 6,
    down_after_s: float = 300,
) -> Path:
    def model(name: str, cap: int) -> dict[str, Any]:
        return {
            "base_url": base_url,
            "model": name,
            "max_concurrency": cap,
            "timeout_s": 10,
            "max_retries": retries,
            "down_after_s": down_after_s,
        }

    preference: dict[str, Any] = {
        "generators": ["a", "b"],
        "num_generations": num_generations,
        "aspect": "helpfulness",
    }
    if judge:
        preference["judge"] = "judge"
    config = {
        "task": "preference",
        "input": "in.jsonl",
        "output": "out/prefs.jsonl",
        "checkpoint_dir": "ck",
        "models": {
            "a": model("gen-a", caps[0]),
            "b": model(b_model, caps[1]),
            "judge": model("judge-m", caps[2]),
        },
        "preference": preference,
    }
    path = folder / "prefs.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def expected_prompt(source: dict[str, Any]) -> list[dict[str, str]]:
    if "prompt" in source:
        return [{"role": "user", "content": source["prompt"]}]
    return source["messages"][:4]


async def test_rows_carry_generations_ratings_and_a_trl_pair(
    tmp_path: Path, mock: MockServer
) -> None:
    source = prompts(12)
    write_jsonl(tmp_path / "in.jsonl", source)
    config = prefs_config(tmp_path, mock.base_url, num_generations=2)

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 0, result.stderr
    rows = by_id(read_jsonl(tmp_path / "out" / "prefs.jsonl"))
    assert set(rows) == {s["id"] for s in source}
    for src in source:
        row = rows[src["id"]]
        prompt = expected_prompt(src)
        assert row["prompt"] == prompt
        assert row["generation_models"] == ["gen-a", "gen-a", "gen-b", "gen-b"]
        assert row["generations"][0] == reply_for("gen-a", prompt)
        assert row["generations"][2] == reply_for("gen-b", prompt)
        assert row["ratings"] == [judge_rating(g) for g in row["generations"]]
        assert len(row["rationales"]) == 4
        ratings = row["ratings"]
        if len(set(ratings)) > 1:
            best = ratings.index(max(ratings))
            worst = ratings.index(min(ratings))
            assert row["chosen"] == [{"role": "assistant", "content": row["generations"][best]}]
            assert row["rejected"] == [{"role": "assistant", "content": row["generations"][worst]}]
            assert row["chosen_model"] == row["generation_models"][best]
            # The generator entries (a, b) too: two may serve the same model.
            assert row["chosen_generator"] == ["a", "a", "b", "b"][best]
            assert row["rejected_generator"] == ["a", "a", "b", "b"][worst]
            assert row["chosen_rating"] == max(ratings)
            assert row["rejected_rating"] == min(ratings)
            assert row["pair_error"] is None
        else:
            assert row["chosen"] is None and "equal" in row["pair_error"]
        assert row["generation_errors"] == []
        assert row["usage"]["prompt_tokens"] > 0
        if "level" in src:
            assert row["level"] == src["level"]
    # Each prompt: 4 generations and one judge request, nothing more.
    assert mock.stats.completed == len(source) * 5


async def test_all_equal_and_unusable_ratings_leave_the_row_unpaired(
    tmp_path: Path, mock: MockServer
) -> None:
    write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"id": "tie", "prompt": "[[rating=3]] every answer echoes this"},
            {"id": "null", "prompt": "[[rating=none]] no answer can be rated"},
        ],
    )
    config = prefs_config(tmp_path, mock.base_url)

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 0, result.stderr
    rows = by_id(read_jsonl(tmp_path / "out" / "prefs.jsonl"))
    assert rows["tie"]["ratings"] == [3, 3]
    assert rows["tie"]["chosen"] is None and rows["tie"]["rejected"] is None
    assert "equal" in rows["tie"]["pair_error"]
    assert rows["null"]["ratings"] == [None, None]
    assert "no usable rating" in rows["null"]["pair_error"]
    assert rows["null"]["generations"]  # kept, for a later judge
    judge_requests = mock.stats.peak_in_flight_by_model  # judge-m was asked
    assert "judge-m" in judge_requests
    # The unusable judge reply was asked for twice; the tie's once.
    assert mock.stats.completed == 2 * 2 + 1 + 2


@pytest.mark.parametrize(
    ("status", "error"),
    [(400, "HTTP 400"), (500, "models.b down for 0.5 s")],
    ids=["a_4xx_fails_each_generation", "a_5xx_for_down_after_s_is_down"],
)
async def test_a_generator_that_always_fails_does_not_stop_the_others(
    tmp_path: Path, mock: MockServer, status: int, error: str
) -> None:
    mock.faults = Faults(fail_models={"broken": status})
    source = prompts(6)
    write_jsonl(tmp_path / "in.jsonl", source)
    config = prefs_config(
        tmp_path, mock.base_url, num_generations=2, b_model="broken", retries=1, down_after_s=0.5
    )

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 0, result.stderr
    rows = read_jsonl(tmp_path / "out" / "prefs.jsonl")
    assert len(rows) == len(source)
    for row in rows:
        assert row["generation_models"] == ["gen-a", "gen-a"]
        assert [e["model"] for e in row["generation_errors"]] == ["broken", "broken"]
        assert error in row["generation_errors"][0]["error"]
        assert row["ratings"] is not None and len(row["ratings"]) == 2


async def test_each_model_keeps_its_own_cap(tmp_path: Path, mock: MockServer) -> None:
    mock.latency_ms = 15
    write_jsonl(tmp_path / "in.jsonl", prompts(40))
    config = prefs_config(tmp_path, mock.base_url, caps=(2, 5, 1), num_generations=2)

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 0, result.stderr
    peaks = mock.stats.peak_in_flight_by_model
    caps = {"gen-a": 2, "gen-b": 5, "judge-m": 1}
    assert set(peaks) == set(caps)
    for model, cap in caps.items():
        assert peaks[model] <= cap, f"{model}: {peaks[model]} in flight, above its cap of {cap}"
    # 80 requests to each generator and 40 to the judge, each held 15 ms, with 10 rows
    # in flight: every cap is reached.
    for model, cap in caps.items():
        assert peaks[model] == cap, f"{model}: its cap of {cap} was never reached"


async def test_a_reply_cut_off_by_max_tokens_is_filtered_and_an_input_column_is_not(
    tmp_path: Path, mock: MockServer
) -> None:
    long = " ".join("abcdefghijklmnopqrst")  # gen-a's reply to it is over 10 words
    write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"id": "long", "prompt": long},
            # gen-a's 5-word reply to "x" is whole: this column must not filter the row.
            {"id": "short", "prompt": "x", "truncated_generations": [0, 1]},
        ],
    )
    path = prefs_config(tmp_path, mock.base_url)
    config = yaml.safe_load(path.read_text())
    config["models"]["a"]["params"] = {"max_tokens": 10}
    config["filters"] = {"truncated": True}
    path.write_text(yaml.safe_dump(config))

    result = await turnstile("run", str(path), "--quiet")

    assert result.returncode == 0, result.stderr
    kept = by_id(read_jsonl(tmp_path / "out" / "prefs.jsonl"))
    filtered = by_id(read_jsonl(tmp_path / "out" / "prefs.filtered.jsonl"))
    assert set(kept) == {"short"} and set(filtered) == {"long"}
    assert "truncated_generations" not in kept["short"]  # the task's own key, never the input's
    row = filtered["long"]
    assert row["truncated_generations"] == [0]  # gen-a's, cut by max_tokens; gen-b's is whole
    assert len(row["generations"][0].split()) == 10
    if row["chosen"] is None:  # unpaired: every generation is checked
        where = "generation 0"
    else:
        where = "chosen (gen-a)" if row["chosen_model"] == "gen-a" else "rejected (gen-a)"
    assert row["filter"] == f"truncated: the reply in {where} was cut off by max_tokens"


def test_a_resumed_row_remembers_which_generations_were_cut_off(tmp_path: Path) -> None:
    config = load_config(prefs_config(tmp_path, "http://127.0.0.1:1/v1"), check_env=False)
    ctx = Context(config, config.kind, writer=None, clients={}, stats=RunStats())  # type: ignore[arg-type]
    row = ctx.row(
        0,
        [
            {"k": "g", "l": 0, "s": 0, "c": "cut", "p": 1, "o": 10, "f": "length"},
            {"k": "g", "l": 0, "s": 1, "c": "whole", "p": 1, "o": 2, "f": "stop"},
        ],
    )
    replayed = [row.replayed(Sample(i)) for i in (0, 1)]
    assert [a.finish_reason if a else None for a in replayed] == ["length", "stop"]
    assert ctx.stats.turns_resumed == 2  # resumed generations are counted (the ETA's)


async def test_without_a_judge_rows_carry_generations_only(
    tmp_path: Path, mock: MockServer
) -> None:
    write_jsonl(tmp_path / "in.jsonl", prompts(3))
    config = prefs_config(tmp_path, mock.base_url, judge=False)

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 0, result.stderr
    for row in read_jsonl(tmp_path / "out" / "prefs.jsonl"):
        assert len(row["generations"]) == 2
        assert row["ratings"] is None and row["chosen"] is None
        assert row["pair_error"] == "no judge configured"
    assert "judge-m" not in mock.stats.peak_in_flight_by_model


async def test_sigkill_then_rerun_equals_an_uninterrupted_run(
    tmp_path: Path, mock: MockServer
) -> None:
    source = prompts(80)
    reference = tmp_path / "reference"
    reference.mkdir()
    write_jsonl(reference / "in.jsonl", source)
    done = await turnstile("run", str(prefs_config(reference, mock.base_url)), "--quiet")
    assert done.returncode == 0, done.stderr
    expected = by_id(read_jsonl(reference / "out" / "prefs.jsonl"))

    mock.reset()
    mock.latency_ms = 5
    write_jsonl(tmp_path / "in.jsonl", source)
    config = prefs_config(tmp_path, mock.base_url)
    killed = await kill_after(mock, 120, "run", str(config), "--quiet")
    assert killed.returncode == -signal.SIGKILL

    rerun = await turnstile("run", str(config), "--quiet")

    assert rerun.returncode == 0, rerun.stderr
    assert by_id(read_jsonl(tmp_path / "out" / "prefs.jsonl")) == expected
    repeated = sum(c - 1 for c in mock.stats.requests_by_key.values() if c > 1)
    # Only requests in flight at the kill may be sent again: at most the caps
    # (4 + 4 + 2) plus replies that had arrived but were not yet journaled.
    assert repeated <= 2 * 10


# --- the judge's prompt and reply format -------------------------------------------

JUDGE_TEMPLATE = """\
Judge for {{ aspect }}: {{ prompt[-1].content }}
{% for g in generations %}<text {{ loop.index }}> {{ g }}
{% endfor %}### Output
"""


def judge_config(folder: Path, base_url: str, **keys: Any) -> Path:
    """``prefs_config`` with ``keys`` added to its preference section."""
    path = prefs_config(folder, base_url)
    config = yaml.safe_load(path.read_text())
    config["preference"].update(keys)
    path.write_text(yaml.safe_dump(config))
    return path


async def test_the_judge_sees_the_configs_own_template_rendered(
    tmp_path: Path, mock: MockServer
) -> None:
    source = prompts(6)
    write_jsonl(tmp_path / "in.jsonl", source)
    (tmp_path / "judge.j2").write_text(JUDGE_TEMPLATE)
    config = judge_config(tmp_path, mock.base_url, judge_template="judge.j2")

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 0, result.stderr
    rows = by_id(read_jsonl(tmp_path / "out" / "prefs.jsonl"))
    for src in source:
        row = rows[src["id"]]
        prompt = expected_prompt(src)
        generations = [reply_for("gen-a", prompt), reply_for("gen-b", prompt)]
        assert row["generations"] == generations
        rendered = (
            f"Judge for helpfulness: {prompt[-1]['content']}\n"
            + "".join(f"<text {i}> {g}\n" for i, g in enumerate(generations, start=1))
            + "### Output"
        )
        judge_request = [{"role": "user", "content": rendered}]
        assert mock.stats.requests_by_key[request_key("judge-m", judge_request)] == 1
        ratings = [judge_rating(g) for g in generations]
        assert row["ratings"] == ratings
        assert row["rationales"] == [
            f"The mock judge gives text {i} a {r} out of 5." for i, r in enumerate(ratings, 1)
        ]
    assert mock.stats.completed == len(source) * 3


async def test_a_json_judge_s_ratings_are_read_from_its_structured_reply(
    tmp_path: Path, mock: MockServer
) -> None:
    source = prompts(6)
    write_jsonl(tmp_path / "in.jsonl", source)
    config = judge_config(tmp_path, mock.base_url, judge_format="json")

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 0, result.stderr
    rows = by_id(read_jsonl(tmp_path / "out" / "prefs.jsonl"))
    for src in source:
        row = rows[src["id"]]
        prompt = expected_prompt(src)
        generations = [reply_for("gen-a", prompt), reply_for("gen-b", prompt)]
        messages = judge_messages(prompt, generations, "helpfulness", judge_format="json")
        assert mock.stats.requests_by_key[request_key("judge-m", messages)] == 1
        # What the mock answers a request carrying the ratings schema.
        answer = json_reply(ratings_schema(2), reply_for("judge-m", messages))["ratings"]
        assert row["ratings"] == [entry["rating"] for entry in answer]
        assert row["rationales"] == [entry["rationale"] for entry in answer]
        # The mock rates every entry alike, so no JSON-judged row of it has a pair.
        assert row["pair_error"] == f"all ratings are equal ({answer[0]['rating']})"
    assert mock.stats.completed == len(source) * 3


async def test_a_judge_template_that_does_not_compile_stops_before_any_request(
    tmp_path: Path, mock: MockServer
) -> None:
    write_jsonl(tmp_path / "in.jsonl", prompts(2))
    (tmp_path / "judge.j2").write_text("{{ prompt }}\n{% for g in generations %}\n{{ g }\n")
    config = judge_config(tmp_path, mock.base_url, judge_template="judge.j2")

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 2, result.stderr
    assert "preference.judge_template: " in result.stderr
    assert "judge.j2, line 3: the template does not compile" in result.stderr
    assert mock.stats.total_requests == 0
