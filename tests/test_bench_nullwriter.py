"""bench.nullwriter: a run whose writer writes nothing, every row's work done all the same."""

from __future__ import annotations

from pathlib import Path

import orjson

from bench import nullwriter
from engine.testing.mock_server import MockServer


def test_a_run_with_the_null_writer_asks_for_every_row_and_writes_none(
    tmp_path: Path, threaded_mock: MockServer
) -> None:
    rows = [{"id": i, "prompt": f"question {i}"} for i in range(20)]
    (tmp_path / "in.jsonl").write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in rows))
    config = {
        "task": "distill",
        "input": str(tmp_path / "in.jsonl"),
        "output": str(tmp_path / "out" / "distilled.jsonl"),
        "checkpoint_dir": str(tmp_path / "ck"),
        "models": {"teacher": {"base_url": threaded_mock.base_url, "model": "mock"}},
        "distill": {"model": "teacher"},
    }
    (tmp_path / "run.yaml").write_bytes(orjson.dumps(config))

    assert nullwriter.main([str(tmp_path / "run.yaml")]) == 0

    assert threaded_mock.stats.completed == len(rows)  # each row's request was made
    output = tmp_path / "out" / "distilled.jsonl"
    assert not output.exists() or output.stat().st_size == 0  # and none was written
    journal = [path for path in (tmp_path / "ck").rglob("journal*") if path.stat().st_size]
    assert journal == []  # nor any journal record
