"""``task: requests`` end to end on the mock server: an OpenAI batch input file run online
(all three urls, bodies sent as they are), its failures as error-file lines, duplicate
custom_ids refused, a SIGKILLed run resumed exactly, replicas, and the export in input
order in the shape ``vllm run-batch`` writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio.lowlevel
import orjson
import pytest
import yaml

from engine._api import load
from engine.checkpoint.checkpoint import Checkpoint
from engine.checkpoint.journal import WRITING
from engine.cost import SPENT, worst_case_body
from engine.errors import EXIT_BUDGET
from engine.http.client import HttpEndpoint
from engine.http.settings import HttpSettings
from engine.tasks.asking import RAW
from engine.testing.mock_replies import Faults, raw_request_key
from engine.testing.mock_server import MockServer
from tests.conftest import kill_after, read_jsonl, turnstile, write_jsonl

URLS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


def batch_line(i: int, *, url: str | None = None, model: str = "mock") -> dict[str, Any]:
    """Line ``i`` of a batch file, its url taking turns over the three (or ``url``)."""
    url = url or URLS[i % 3]
    if url == "/v1/chat/completions":
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": "user", "content": f"question {i}"}],
            "temperature": 0.5,
            "max_tokens": 64,
        }
    elif url == "/v1/completions":
        body = {"model": model, "prompt": f"Once upon a time {i}", "n": 2, "seed": i}
    else:
        body = {"model": model, "input": [f"text {i}", f"more {i}"], "dimensions": 4}
    return {"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body}


def requests_config(
    folder: Path,
    base_urls: list[str],
    lines: list[Any],
    *,
    cap: int = 4,
    **extra: Any,
) -> Path:
    server = extra.pop("server", {})
    config = {
        "task": "requests",
        "input": "batch_input.jsonl",
        "output": "out/batch_output.jsonl",
        "checkpoint_dir": "ck",
        "models": {
            "server": {
                "base_url": base_urls if len(base_urls) > 1 else base_urls[0],
                "max_concurrency": cap,
                "timeout_s": 10,
                "max_retries": 6,
                **server,
            }
        },
        "requests": {"model": "server"},
        "progress_interval_s": 60,
        **extra,
    }
    write_jsonl(folder / "batch_input.jsonl", lines)
    path = folder / "requests.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def by_custom_id(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        assert row["custom_id"] not in out, f"{row['custom_id']} appears twice"
        out[row["custom_id"]] = row
    return out


async def test_a_batch_file_runs_on_the_mock_bodies_sent_as_they_are_failures_as_error_lines(
    tmp_path: Path, mock: MockServer
) -> None:
    lines: list[Any] = [batch_line(i) for i in range(9)]
    # Line 9 the server refuses for good (a 400: 'messages' is not a list), line 10 is
    # no request at all, and line 11 is blank (blank lines count, as everywhere).
    lines.append(
        {
            "custom_id": "bad",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "mock", "messages": "hi"},
        }
    )
    lines += [{"custom_id": "odd", "method": "POST", "url": "/v1/files", "body": {}}, ""]
    lines.append(batch_line(12))
    mock.recorded = []
    config = requests_config(tmp_path, [mock.base_url], lines)

    done = await turnstile("run", str(config), "--quiet")

    assert done.returncode == 1, done.stderr  # the run's exit when rows failed
    assert "2 rows failed" in done.stderr
    # Every body reached its path exactly as the file holds it.
    sent: dict[str, list[Any]] = {}
    for path, body in mock.recorded:
        sent.setdefault(path, []).append(body)
    usable = [line for line in lines if isinstance(line, dict) and line["custom_id"] != "odd"]
    for url in URLS:
        expected = [line["body"] for line in usable if line["url"] == url]
        assert sorted(map(orjson.dumps, sent[url])) == sorted(map(orjson.dumps, expected))
    out = by_custom_id(read_jsonl(tmp_path / "out" / "batch_output.jsonl"))
    assert sorted(out) == sorted(f"req-{i}" for i in [*range(9), 12])
    for i in [*range(9), 12]:
        row = out[f"req-{i}"]
        assert list(row) == ["id", "custom_id", "response", "error"] and row["error"] is None
        assert row["response"]["status_code"] == 200
        body = row["response"]["body"]
        kind = {"/v1/chat/completions": "chat.completion", "/v1/completions": "text_completion"}
        assert body["object"] == kind.get(batch_line(i)["url"], "list")
    assert len(out["req-1"]["response"]["body"]["choices"]) == 2  # n: 2, sent as it was
    assert len(out["req-2"]["response"]["body"]["data"][0]["embedding"]) == 4
    failed = {
        row["line"]: row for row in read_jsonl(tmp_path / "out" / "batch_output.failed.jsonl")
    }
    assert sorted(failed) == [9, 10]
    assert failed[9]["custom_id"] == "bad" and failed[9]["response"] is None
    assert failed[9]["error"]["code"] == "http_400" and "messages" in failed[9]["error"]["message"]
    assert (
        failed[10]["error"]["code"] == "invalid_request"
        and "'url'" in failed[10]["error"]["message"]
    )
    assert set(failed[9]) == {"id", "custom_id", "response", "error", "line"}

    exported = await turnstile("export", str(config), "--format", "jsonl")

    assert exported.returncode == 0, exported.stderr
    rows = read_jsonl(tmp_path / "out" / "batch_output.sorted.jsonl")
    # vllm run-batch's output for the same file: one line per request, in input order,
    # {id, custom_id, response: {status_code, request_id, body}, error}.
    assert [row["custom_id"] for row in rows] == [f"req-{i}" for i in [*range(9), 12]]
    for row in rows:
        assert list(row) == ["id", "custom_id", "response", "error"]
        assert list(row["response"]) == ["status_code", "request_id", "body"]


async def test_a_duplicate_custom_id_is_refused_naming_both_lines(
    tmp_path: Path, mock: MockServer
) -> None:
    lines = [batch_line(i) for i in range(5)]
    lines[3]["custom_id"] = "req-1"
    config = requests_config(tmp_path, [mock.base_url], lines)

    done = await turnstile("run", str(config), "--quiet")

    assert done.returncode == 2, done.stderr
    assert "lines 1 and 3" in done.stderr and "'req-1'" in done.stderr
    assert mock.stats.total_requests == 0


async def test_a_sigkilled_run_resumes_exactly_asking_nothing_journaled_again(
    tmp_path: Path, mock: MockServer
) -> None:
    lines = [batch_line(i) for i in range(90)]
    reference = tmp_path / "reference"
    reference.mkdir()
    done = await turnstile(
        "run", str(requests_config(reference, [mock.base_url], lines)), "--quiet"
    )
    assert done.returncode == 0, done.stderr
    expected = by_custom_id(read_jsonl(reference / "out" / "batch_output.jsonl"))
    assert len(expected) == 90
    mock.reset()

    config = requests_config(tmp_path, [mock.base_url], lines, cap=2)
    killed = await kill_after(mock, 30, "run", str(config), "--quiet")
    assert killed.returncode != 0
    journal = read_jsonl(tmp_path / "ck" / "journal.jsonl")
    journaled = {r["l"] for r in journal if r.get("k") == RAW} | {
        r["l"] for r in journal if r.get("k") == "o"
    }
    assert journaled, "the run was killed before it journaled a reply"
    mock.reset()

    resumed = await turnstile("run", str(config), "--quiet")

    assert resumed.returncode == 0, resumed.stderr
    got = by_custom_id(read_jsonl(tmp_path / "out" / "batch_output.jsonl"))
    # Row for row what the uninterrupted run wrote (embeddings and the deterministic
    # completions alike; chat ids count the mock's requests, so they are left out).
    assert sorted(got) == sorted(expected)
    for custom_id, row in got.items():
        want = expected[custom_id]
        assert (
            row["id"] == want["id"]
            and row["response"]["request_id"] == want["response"]["request_id"]
        )
        body, want_body = dict(row["response"]["body"]), dict(want["response"]["body"])
        for volatile in ("id", "created"):
            body.pop(volatile, None)
            want_body.pop(volatile, None)
        assert body == want_body
    asked = mock.stats.requests_by_key
    for line in journaled:
        request = lines[line]
        if request["url"] != "/v1/chat/completions":
            assert asked[raw_request_key(request["url"], request["body"])] == 0


async def test_lines_are_spread_over_replicas_and_retried_past_faults(tmp_path: Path) -> None:
    async with MockServer() as a, MockServer() as b:
        a.faults = Faults(rate_429=0.2, rate_500=0.1, retry_after_s=0.0, seed=3)
        lines = [batch_line(i, url="/v1/embeddings") for i in range(40)]
        config = requests_config(tmp_path, [a.base_url, b.base_url], lines, cap=2)

        done = await turnstile("run", str(config), "--quiet")

        assert done.returncode == 0, done.stderr
        assert a.stats.completed > 0 and b.stats.completed > 0
        assert a.stats.completed + b.stats.completed == 40
        out = read_jsonl(tmp_path / "out" / "batch_output.jsonl")
        assert sorted(r["custom_id"] for r in out) == sorted(f"req-{i}" for i in range(40))


async def test_post_sends_a_body_to_a_path_with_the_endpoints_retries(mock: MockServer) -> None:
    mock.faults = Faults(rate_500=0.5, seed=1)
    mock.recorded = []
    settings = HttpSettings(name="m", base_urls=(mock.base_url,), model="unused", max_retries=8)
    body = orjson.dumps({"model": "mock", "prompt": ["a b", "c"], "max_tokens": 2})

    async def no_wait(seconds: float) -> None:
        await anyio.lowlevel.checkpoint()

    async with HttpEndpoint(settings, sleep=no_wait) as client:
        replies = [await client.post("/completions", body) for _ in range(6)]
    assert all(r.status == 200 and r.data["object"] == "text_completion" for r in replies)
    assert replies[0].prompt_tokens == 3 and replies[0].completion_tokens == 4
    assert {orjson.dumps(b) for _, b in mock.recorded} == {body}
    assert mock.stats.faults["500"] > 0  # some attempts failed and were sent again
    assert client.statistics().ok == 6


async def test_raw_replies_are_priced_journaled_with_their_spend_and_held_to_the_budget(
    tmp_path: Path, mock: MockServer
) -> None:
    lines = [batch_line(i, url="/v1/chat/completions") for i in range(30)]
    price = {"input": 1.0, "output": 2.0}
    config = requests_config(tmp_path, [mock.base_url], lines, server={"price": price})

    done = await turnstile("run", str(config), "--quiet")

    assert done.returncode == 0, done.stderr
    rows = read_jsonl(tmp_path / "out" / "batch_output.jsonl")
    usage = [row["response"]["body"]["usage"] for row in rows]
    want = sum(u["prompt_tokens"] * 1.0 + u["completion_tokens"] * 2.0 for u in usage) / 1e6
    journal = read_jsonl(tmp_path / "ck" / "journal.jsonl")
    # A line's reply is its row's last: its spend is journaled in the row's v record.
    spends = [r[SPENT] for r in journal if r.get("k") in (RAW, WRITING)]
    assert len(spends) == 30 and sum(spends) == pytest.approx(want)
    assert Checkpoint.of(load(config)).state().spent_usd == pytest.approx(want)

    # A token budget of 2.5 lines' worst cases (a line's max_tokens, 64, and its body's
    # size / 4), each line spending far less: lines go out until what they spent and
    # what is in flight leave no room for one more, then the run stops, exit 4.
    mock.reset()
    small = tmp_path / "small"
    small.mkdir()
    worst = sum(worst_case_body(orjson.dumps(lines[0]["body"])))
    tokens = int(2.5 * worst)
    limited = requests_config(small, [mock.base_url], lines, budget={"max_tokens": tokens})
    stopped = await turnstile("run", str(limited), "--quiet")
    assert stopped.returncode == EXIT_BUDGET, stopped.stderr
    sent = mock.stats.total_requests
    assert 0 < sent < 30
    journaled = read_jsonl(small / "ck" / "journal.jsonl")
    assert sum(r["p"] + r["o"] for r in journaled if r.get("k") in (RAW, WRITING)) <= tokens
