"""End to end: `turnstile run` against the mock server on loopback."""

from __future__ import annotations

import re
import signal
from pathlib import Path
from typing import Any

import orjson

from engine.testing.mock_server import Faults, MockServer, reply_for
from tests.conftest import (
    by_id,
    conversations,
    kill_after,
    read_jsonl,
    turnstile,
    write_config,
    write_jsonl,
)


def assert_each_turn_answers_its_history(row: dict[str, Any], model: str = "mock") -> None:
    messages = row["messages"]
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    assert assistant, row
    for i in assistant:
        assert messages[i]["content"] == reply_for(model, messages[:i]), (row["id"], i)


def expected_turns(source: dict[str, Any]) -> int:
    if "prompt" in source:
        return 1
    items = source.get("messages") or source.get("conversations") or []
    return sum(1 for m in items if m.get("role", m.get("from")) in ("user", "human"))


async def test_every_assistant_turn_is_written_from_the_full_history(
    tmp_path: Path, mock: MockServer
) -> None:
    source = conversations(40)
    write_jsonl(tmp_path / "in.jsonl", source)
    config = write_config(tmp_path, mock.base_url)

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 0, result.stderr
    rows = by_id(read_jsonl(tmp_path / "out" / "distilled.jsonl"))
    assert set(rows) == {s["id"] for s in source}
    for src in source:
        row = rows[src["id"]]
        assert_each_turn_answers_its_history(row)
        roles = [m["role"] for m in row["messages"]]
        assert roles.count("assistant") == expected_turns(src)
        assert roles.count("user") == expected_turns(src)
        assert row["model"] == "mock"
        assert row["usage"]["completion_tokens"] > 0
        for key in ("topic", "source"):
            if key in src:
                assert row[key] == src[key]
    assert not (tmp_path / "out" / "distilled.failed.jsonl").read_bytes()
    total_turns = sum(expected_turns(s) for s in source)
    assert mock.stats.completed == total_turns  # one request per turn, none repeated


async def test_the_cap_is_a_hard_limit_on_requests_in_flight(
    tmp_path: Path, mock: MockServer
) -> None:
    mock.latency_ms = 20
    write_jsonl(tmp_path / "in.jsonl", conversations(60))
    config = write_config(tmp_path, mock.base_url, cap=5)

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 0, result.stderr
    peak = mock.stats.peak_in_flight_by_model["mock"]
    assert peak <= 5, f"{peak} requests in flight, above the cap of 5"
    # 60 conversations, 10 at a time, each request held 20 ms: the cap is reached.
    assert peak == 5, f"the cap of 5 was never reached (peak {peak})"


async def test_retries_ride_out_429_500_and_dropped_connections(
    tmp_path: Path, mock: MockServer
) -> None:
    mock.faults = Faults(rate_429=0.15, rate_500=0.15, rate_drop=0.1, retry_after_s=0.01, seed=3)
    source = conversations(30)
    write_jsonl(tmp_path / "in.jsonl", source)
    config = write_config(tmp_path, mock.base_url)

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 0, result.stderr
    rows = read_jsonl(tmp_path / "out" / "distilled.jsonl")
    assert len(rows) == len(source)
    for row in rows:
        assert_each_turn_answers_its_history(row)
    faults = mock.stats.faults
    assert faults["429"] > 0 and faults["500"] > 0 and faults["drop"] > 0
    report = re.search(
        r"model teacher: (\d+)/(\d+) requests ok, .*, (\d+) retries, (\d+) failures"
        r"(?:, (\d+) re-sent after server failures)?",
        result.stderr,
    )
    assert report is not None, result.stderr
    ok, requests, retries, failures = map(int, report.groups()[:4])
    resent = int(report.group(5) or 0)
    # No row failed, so every injected fault was sent again once, and nothing else was:
    # charged to the row (429s, server failures while the server answered others) or
    # not (server failures while it answered nobody).
    assert failures == 0
    assert retries + resent == faults["429"] + faults["500"] + faults["drop"]
    assert retries >= faults["429"]
    assert requests - ok == retries + resent


async def test_a_permanent_error_fails_the_row_not_the_run(
    tmp_path: Path, mock: MockServer
) -> None:
    write_jsonl(tmp_path / "in.jsonl", conversations(5))
    mock.faults = Faults(fail_models={"mock": 400})
    config = write_config(tmp_path, mock.base_url)

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 1, result.stderr
    failed = read_jsonl(tmp_path / "out" / "distilled.failed.jsonl")
    assert len(failed) == 5
    assert all(f["turn"] == 0 and "HTTP 400" in f["error"] for f in failed)
    assert mock.stats.total_requests == 5  # a 400 is not retried


