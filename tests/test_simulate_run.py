"""End to end on the mock: a simulated user (``distill.user``) writes the user turns after the
input's, journaled before the teacher is asked; SIGKILLs change nothing in the output."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
import yaml

from engine.tasks.distill.simulator import END_REASONS, RETRIES, again, swapped
from engine.testing.mock_replies import END_MARKER
from engine.testing.mock_server import Faults, MockServer, reply_for
from tests.conftest import by_id, kill_after, read_jsonl, turnstile, write_jsonl

pytestmark = pytest.mark.timeout(180)

ASKER = "user-asker"
PROMPT = "You are a curious student. Ask one short follow-up question."


def source(n: int) -> list[dict[str, Any]]:
    """Rows of 1-3 user messages (a few with a system message), each with a persona."""
    rows = []
    for i in range(n):
        messages = [{"role": "system", "content": f"be brief {i}"}] if i % 4 == 0 else []
        for t in range(1 + i % 3):
            messages.append({"role": "user", "content": f"row {i} asks question {t}"})
        rows.append({"id": f"r{i}", "messages": messages, "persona": f"persona {i % 5}"})
    return rows


def config(
    folder: Path,
    teacher_urls: str | list[str],
    asker_urls: str | list[str],
    *,
    cap: int = 6,
    **user: Any,
) -> Path:
    raw = {
        "task": "distill",
        "input": "in.jsonl",
        "output": "out/distilled.jsonl",
        "checkpoint_dir": "ck",
        "models": {
            "teacher": {"base_url": teacher_urls, "model": "mock", "max_concurrency": cap},
            "asker": {"base_url": asker_urls, "model": ASKER, "max_concurrency": cap},
        },
        "distill": {
            "model": "teacher",
            "user": {"model": "asker", "turns": 4, "system_prompt": PROMPT, **user},
        },
        "progress_interval_s": 60,
    }
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def check_row(
    row: dict[str, Any], src: dict[str, Any], system: str = PROMPT, turns: int = 4
) -> None:
    """Every reply is the mock's answer to what it was asked: the teacher's to the history,
    the simulator's to its system prompt and the dialogue seen from the other side."""
    messages = row["messages"]
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    given = sum(1 for m in src["messages"] if m["role"] == "user")
    assert row["simulated_turns"] == list(range(given, len(users)))
    assert row["end_reason"] in END_REASONS
    if row["end_reason"] == "turns":
        assert len(users) == max(turns, given)
    else:
        assert len(users) < turns
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            assert m["content"] == reply_for("mock", messages[:i]), (row["id"], i)
    for n in row["simulated_turns"]:
        at = users[n]
        prompts = [system] + [f"{system}\n\n{again(k)}" for k in range(1, RETRIES + 1)]
        asked = [swapped(prompt, messages[:at]) for prompt in prompts]
        assert messages[at]["content"] in [reply_for(ASKER, a) for a in asked], (row["id"], n)
        assert END_MARKER not in messages[at]["content"]
    assert row["user_usage"]["completion_tokens"] > 0 or not row["simulated_turns"]


async def test_sigkills_anywhere_give_the_output_of_an_uninterrupted_run(
    tmp_path: Path, mock: MockServer
) -> None:
    mock.faults = Faults(user_end_rate=0.1, user_repeat_rate=0.45)
    rows = source(60)
    reference = tmp_path / "reference"
    reference.mkdir()
    write_jsonl(reference / "in.jsonl", rows)
    done = await turnstile("run", str(config(reference, mock.base_url, mock.base_url)), "--quiet")
    assert done.returncode == 0, done.stderr
    expected = by_id(read_jsonl(reference / "out" / "distilled.jsonl"))
    assert set(expected) == {r["id"] for r in rows}
    for src in rows:
        check_row(expected[src["id"]], src)
    reasons = {row["end_reason"] for row in expected.values()}
    assert reasons == set(END_REASONS), reasons
    distinct = len(mock.stats.requests_by_key)
    assert mock.stats.completed == distinct  # nothing asked twice

    mock.reset()
    mock.latency_ms = 3
    write_jsonl(tmp_path / "in.jsonl", rows)
    path = config(tmp_path, mock.base_url, mock.base_url)
    for at in (40, 120):
        killed = await kill_after(mock, at, "run", str(path), "--quiet")
        assert killed.returncode == -signal.SIGKILL
    journal = (tmp_path / "ck" / "journal.jsonl").read_bytes()
    assert b'"key":"user:' in journal  # simulated messages are journaled as the task's own
    rerun = await turnstile("run", str(path), "--quiet")

    assert rerun.returncode == 0, rerun.stderr
    assert by_id(read_jsonl(tmp_path / "out" / "distilled.jsonl")) == expected
    requests = mock.stats.requests_by_key
    assert len(requests) == distinct
    # Only requests in flight at a kill are sent again: at most one a row in flight.
    repeated = sum(count - 1 for count in requests.values() if count > 1)
    assert repeated <= 2 * (2 * 6 * 2)


async def test_the_end_marker_ends_a_conversation_after_the_inputs_turns(
    tmp_path: Path, mock: MockServer
) -> None:
    mock.faults = Faults(user_end_rate=1.0)
    rows = source(9)
    write_jsonl(tmp_path / "in.jsonl", rows)

    done = await turnstile("run", str(config(tmp_path, mock.base_url, mock.base_url)), "--quiet")

    assert done.returncode == 0, done.stderr
    out = by_id(read_jsonl(tmp_path / "out" / "distilled.jsonl"))
    for src in rows:
        row = out[src["id"]]
        check_row(row, src)
        assert row["end_reason"] == "end_marker" and row["simulated_turns"] == []
        assert [m for m in row["messages"] if m["role"] == "user"] == [
            m for m in src["messages"] if m["role"] == "user"
        ]
    assert sum(row["user_usage"]["completion_tokens"] > 0 for row in out.values()) == 9


