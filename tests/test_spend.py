"""The spend a budget counts, end to end on the mock: summed from the journal, so a run
killed with SIGKILL keeps what it paid for; a batch model charged at its batch price."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from engine._api import load
from engine.checkpoint.checkpoint import Checkpoint
from engine.checkpoint.journal import Replay, apply
from engine.checkpoint.snapshot import _digest, decode_snapshot, encode_snapshot
from engine.cost import SPENT, Price
from engine.errors import EXIT_BUDGET
from engine.testing.mock_server import MockServer
from tests.conftest import (
    conversations,
    kill_after,
    read_jsonl,
    turnstile,
    write_config,
    write_jsonl,
)
from tests.test_batch_run import BATCH

PRICE = {"input": 1.0, "output": 2.0}
PARAMS = {"temperature": 0.0, "max_tokens": 32}


def paid(tmp_path: Path, url: str, name: str, **extra: Any) -> Path:
    models = {
        "teacher": {
            "base_url": url,
            "model": "mock",
            "max_concurrency": 4,
            "params": PARAMS,
            "price": PRICE,
            **extra.pop("teacher", {}),
        }
    }
    return write_config(
        tmp_path,
        url,
        name=name,
        output=f"out/{name}.jsonl",
        checkpoint_dir=f"ck-{name}",
        models=models,
        **extra,
    )


def spent(path: Path) -> tuple[float, int]:
    state = Checkpoint.of(load(path)).state()
    return state.spent_usd, state.spent_tokens


async def test_a_sigkilled_run_keeps_its_spend_and_the_budget_holds_across_it(
    mock: MockServer, tmp_path: Path
) -> None:
    write_jsonl(tmp_path / "in.jsonl", conversations(60, max_turns=2))
    full_path = paid(tmp_path, mock.base_url, "full")
    assert (await turnstile("run", str(full_path))).returncode == 0
    full_usd, _ = spent(full_path)
    assert full_usd > 0
    mock.reset()

    limit = full_usd / 2
    path = paid(tmp_path, mock.base_url, "half", budget={"max_usd": limit})
    killed = await kill_after(mock, 25, "run", str(path), "--snapshot-every-rows", "4")
    assert killed.returncode < 0  # SIGKILL: no spend file, no summary
    before_usd, before_tokens = spent(path)
    assert before_usd > 0 and before_tokens > 0  # what it paid for is in its journal

    resumed = await turnstile("run", str(path))
    assert resumed.returncode == EXIT_BUDGET, resumed.stderr
    after_usd, _ = spent(path)
    # The resumed run started from the killed run's spend: the two together stay under
    # the budget (a spend lost at the kill would have let the resume spend it again).
    assert before_usd < after_usd <= limit
    shown = re.search(r"spent \$([0-9.]+)", resumed.stderr)
    assert shown is not None and float(shown.group(1)) == round(after_usd, 4)

    raw = yaml.safe_load(path.read_text())
    raw["budget"] = {"max_usd": full_usd * 10}
    path.write_text(yaml.safe_dump(raw))
    assert (await turnstile("run", str(path))).returncode == 0
    total, _ = spent(path)
    # Every reply paid for once at least (one in flight at the kill was asked again).
    assert total >= full_usd - 1e-9


async def test_a_batch_model_is_charged_at_its_batch_price(
    mock: MockServer, tmp_path: Path
) -> None:
    write_jsonl(tmp_path / "in.jsonl", conversations(12, max_turns=2))
    online = paid(tmp_path, mock.base_url, "online")
    assert (await turnstile("run", str(online))).returncode == 0
    batch = paid(
        tmp_path,
        mock.base_url,
        "batch",
        teacher={"batch": BATCH, "price": {**PRICE, "batch_discount": 0.25}},
    )
    result = await turnstile("run", str(batch))
    assert result.returncode == 0, result.stderr
    online_usd, online_tokens = spent(online)
    batch_usd, batch_tokens = spent(batch)
    assert batch_tokens == online_tokens
    assert abs(batch_usd - online_usd * 0.25) < 1e-12
    assert Price(1.0, 2.0).cost(10, 10, batch=True) == Price(1.0, 2.0).cost(10, 10) / 2


def test_replay_sums_paid_replies_and_the_snapshot_keeps_the_spend() -> None:
    state = Replay()
    apply(state, {"k": "t", "l": 0, "i": 0, "c": "a", "p": 10, "o": 5, SPENT: 0.25})
    apply(state, {"k": "t", "l": 0, "i": 1, "c": "b", "p": 20, "o": 5})  # from the cache
    apply(state, {"k": "t", "l": 1, "i": 0, "c": "c", "p": 7, "o": 3, SPENT: 0.5})
    assert (state.spent_usd, state.spent_tokens) == (0.75, 25)
    back = decode_snapshot(encode_snapshot(state, segment=1, emits_end=0))
    assert (back.spent_usd, back.spent_tokens) == (0.75, 25)
    # A snapshot written before the spend was kept: nothing spent.
    head, _, body = encode_snapshot(Replay(), segment=1, emits_end=0).partition(b"\n")
    fields = orjson.loads(body)
    del fields["spent"]
    old = orjson.dumps(fields)
    magic = head[: head.index(b" 1 ") + 3]
    assert decode_snapshot(magic + _digest(old) + b"\n" + old).spent_usd == 0.0


async def test_a_last_reply_that_fails_its_row_is_still_journaled_with_its_spend(
    mock: MockServer, tmp_path: Path
) -> None:
    # Single-turn rows cut off by max_tokens, with fail_on_length: each row's only
    # reply, held to be journaled with the row, goes to the journal though the row fails.
    write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": f"say {i}"} for i in range(6)])
    teacher = {"params": {"temperature": 0.0, "max_tokens": 3}, "fail_on_length": True}
    path = paid(tmp_path, mock.base_url, "cut", teacher=teacher)

    result = await turnstile("run", str(path), "--quiet")

    assert result.returncode == 1, result.stderr
    assert len(read_jsonl(tmp_path / "out" / "cut.failed.jsonl")) == 6
    journal = read_jsonl(tmp_path / "ck-cut" / "journal.jsonl")
    turns = [r for r in journal if r["k"] == "t"]
    assert sorted(r["l"] for r in turns) == list(range(6))
    usd, tokens = spent(path)
    assert tokens == sum(r["p"] + r["o"] for r in turns) > 0
    assert usd == pytest.approx(sum(r[SPENT] for r in turns)) and usd > 0
