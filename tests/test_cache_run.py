"""The reply cache end to end on the mock: an edited input asks only what changed;
runs share one store at once; a read-only store adds nothing; a budget stops a run
(exit 4) and a raised one resumes it exactly."""

from __future__ import annotations

import asyncio
import re
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import yaml

from engine import progress
from engine.cache.store import ReplyStore
from engine.errors import EXIT_BUDGET, EXIT_STOPPED
from engine.history import HISTORY_NAME
from engine.metrics import RunCollector
from engine.stats import ModelStats, RunStats
from engine.testing.mock_server import MockServer
from tests.conftest import kill_after, read_jsonl, turnstile, write_config, write_jsonl


def row(i: int, turns: int = 3, changed_at: int | None = None) -> dict[str, Any]:
    messages = []
    for t in range(turns):
        text = f"row {i} asks question {t}" + (" (edited)" if t == changed_at else "")
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": "old"}]
    return {"id": f"r{i}", "messages": messages}


def config(folder: Path, url: str, name: str, store: Path, **extra: Any) -> Path:
    folder.mkdir(exist_ok=True)
    return write_config(
        folder,
        url,
        name=name,
        output=f"out/{name}.jsonl",
        checkpoint_dir=f"ck-{name}",
        cache={"dir": str(store), **extra.pop("cache", {})},
        **extra,
    )


