"""End to end: which user messages get a reply of their own, under both turn rules.

Each case gives an input conversation and, per rule, the output's layout: the
kept input messages with ``A`` where the teacher's reply goes. Every reply must
be exactly the mock's reply to the history before it.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import orjson
import pytest

from engine.testing.mock_server import MockServer, reply_for
from tests.conftest import by_id, kill_after, read_jsonl, turnstile, write_config, write_jsonl

A = "A"  # where a generated reply goes


def u(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def a(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def s(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


def human(text: str) -> dict[str, str]:
    return {"from": "human", "value": text}


def gpt(text: str) -> dict[str, str]:
    return {"from": "gpt", "value": text}


# (input row, layout under every_user, layout under as_in_input)
CASES: dict[str, tuple[dict[str, Any], list[Any], list[Any]]] = {
    **{
        f"user_only_{n}": (
            {"messages": [u(f"q{i}") for i in range(n)]},
            [m for i in range(n) for m in (u(f"q{i}"), A)],
            [*(u(f"q{i}") for i in range(n)), A],
        )
        for n in range(1, 7)
    },
    "alternating": (
        {"messages": [u("q0"), a("old"), u("q1"), a("old")]},
        [u("q0"), A, u("q1"), A],
        [u("q0"), A, u("q1"), A],
    ),
    "consecutive_users_after_an_assistant": (
        {"messages": [u("q0"), a("old"), u("q1"), u("q2")]},
        [u("q0"), A, u("q1"), A, u("q2"), A],
        [u("q0"), A, u("q1"), u("q2"), A],
    ),
    "trailing_assistant": (
        {"messages": [u("q0"), u("q1"), a("old")]},
        [u("q0"), A, u("q1"), A],
        [u("q0"), u("q1"), A],
    ),
    "system_in_the_middle": (
        {"messages": [s("s0"), u("q0"), a("old"), s("s1"), u("q1"), u("q2")]},
        [s("s0"), u("q0"), A, s("s1"), u("q1"), A, u("q2"), A],
        [s("s0"), u("q0"), A, s("s1"), u("q1"), u("q2"), A],
    ),
    "the_issue_example": (
        {"messages": [s("sys"), u("u1"), u("u2"), a("a"), u("u3")]},
        [s("sys"), u("u1"), A, u("u2"), A, u("u3"), A],
        [s("sys"), u("u1"), u("u2"), A, u("u3"), A],
    ),
    "sharegpt_consecutive_humans": (
        {"conversations": [human("h0"), human("h1"), gpt("old"), human("h2")]},
        [u("h0"), A, u("h1"), A, u("h2"), A],
        [u("h0"), u("h1"), A, u("h2"), A],
    ),
    "prompt": ({"prompt": "just one"}, [u("just one"), A], [u("just one"), A]),
}
RULES = {"every_user": 1, "as_in_input": 2}


def expected_messages(layout: list[Any], model: str = "mock") -> list[dict[str, str]]:
    """The layout with each ``A`` filled by the mock's reply to everything before it."""
    out: list[dict[str, str]] = []
    for item in layout:
        out.append(a(reply_for(model, out)) if item == A else item)
    return out


def rows_for(rule: str) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, str]]]]:
    source, expected = [], {}
    for name, case in CASES.items():
        source.append({"id": name, **case[0]})
        expected[name] = expected_messages(case[RULES[rule]])
    return source, expected


def distill_section(rule: str | None) -> dict[str, Any]:
    return {"model": "teacher"} if rule is None else {"model": "teacher", "turns": rule}


@pytest.mark.parametrize("rule", [None, "every_user", "as_in_input"])
async def test_each_input_shape_comes_out_exactly(
    tmp_path: Path, mock: MockServer, rule: str | None
) -> None:
    source, expected = rows_for(rule or "every_user")
    write_jsonl(tmp_path / "in.jsonl", source)
    config = write_config(tmp_path, mock.base_url, distill=distill_section(rule))

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 0, result.stderr
    rows = by_id(read_jsonl(tmp_path / "out" / "distilled.jsonl"))
    assert {name: row["messages"] for name, row in rows.items()} == expected
    replies = sum(1 for messages in expected.values() for m in messages if m["role"] == "assistant")
    assert mock.stats.completed == replies  # one request per reply, none repeated


async def test_two_user_messages_get_two_answers(tmp_path: Path, mock: MockServer) -> None:
    row = {
        "id": "c1",
        "messages": [u("Name a fruit that is yellow."), u("Why is it yellow?")],
    }
    write_jsonl(tmp_path / "in.jsonl", [row])
    config = write_config(tmp_path, mock.base_url)

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 0, result.stderr
    [out] = read_jsonl(tmp_path / "out" / "distilled.jsonl")
    assert [m["role"] for m in out["messages"]] == ["user", "assistant", "user", "assistant"]
    assert out["messages"] == expected_messages(
        [u("Name a fruit that is yellow."), A, u("Why is it yellow?"), A]
    )