async def test_a_repeating_simulator_is_asked_again_twice_then_the_conversation_ends(
    tmp_path: Path, mock: MockServer
) -> None:
    mock.faults = Faults(user_repeat_rate=1.0)
    rows = source(6)
    write_jsonl(tmp_path / "in.jsonl", rows)

    done = await turnstile("run", str(config(tmp_path, mock.base_url, mock.base_url)), "--quiet")

    assert done.returncode == 0, done.stderr
    out = by_id(read_jsonl(tmp_path / "out" / "distilled.jsonl"))
    for src in rows:
        assert out[src["id"]]["end_reason"] == "repetition"
        assert out[src["id"]]["simulated_turns"] == []
    teacher_turns = sum(sum(m["role"] == "user" for m in r["messages"]) for r in rows)
    assert mock.stats.completed == teacher_turns + len(rows) * (1 + RETRIES)


async def test_a_row_with_enough_user_messages_gets_no_simulated_turn(
    tmp_path: Path, mock: MockServer
) -> None:
    rows = source(9)
    write_jsonl(tmp_path / "in.jsonl", rows)
    path = config(tmp_path, mock.base_url, mock.base_url, turns=3)

    done = await turnstile("run", str(path), "--quiet")

    assert done.returncode == 0, done.stderr
    out = by_id(read_jsonl(tmp_path / "out" / "distilled.jsonl"))
    for i, src in enumerate(rows):
        row = out[src["id"]]
        check_row(row, src, turns=3)
        if i % 3 == 2:  # three user messages already
            assert row["simulated_turns"] == [] and row["end_reason"] == "turns"
            assert row["user_usage"] == {
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "reasoning_tokens": 0,
            }
        else:
            assert row["end_reason"] == "turns" and len(row["simulated_turns"]) == 2 - i % 3


async def test_the_template_renders_the_simulators_system_prompt_from_the_row(
    tmp_path: Path, mock: MockServer
) -> None:
    rows = source(5)
    rows[3].pop("persona")
    write_jsonl(tmp_path / "in.jsonl", rows)
    template = "You are {{ persona }}. Ask one short question."
    path = config(tmp_path, mock.base_url, mock.base_url, system_prompt=None, template=template)
    raw = yaml.safe_load(path.read_text())
    del raw["distill"]["user"]["system_prompt"]
    path.write_text(yaml.safe_dump(raw))

    done = await turnstile("run", str(path), "--quiet")

    assert done.returncode == 1, done.stderr  # the row without a persona failed
    out = by_id(read_jsonl(tmp_path / "out" / "distilled.jsonl"))
    for src in rows[:3] + rows[4:]:
        check_row(out[src["id"]], src, system=f"You are {src['persona']}. Ask one short question.")
    (failed,) = read_jsonl(tmp_path / "out" / "distilled.failed.jsonl")
    assert failed["id"] == "r3" and "distill.user.template" in failed["error"]
    assert "persona" in failed["error"]


async def test_both_models_on_replicas(tmp_path: Path) -> None:
    faults = [Faults(user_end_rate=0.1, user_repeat_rate=0.1) for _ in range(4)]
    rows = source(40)
    async with (
        MockServer(faults=faults[0]) as t1,
        MockServer(faults=faults[1]) as t2,
        MockServer(faults=faults[2]) as a1,
        MockServer(faults=faults[3]) as a2,
    ):
        write_jsonl(tmp_path / "in.jsonl", rows)
        path = config(tmp_path, [t1.base_url, t2.base_url], [a1.base_url, a2.base_url], cap=2)
        done = await turnstile("run", str(path), "--quiet")

        assert done.returncode == 0, done.stderr
        out = by_id(read_jsonl(tmp_path / "out" / "distilled.jsonl"))
        for src in rows:
            check_row(out[src["id"]], src)
        # Each model's requests spread over its own replicas, none on the other's.
        roles = [(t1, "mock", ASKER), (t2, "mock", ASKER), (a1, ASKER, "mock"), (a2, ASKER, "mock")]
        for server, model, other in roles:
            assert server.stats.peak_in_flight_by_model.get(model, 0) > 0
            assert other not in server.stats.peak_in_flight_by_model
        # Each request went to one replica, once.
        seen = [s.stats.requests_by_key for s in (t1, t2, a1, a2)]
        assert all(n == 1 for keys in seen for n in keys.values())
        assert sum(len(keys) for keys in seen) == len(set().union(*map(set, seen)))


async def test_the_simulators_reasoning_is_dropped(tmp_path: Path) -> None:
    rows = source(6)
    async with MockServer(reasoning="think") as server:
        write_jsonl(tmp_path / "in.jsonl", rows)
        done = await turnstile(
            "run", str(config(tmp_path, server.base_url, server.base_url)), "--quiet"
        )
    assert done.returncode == 0, done.stderr
    out = by_id(read_jsonl(tmp_path / "out" / "distilled.jsonl"))
    for src in rows:
        row = out[src["id"]]
        assert row["end_reason"] == "turns"
        messages = row["messages"]
        # Requests carry answers only: no trace goes back to either model.
        plain = [{"role": m["role"], "content": m["content"]} for m in messages]
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        for n in row["simulated_turns"]:
            at = users[n]
            assert messages[at] == {
                "role": "user",
                "content": reply_for(ASKER, swapped(PROMPT, plain[:at])),
            }
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                assert m["content"] == reply_for("mock", plain[:i])
                assert m["reasoning_content"].startswith("Thinking about")
        assert row["user_usage"]["reasoning_tokens"] > 0 or not row["simulated_turns"]