async def test_an_edited_input_requests_exactly_the_changed_turns(
    mock: MockServer, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    write_jsonl(tmp_path / "in.jsonl", [row(i) for i in range(5)])
    first = await turnstile("run", str(config(tmp_path, mock.base_url, "first", store)))
    assert first.returncode == 0, first.stderr
    assert mock.stats.total_requests == 15
    assert ReplyStore(store).count() == 15

    # Row 1 edited at turn 0, row 2 at turn 2, row 4 deleted, row 5 appended.
    edited = [row(0), row(1, changed_at=0), row(2, changed_at=2), row(3), row(5)]
    write_jsonl(tmp_path / "in.jsonl", edited)
    mock.reset()
    second = await turnstile("run", str(config(tmp_path, mock.base_url, "second", store)))
    assert second.returncode == 0, second.stderr
    assert mock.stats.total_requests == 3 + 1 + 3
    out = sorted(read_jsonl(tmp_path / "out/second.jsonl"), key=lambda r: r["id"])
    assert [r["id"] for r in out] == ["r0", "r1", "r2", "r3", "r5"]
    unchanged = {r["id"]: r for r in read_jsonl(tmp_path / "out/first.jsonl")}
    assert out[0]["messages"] == unchanged["r0"]["messages"]
    assert out[2]["messages"][:4] == unchanged["r2"]["messages"][:4]


async def test_two_runs_share_one_store_at_once_and_a_read_only_store_adds_nothing(
    mock: MockServer, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    write_jsonl(tmp_path / "in.jsonl", [row(i, turns=2) for i in range(40)])
    a, b = config(tmp_path, mock.base_url, "a", store), config(tmp_path, mock.base_url, "b", store)
    runs = await asyncio.gather(turnstile("run", str(a)), turnstile("run", str(b)))
    assert [r.returncode for r in runs] == [0, 0], [r.stderr for r in runs]
    assert sorted(map(str, read_jsonl(tmp_path / "out/a.jsonl"))) == sorted(
        map(str, read_jsonl(tmp_path / "out/b.jsonl"))
    )
    assert ReplyStore(store).count() == 80
    sent = mock.stats.total_requests
    assert 80 <= sent <= 160

    write_jsonl(tmp_path / "in.jsonl", [row(i, turns=2) for i in range(41)])
    mock.reset()
    ro = config(tmp_path, mock.base_url, "ro", store, cache={"mode": "read_only"})
    done = await turnstile("run", str(ro))
    assert done.returncode == 0, done.stderr
    assert mock.stats.total_requests == 2  # only the new row
    assert ReplyStore(store).count() == 80  # and it is not kept


DOWN = "http://127.0.0.1:9/v1"  # nothing listens there


async def test_a_rerun_the_store_answers_whole_needs_no_server_and_one_it_cannot_waits_for_it(
    mock: MockServer, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    write_jsonl(tmp_path / "in.jsonl", [row(i, turns=2) for i in range(6)])
    first = await turnstile("run", str(config(tmp_path, mock.base_url, "first", store)))
    assert first.returncode == 0, first.stderr
    # No server at all: an empty store cannot stand in for it, the run stops at once.
    empty = await turnstile("run", str(config(tmp_path, DOWN, "empty", tmp_path / "none")))
    assert empty.returncode == EXIT_STOPPED and "cannot reach" in empty.stderr
    # A rerun (a fresh checkpoint) the store answers whole: done without the server.
    again = await turnstile("run", str(config(tmp_path, DOWN, "again", store)))
    assert again.returncode == 0, again.stderr
    assert "no replica answers; the run goes on with the replies in cache.dir" in again.stderr
    assert "12 cached" in again.stderr

    def texts(name: str) -> dict[str, Any]:
        return {r["id"]: r["messages"] for r in read_jsonl(tmp_path / f"out/{name}.jsonl")}

    assert texts("again") == texts("first")
    # A row the store cannot answer waits for the model as in an outage, then the run
    # stops (exit 3); with the server back, the same command finishes it, exactly.
    write_jsonl(tmp_path / "in.jsonl", [row(i, turns=2) for i in range(7)])
    path = config(tmp_path, DOWN, "more", store)
    raw = yaml.safe_load(path.read_text())
    raw["models"]["teacher"]["down_after_s"] = 0.5
    path.write_text(yaml.safe_dump(raw))
    mock.reset()
    stopped = await turnstile("run", str(path))
    assert stopped.returncode == EXIT_STOPPED, stopped.stderr
    assert "models.teacher down for 0.5 s" in stopped.stderr
    raw["models"]["teacher"]["base_url"] = mock.base_url
    path.write_text(yaml.safe_dump(raw))
    resumed = await turnstile("run", str(path))
    assert resumed.returncode == 0, resumed.stderr
    assert mock.stats.total_requests == 2  # row 6's two turns, and nothing else
    more = texts("more")
    assert sorted(more) == [f"r{i}" for i in range(7)]
    assert {k: v for k, v in more.items() if k != "r6"} == texts("first")


async def test_a_budget_stops_the_run_with_exit_4_and_a_raised_one_resumes_it(
    mock: MockServer, tmp_path: Path
) -> None:
    rows = [row(i, turns=2) for i in range(30)]
    write_jsonl(tmp_path / "in.jsonl", rows)
    reference = write_config(
        tmp_path, mock.base_url, name="ref", output="out/ref.jsonl", checkpoint_dir="ck-ref"
    )
    assert (await turnstile("run", str(reference))).returncode == 0
    mock.reset()
    params = {"temperature": 0.0, "max_tokens": 32}
    models = {
        "teacher": {
            "base_url": mock.base_url,
            "model": "mock",
            "max_concurrency": 4,
            "params": params,
            "price": {"input": 1.0, "output": 2.0},
        }
    }
    path = write_config(
        tmp_path,
        mock.base_url,
        name="paid",
        output="out/paid.jsonl",
        checkpoint_dir="ck-paid",
        models=models,
        budget={"max_tokens": 800},
    )
    stopped = await turnstile("run", str(path))
    assert stopped.returncode == EXIT_BUDGET, stopped.stderr
    assert "budget.max_tokens 800" in stopped.stderr and "run `turnstile run" in stopped.stderr
    assert mock.stats.total_requests < 60
    raw = yaml.safe_load(path.read_text())
    raw["budget"] = {"max_tokens": 10_000_000}
    path.write_text(yaml.safe_dump(raw))
    resumed = await turnstile("run", str(path))
    assert resumed.returncode == 0, resumed.stderr
    assert mock.stats.total_requests == 60  # nothing asked twice

    def texts(name: str) -> dict[str, Any]:
        return {r["id"]: r["messages"] for r in read_jsonl(tmp_path / f"out/{name}.jsonl")}

    assert texts("paid") == texts("ref")


async def test_a_sigkill_while_replies_are_stored_leaves_a_whole_store_that_answers_a_rerun(
    mock: MockServer, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    write_jsonl(tmp_path / "seed.jsonl", [row(i, turns=1) for i in range(100)])
    seed = config(
        tmp_path, mock.base_url, "seed", store, models=_teacher(mock, cap=32), input="seed.jsonl"
    )
    assert (await turnstile("run", str(seed))).returncode == 0  # 100 replies committed
    mock.reset()
    rows = 2000
    write_jsonl(tmp_path / "in.jsonl", [row(i, turns=1) for i in range(rows)])
    path = config(tmp_path, mock.base_url, "killed", store, models=_teacher(mock, cap=32))
    killed = await kill_after(mock, 1500, "run", str(path))  # mid-way through the writes
    assert killed.returncode < 0
    sent = mock.stats.total_requests
    assert sent < rows - 100  # the seed's rows came from the store

    reader = ReplyStore(store)
    db = sqlite3.connect(reader.path)
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    kept = db.execute("SELECT key, reply FROM reply").fetchall()
    db.close()
    reader.close()
    assert 100 <= len(kept) <= 100 + sent
    for _key, reply in kept:  # every entry whole: a reply that decodes, with its tokens
        value = orjson.loads(reply)
        assert value["c"] and value["p"] > 0 and value["o"] > 0

    mock.reset()
    again = config(tmp_path, mock.base_url, "again", store)
    done = await turnstile("run", str(again))
    assert done.returncode == 0, done.stderr
    assert mock.stats.total_requests == rows - len(kept)  # the rest from the store
    assert ReplyStore(store).count() == rows
    assert len(read_jsonl(tmp_path / "out/again.jsonl")) == rows


def _teacher(mock: MockServer, *, cap: int) -> dict[str, Any]:
    return {
        "teacher": {
            "base_url": mock.base_url,
            "model": "mock",
            "max_concurrency": cap,
            "params": {"temperature": 0.0},
        }
    }


async def test_cost_and_cache_hits_show_in_the_summary_metrics_history_and_report(
    mock: MockServer, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    write_jsonl(tmp_path / "in.jsonl", [row(i, turns=2) for i in range(10)])
    priced = _teacher(mock, cap=4)
    priced["teacher"]["price"] = {"input": 1.0, "output": 2.0}
    first = await turnstile("run", str(config(tmp_path, mock.base_url, "p1", store, models=priced)))
    assert first.returncode == 0, first.stderr
    assert re.search(r"^cost \$0\.\d{4}$", first.stderr, re.M), first.stderr
    assert re.search(r"model teacher: .*, \$0\.\d{4}", first.stderr)

    path = config(tmp_path, mock.base_url, "p2", store, models=priced)
    second = await turnstile("run", str(path))
    assert second.returncode == 0, second.stderr
    # Every reply from the store: nothing spent, what it saved shown.
    assert re.search(r"^cost \$0\.0000, 20 cached, saved \$0\.\d{4}$", second.stderr, re.M)
    assert "20 cached (saved $" in second.stderr

    history = [
        orjson.loads(line)
        for line in (tmp_path / "ck-p2" / HISTORY_NAME).read_bytes().splitlines()
        if line.strip()
    ]
    teacher = history[-1]["models"]["teacher"]
    assert teacher["cached"] == 20 and teacher["cost_usd"] == 0 and teacher["saved_usd"] > 0
    page = (tmp_path / "ck-p2" / "report.html").read_text()
    assert "answered from the reply cache" in page and "Spend so far" in page

    stats = RunStats(cached=20)
    stats.models["teacher"] = ModelStats(
        name="teacher", cap=4, cached=20, cost_usd=0.5, saved_usd=0.25, priced=True
    )
    families = {f.name: f for f in RunCollector(lambda: stats).collect()}
    assert [s.value for s in families["turnstile_cost_usd"].samples] == [0.5]
    assert families["turnstile_cost_usd"].samples[0].labels == {"model": "teacher"}
    assert [s.value for s in families["turnstile_cached"].samples] == [20]
    assert "cost $0.5000, 20 cached, saved $0.2500" in progress.status_line(stats, 1.0)


async def test_a_cache_dir_holding_another_file_is_refused_with_exit_2(
    mock: MockServer, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (store / "replies.sqlite3").write_bytes(b"not sqlite " * 500)
    write_jsonl(tmp_path / "in.jsonl", [row(i, turns=1) for i in range(3)])
    refused = await turnstile("run", str(config(tmp_path, mock.base_url, "bad", store)))
    assert refused.returncode == 2, refused.stderr
    assert "cache.dir:" in refused.stderr and "is not a reply store" in refused.stderr
    assert mock.stats.total_requests == 0