async def test_bad_lines_go_to_the_failed_file_and_good_ones_finish(
    tmp_path: Path, mock: MockServer
) -> None:
    good = conversations(6)
    lines: list[Any] = [
        good[0],
        "{not json",
        good[1],
        {"id": "no-user", "messages": [{"role": "system", "content": "only a system"}]},
        {"id": "bad-type", "messages": "hello"},
        "",
        good[2],
        {"id": "bad-role", "messages": [{"role": "wizard", "content": "x"}]},
        [1, 2, 3],
        *good[3:],
    ]
    write_jsonl(tmp_path / "in.jsonl", lines)
    config = write_config(tmp_path, mock.base_url)

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 1
    assert {r["id"] for r in read_jsonl(tmp_path / "out" / "distilled.jsonl")} == {
        g["id"] for g in good
    }
    failed = {f["line"]: f for f in read_jsonl(tmp_path / "out" / "distilled.failed.jsonl")}
    assert sorted(failed) == [1, 3, 4, 7, 8]
    assert failed[1]["id"] == 1 and "not valid JSON" in failed[1]["error"]
    assert failed[3]["id"] == "no-user" and "no user turn" in failed[3]["error"]
    assert failed[4]["id"] == "bad-type" and "'messages'" in failed[4]["error"]
    assert "wizard" in failed[7]["error"]
    assert "JSON object" in failed[8]["error"]


async def test_sigkill_then_rerun_equals_an_uninterrupted_run(
    tmp_path: Path, mock: MockServer
) -> None:
    source = conversations(120, max_turns=6)
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    write_jsonl(reference_dir / "in.jsonl", source)
    reference = await turnstile("run", str(write_config(reference_dir, mock.base_url)), "--quiet")
    assert reference.returncode == 0, reference.stderr
    expected = by_id(read_jsonl(reference_dir / "out" / "distilled.jsonl"))

    mock.reset()
    mock.latency_ms = 5
    write_jsonl(tmp_path / "in.jsonl", source)
    cap = 8
    config = write_config(tmp_path, mock.base_url, cap=cap)
    killed = await kill_after(mock, 150, "run", str(config), "--quiet")
    assert killed.returncode == -signal.SIGKILL
    journal = (tmp_path / "ck" / "journal.jsonl").read_bytes()
    assert journal.count(b'"k":"t"') >= 100  # the kill landed mid-run

    rerun = await turnstile("run", str(config), "--quiet")

    assert rerun.returncode == 0, rerun.stderr
    assert "resuming" in rerun.stderr
    got = read_jsonl(tmp_path / "out" / "distilled.jsonl")
    assert by_id(got) == expected  # every row once, exactly as uninterrupted
    total_turns = sum(expected_turns(s) for s in source)
    requests = mock.stats.requests_by_key
    repeated = sum(count - 1 for count in requests.values() if count > 1)
    # Only turns in flight at the kill may be sent again: requests the server was
    # answering, and replies that had arrived but were not yet journaled. Each
    # conversation in flight (2 x cap of them) has at most one such turn.
    assert repeated <= 2 * cap
    assert len(requests) == total_turns


async def test_a_torn_output_write_is_repaired_on_resume(tmp_path: Path, mock: MockServer) -> None:
    # A SIGKILL between writing rows and journaling that they were written leaves
    # rows the journal does not vouch for, maybe half of one; the rerun must cut
    # them and write each once, with no request.
    write_jsonl(tmp_path / "in.jsonl", conversations(20))
    config = write_config(tmp_path, mock.base_url)
    assert (await turnstile("run", str(config), "--quiet")).returncode == 0
    out = tmp_path / "out" / "distilled.jsonl"
    complete = by_id(read_jsonl(out))
    journal = tmp_path / "ck" / "journal.jsonl"
    records = journal.read_bytes().splitlines(keepends=True)
    emits = [i for i, r in enumerate(records) if orjson.loads(r)["k"] == "o"]
    dropped = emits[-3:]
    journal.write_bytes(b"".join(r for i, r in enumerate(records) if i not in dropped))
    with out.open("ab") as f:
        f.write(b'{"id": "half a row')
    requests_before = mock.stats.total_requests

    rerun = await turnstile("run", str(config), "--quiet")

    assert rerun.returncode == 0, rerun.stderr
    assert by_id(read_jsonl(out)) == complete
    assert mock.stats.total_requests == requests_before