def long_user_only_rows(n: int) -> list[dict[str, Any]]:
    return [
        {"id": f"r{i}", "messages": [u(f"row {i} question {t}") for t in range(1 + i % 6)]}
        for i in range(n)
    ]


@pytest.mark.parametrize("rule", ["every_user", "as_in_input"])
async def test_sigkill_then_rerun_is_exact_under_each_rule(
    tmp_path: Path, mock: MockServer, rule: str
) -> None:
    source = long_user_only_rows(150)
    layouts = {
        row["id"]: (
            [m for msg in row["messages"] for m in (msg, A)]
            if rule == "every_user"
            else [*row["messages"], A]
        )
        for row in source
    }
    expected = {rid: expected_messages(layout) for rid, layout in layouts.items()}
    total = sum(layout.count(A) for layout in layouts.values())
    mock.latency_ms = 5
    write_jsonl(tmp_path / "in.jsonl", source)
    cap = 8
    config = write_config(tmp_path, mock.base_url, cap=cap, distill=distill_section(rule))
    killed = await kill_after(mock, total // 3, "run", str(config), "--quiet")
    assert killed.returncode == -signal.SIGKILL

    rerun = await turnstile("run", str(config), "--quiet")

    assert rerun.returncode == 0, rerun.stderr
    assert "resuming" in rerun.stderr
    rows = by_id(read_jsonl(tmp_path / "out" / "distilled.jsonl"))
    assert {rid: row["messages"] for rid, row in rows.items()} == expected
    requests = mock.stats.requests_by_key
    assert len(requests) == total
    repeated = sum(count - 1 for count in requests.values() if count > 1)
    assert repeated <= 2 * cap  # only turns in flight at the kill


async def test_a_checkpoint_made_under_the_other_rule_is_refused(
    tmp_path: Path, mock: MockServer
) -> None:
    write_jsonl(tmp_path / "in.jsonl", long_user_only_rows(4))
    first = write_config(tmp_path, mock.base_url, distill=distill_section("as_in_input"))
    assert (await turnstile("run", str(first), "--quiet")).returncode == 0
    before = (tmp_path / "out" / "distilled.jsonl").read_bytes()
    requests = mock.stats.total_requests
    other = write_config(tmp_path, mock.base_url, distill=distill_section("every_user"))

    refused = await turnstile("run", str(other), "--quiet")

    assert refused.returncode == 2, refused.stderr
    assert "distill.turns: as_in_input" in refused.stderr
    assert "distill.turns: every_user" in refused.stderr
    assert "--fresh" in refused.stderr
    assert mock.stats.total_requests == requests  # nothing sent
    assert (tmp_path / "out" / "distilled.jsonl").read_bytes() == before  # nothing mixed in

    fresh = await turnstile("run", str(other), "--quiet", "--fresh")
    assert fresh.returncode == 0, fresh.stderr
    rows = by_id(read_jsonl(tmp_path / "out" / "distilled.jsonl"))
    assert {rid: row["messages"] for rid, row in rows.items()} == {
        row["id"]: expected_messages([m for msg in row["messages"] for m in (msg, A)])
        for row in long_user_only_rows(4)
    }


async def test_a_checkpoint_from_before_the_rule_existed_is_refused(
    tmp_path: Path, mock: MockServer
) -> None:
    write_jsonl(tmp_path / "in.jsonl", long_user_only_rows(3))
    config = write_config(tmp_path, mock.base_url, distill=distill_section("as_in_input"))
    assert (await turnstile("run", str(config), "--quiet")).returncode == 0
    # What a checkpoint written before distill.turns existed holds.
    manifest_path = tmp_path / "ck" / "manifest.json"
    manifest = orjson.loads(manifest_path.read_bytes())
    del manifest["config"]["distill"]["turns"]
    manifest["config_digest"] = "digest-of-a-config-without-turns"
    manifest_path.write_bytes(orjson.dumps(manifest))

    refused = await turnstile("run", str(config), "--quiet")

    assert refused.returncode == 2, refused.stderr
    assert "before distill.turns existed" in refused.stderr
    assert "--fresh" in refused.stderr


async def test_status_names_the_rule(tmp_path: Path, mock: MockServer) -> None:
    from tests.test_distill_run import _stdout

    write_jsonl(tmp_path / "in.jsonl", long_user_only_rows(3))
    config = write_config(tmp_path, mock.base_url, distill=distill_section("as_in_input"))
    assert (await turnstile("run", str(config), "--quiet")).returncode == 0

    text = await _stdout("status", str(config))

    assert "turns:      as_in_input: the input's assistant messages mark" in text
