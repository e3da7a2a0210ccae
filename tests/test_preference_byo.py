"""End to end: preference rows that bring their own generations, on the mock server."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
import yaml

from engine.tasks.preference.judge import judge_messages
from engine.testing.mock_replies import INVALID_JSON, judge_rating
from engine.testing.mock_server import Faults, MockServer, reply_for, request_key
from tests.conftest import by_id, kill_after, read_jsonl, turnstile, write_jsonl


def byo_config(
    folder: Path,
    base_url: str,
    *,
    generators: list[str] | None = None,
    judge_cap: int = 2,
    **preference: Any,
) -> Path:
    """A preference config over ``in.jsonl``'s ``instruction`` and ``responses`` columns."""

    def model(name: str, cap: int) -> dict[str, Any]:
        return {
            "base_url": base_url,
            "model": name,
            "max_concurrency": cap,
            "timeout_s": 10,
            "max_retries": 6,
        }

    section: dict[str, Any] = {"judge": "judge", **preference}
    if generators is not None:
        section["generators"] = generators
    config = {
        "task": "preference",
        "input": "in.jsonl",
        "output": "out/prefs.jsonl",
        "checkpoint_dir": "ck",
        "input_columns": {
            "prompt": "instruction",
            "generations": "responses",
            "generation_models": "authors",
        },
        "models": {
            "a": model("gen-a", 4),
            "b": model("gen-b", 4),
            "judge": model("judge-m", judge_cap),
        },
        "preference": section,
    }
    path = folder / "prefs.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def dataset(n: int) -> list[dict[str, Any]]:
    """An existing dataset: instructions with 1..3 responses each, some with authors."""
    rows: list[dict[str, Any]] = []
    for i in range(n):
        responses = [f"response {j} to instruction {i}" for j in range(1 + i % 3)]
        row: dict[str, Any] = {"id": f"d{i}", "instruction": f"instruction {i}", "split": "x"}
        row["responses"] = responses
        if i % 2:
            row["authors"] = [f"author-{j}" for j in range(len(responses))]
        rows.append(row)
    return rows


def prompt_of(src: dict[str, Any]) -> list[dict[str, str]]:
    return [{"role": "user", "content": src["instruction"]}]


def authors_of(src: dict[str, Any]) -> list[str]:
    return src.get("authors", ["input"] * len(src["responses"]))


async def test_brought_generations_come_first_and_are_judged_with_the_generators(
    tmp_path: Path, mock: MockServer
) -> None:
    source = dataset(9)
    write_jsonl(tmp_path / "in.jsonl", source)
    config = byo_config(tmp_path, mock.base_url, generators=["a", "b"])

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 0, result.stderr
    rows = by_id(read_jsonl(tmp_path / "out" / "prefs.jsonl"))
    assert set(rows) == {s["id"] for s in source}
    for src in source:
        row = rows[src["id"]]
        prompt = prompt_of(src)
        assert row["prompt"] == prompt
        made = [reply_for("gen-a", prompt), reply_for("gen-b", prompt)]
        assert row["generations"] == src["responses"] + made
        assert row["generation_models"] == [*authors_of(src), "gen-a", "gen-b"]
        assert row["ratings"] == [judge_rating(g) for g in row["generations"]]
        judged = judge_messages(prompt, row["generations"], "overall")
        assert mock.stats.requests_by_key[request_key("judge-m", judged)] == 1
        # The columns the generations came from are consumed; the others are carried.
        assert row["split"] == "x"
        assert "responses" not in row and "authors" not in row
        assert next(iter(row)) == "split"
    # Two generations and one judge request per row, nothing more.
    assert mock.stats.completed == len(source) * 3


async def test_without_generators_only_the_judge_runs(tmp_path: Path, mock: MockServer) -> None:
    source = dataset(9)
    source.append({"id": "none", "instruction": "nothing to rate"})
    # A row may hold the keys themselves: input_columns moves the columns it names only.
    source.append(
        {
            "id": "own",
            "instruction": "q",
            "generations": ["yes", "no"],
            "generation_models": ["m1", "m2"],
        }
    )
    write_jsonl(tmp_path / "in.jsonl", source)
    config = byo_config(tmp_path, mock.base_url, generators=[])

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 0, result.stderr
    rows = by_id(read_jsonl(tmp_path / "out" / "prefs.jsonl"))
    assert set(rows) == {s["id"] for s in source}
    judged = 0
    for src in source:
        row = rows[src["id"]]
        responses = src.get("responses", src.get("generations", []))
        authors = src.get("authors", src.get("generation_models", ["input"] * len(responses)))
        assert row["generations"] == responses
        assert row["generation_models"] == authors
        assert row["generation_errors"] == []
        if len(responses) < 2:
            assert row["ratings"] == [None] * len(responses)
            n = len(responses)
            assert row["pair_error"] == f"fewer than two generations to compare ({n} of {n})"
            continue
        judged += 1
        ratings = [judge_rating(g) for g in responses]
        assert row["ratings"] == ratings
        if len(set(ratings)) > 1:
            assert row["chosen"] == [
                {"role": "assistant", "content": responses[ratings.index(max(ratings))]}
            ]
            assert row["chosen_model"] == authors[ratings.index(max(ratings))]
        assert row["usage"]["prompt_tokens"] > 0  # the judge's, the only tokens spent
    assert judged == 7
    assert mock.stats.completed == judged
    assert set(mock.stats.peak_in_flight_by_model) == {"judge-m"}