async def test_changed_input_or_config_is_refused_unless_fresh(
    tmp_path: Path, mock: MockServer
) -> None:
    write_jsonl(tmp_path / "in.jsonl", conversations(4))
    config = write_config(tmp_path, mock.base_url)
    assert (await turnstile("run", str(config), "--quiet")).returncode == 0

    write_jsonl(tmp_path / "in.jsonl", conversations(5))
    changed_input = await turnstile("run", str(config), "--quiet")
    assert changed_input.returncode == 2
    assert "has changed" in changed_input.stderr and "--fresh" in changed_input.stderr

    write_jsonl(tmp_path / "in.jsonl", conversations(4))
    hotter = write_config(
        tmp_path,
        mock.base_url,
        models={
            "teacher": {"base_url": mock.base_url, "model": "mock", "params": {"temperature": 1}}
        },
    )
    changed_config = await turnstile("run", str(hotter), "--quiet")
    assert changed_config.returncode == 2
    assert "models.teacher.params" in changed_config.stderr

    fresh = await turnstile("run", str(hotter), "--quiet", "--fresh")
    assert fresh.returncode == 0, fresh.stderr
    assert len(read_jsonl(tmp_path / "out" / "distilled.jsonl")) == 4


async def test_sigterm_stops_cleanly_and_the_rerun_finishes(
    tmp_path: Path, mock: MockServer
) -> None:
    mock.latency_ms = 10
    source = conversations(150, max_turns=5)
    write_jsonl(tmp_path / "in.jsonl", source)
    config = write_config(tmp_path, mock.base_url)

    stopped = await kill_after(mock, 60, "run", str(config), sig=signal.SIGTERM)

    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    assert "resume" in stopped.stderr
    rerun = await turnstile("run", str(config), "--quiet")
    assert rerun.returncode == 0, rerun.stderr
    rows = by_id(read_jsonl(tmp_path / "out" / "distilled.jsonl"))
    assert set(rows) == {s["id"] for s in source}
    # In-flight requests were allowed to finish, so nothing was asked twice.
    assert max(mock.stats.requests_by_key.values()) == 1


async def test_config_problems_are_all_reported_before_any_request(
    tmp_path: Path, mock: MockServer
) -> None:
    write_jsonl(tmp_path / "in.jsonl", conversations(2))
    config = write_config(
        tmp_path,
        "htp://nowhere",
        bogus=1,
        models={
            "teacher": {
                "base_url": "htp://nowhere",
                "model": "m",
                "max_concurrency": 0,
                "api_key_env": "TURNSTILE_TEST_UNSET_KEY",
            }
        },
        distill={"model": "missing"},
    )

    result = await turnstile("run", str(config))

    assert result.returncode == 2
    for key in (
        "bogus:",
        "models.teacher.base_url:",
        "models.teacher.max_concurrency:",
        "models.teacher.api_key_env:",
        "distill.model:",
    ):
        assert key in result.stderr
    assert mock.stats.total_requests == 0


async def test_an_unreachable_server_stops_the_run_before_any_row(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", conversations(3))
    config = write_config(tmp_path, "http://127.0.0.1:9/v1")

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 3
    assert "cannot reach" in result.stderr and "models.teacher" in result.stderr
    assert not read_jsonl(tmp_path / "out" / "distilled.failed.jsonl")


async def test_status_reads_progress_from_the_checkpoint(tmp_path: Path, mock: MockServer) -> None:
    write_jsonl(tmp_path / "in.jsonl", conversations(10))
    config = write_config(tmp_path, mock.base_url)
    before = await turnstile("status", str(config))
    assert "no run yet" in (before.stderr + (await _stdout("status", str(config))))
    assert (await turnstile("run", str(config), "--quiet")).returncode == 0

    text = await _stdout("status", str(config))

    assert "10 rows (10 ok, 0 failed)" in text
    assert "remaining:  0 rows" in text


async def _stdout(*args: str) -> str:
    from tests.conftest import start_turnstile

    proc = await start_turnstile(*args)
    out, _ = await proc.communicate()
    return bytes(out).decode()