@pytest.mark.parametrize("generators", [[], ["a"]], ids=["judge_only", "with_a_generator"])
async def test_sigkill_then_rerun_equals_an_uninterrupted_run(
    tmp_path: Path, mock: MockServer, generators: list[str]
) -> None:
    source = [s for s in dataset(90) if len(s["responses"]) >= 2 or generators]
    reference = tmp_path / "reference"
    reference.mkdir()
    write_jsonl(reference / "in.jsonl", source)
    done = await turnstile(
        "run", str(byo_config(reference, mock.base_url, generators=generators)), "--quiet"
    )
    assert done.returncode == 0, done.stderr
    expected = by_id(read_jsonl(reference / "out" / "prefs.jsonl"))
    assert len(expected) == len(source)

    mock.reset()
    mock.latency_ms = 5
    write_jsonl(tmp_path / "in.jsonl", source)
    config = byo_config(tmp_path, mock.base_url, generators=generators)
    killed = await kill_after(mock, 40, "run", str(config), "--quiet")
    assert killed.returncode == -signal.SIGKILL
    assert 0 < len(read_jsonl(tmp_path / "out" / "prefs.jsonl")) < len(source)

    rerun = await turnstile("run", str(config), "--quiet")

    assert rerun.returncode == 0, rerun.stderr
    assert by_id(read_jsonl(tmp_path / "out" / "prefs.jsonl")) == expected
    judge_keys = {
        request_key("judge-m", judge_messages(row["prompt"], row["generations"], "overall"))
        for row in expected.values()
    }
    counts = mock.stats.requests_by_key
    repeated_judge = sum(counts[k] - 1 for k in judge_keys if counts[k] > 1)
    repeated = sum(c - 1 for c in counts.values() if c > 1)
    # Only requests in flight at the kill may be sent again: at most the caps (the
    # judge's 2, gen-a's 4), plus replies that had arrived but were not yet journaled.
    assert repeated_judge <= 2 * 2
    assert repeated <= 2 * (2 + (4 if generators else 0))


async def test_a_malformed_generations_field_fails_its_row_only(
    tmp_path: Path, mock: MockServer
) -> None:
    good = dataset(4)
    bad = [
        {"id": "str", "instruction": "q", "responses": "one long response"},
        {"id": "num", "instruction": "q", "responses": ["fine", 3]},
        {"id": "short", "instruction": "q", "responses": ["a", "b"], "authors": ["m"]},
        {"id": "names", "instruction": "q", "responses": ["a", "b"], "authors": "m"},
    ]
    source = good[:2] + bad + good[2:]
    write_jsonl(tmp_path / "in.jsonl", source)
    config = byo_config(tmp_path, mock.base_url, generators=["a"])

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 1, result.stderr
    rows = by_id(read_jsonl(tmp_path / "out" / "prefs.jsonl"))
    assert set(rows) == {s["id"] for s in good}
    failed = by_id(read_jsonl(tmp_path / "out" / "prefs.failed.jsonl"))
    assert set(failed) == {"str", "num", "short", "names"}
    assert {k: failed[k]["line"] for k in failed} == {"str": 2, "num": 3, "short": 4, "names": 5}
    assert failed["str"]["error"].startswith(
        "input: 'generations' must be a list of strings (the responses to rate), got str; "
        "map a list column onto it with input_columns"
    )
    assert failed["num"]["error"].startswith("input: 'generations[1]' must be a string, got int")
    assert failed["short"]["error"].startswith(
        "input: 'generation_models' has 1 names for 2 generations"
    )
    assert failed["names"]["error"].startswith(
        "input: 'generation_models' must be a list of model names"
    )
    # A failed row sent nothing: one generation and one judge request per good row.
    assert mock.stats.completed == len(good) * 2


async def test_an_invalid_json_judge_reply_is_asked_again_once(
    tmp_path: Path, mock: MockServer
) -> None:
    mock.faults = Faults(rate_invalid_json=0.6, seed=3)
    source = [s for s in dataset(60) if len(s["responses"]) >= 2]
    write_jsonl(tmp_path / "in.jsonl", source)
    config = byo_config(tmp_path, mock.base_url, generators=[], judge_format="json")

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 0, result.stderr
    rows = by_id(read_jsonl(tmp_path / "out" / "prefs.jsonl"))
    assert set(rows) == {s["id"] for s in source}
    invalid = sent = 0
    outcomes = set()
    for src in source:
        row = rows[src["id"]]
        messages = judge_messages(prompt_of(src), src["responses"], "overall", judge_format="json")
        asked = mock.stats.requests_by_key[request_key("judge-m", messages)]
        assert asked in (1, 2)
        sent += asked
        if row["ratings"][0] is None:  # both replies invalid: unpaired, with a note
            assert asked == 2
            assert row["ratings"] == [None] * len(src["responses"])
            assert row["pair_error"].startswith(
                "the judge gave no usable rating in 2 replies (the last one: the reply is not JSON"
            )
            invalid += 2
            outcomes.add("unrated")
        else:  # the first reply, or the one retry, fitted the schema
            assert all(isinstance(r, int) and 1 <= r <= 5 for r in row["ratings"])
            invalid += asked - 1
            outcomes.add("retried" if asked == 2 else "rated")
    assert outcomes == {"rated", "retried", "unrated"}
    assert invalid == mock.stats.faults[INVALID_JSON]
    assert mock.stats.total_requests == sent  # no other request, none sent a third time
