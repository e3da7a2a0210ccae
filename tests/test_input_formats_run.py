"""End to end (after the wiring): `turnstile run` on Parquet and saved-dataset input with
column mapping and quality filters, resume, status, and `turnstile export`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine.testing.mock_server import MockServer
from tests.conftest import conversations, read_jsonl, turnstile, write_config

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
datasets = pytest.importorskip("datasets")

DENY = {"deny": [r"\b1[0-9]\b"]}  # the mock's replies echo the question: rows c10-c19


def columnar(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conftest conversations as a dataset with its own column names."""
    out = []
    for r in rows:
        if "conversations" in r:
            chat = [
                {"role": "user" if m["from"] == "human" else "assistant", "content": m["value"]}
                for m in r["conversations"]
            ]
        else:
            chat = r.get("messages") or [{"role": "user", "content": r["prompt"]}]
        out.append({"uid": r["id"], "chat": chat, "note": "n" + r["id"]})
    return out


def write_input(folder: Path, kind: str, rows: list[dict[str, Any]]) -> str:
    if kind == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), folder / "in.parquet", row_group_size=7)
        return "in.parquet"
    if kind == "parquet_folder":
        (folder / "d").mkdir()
        pq.write_table(pa.Table.from_pylist(rows[:13]), folder / "d" / "part-0.parquet")
        pq.write_table(pa.Table.from_pylist(rows[13:]), folder / "d" / "part-1.parquet")
        return "d"
    datasets.Dataset.from_list(rows).save_to_disk(str(folder / "hf"), num_shards=2)
    return "hf"


@pytest.mark.parametrize("kind", ["parquet", "parquet_folder", "hf"])
async def test_columnar_input_runs_filters_resumes_and_exports(
    tmp_path: Path, mock: MockServer, kind: str
) -> None:
    source = columnar(conversations(30))
    inp = write_input(tmp_path, kind, source)
    columns = {"messages": "chat", "id": "uid"}
    config = write_config(tmp_path, mock.base_url, input=inp, input_columns=columns, filters=DENY)

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 0, result.stderr
    assert "10 filtered" in result.stderr and "by rule: deny 10" in result.stderr
    out = read_jsonl(tmp_path / "out" / "distilled.jsonl")
    filtered = read_jsonl(tmp_path / "out" / "distilled.filtered.jsonl")
    assert sorted(r["id"] for r in out) == sorted(f"c{i}" for i in range(30) if not 10 <= i < 20)
    assert all(f["filter"].startswith("deny: ") for f in filtered) and len(filtered) == 10
    assert all(r["note"] == "n" + r["id"] for r in out)  # other columns carried

    again = await turnstile("run", str(config), "--quiet")
    assert again.returncode == 0, again.stderr
    assert len(read_jsonl(tmp_path / "out" / "distilled.jsonl")) == len(out)
    requests = mock.stats.total_requests

    exported = await turnstile("export", str(config), "--format", "hf")
    assert exported.returncode == 0, exported.stderr
    ds = datasets.load_from_disk(str(tmp_path / "out" / "distilled_hf"))
    assert ds["id"] == [f"c{i}" for i in range(30) if not 10 <= i < 20]
    card = (tmp_path / "out" / "distilled_hf" / "README.md").read_text()
    assert "| filtered out by quality rules | 10 |" in card
    assert mock.stats.total_requests == requests  # resume and export sent nothing

    changed = write_config(
        tmp_path, mock.base_url, input=inp, input_columns={"messages": "chat"}, filters=DENY
    )
    refused = await turnstile("run", str(changed), "--quiet")
    assert refused.returncode == 2 and "input_columns" in refused.stderr, refused.stderr


async def test_a_mapped_column_the_input_lacks_is_refused_before_any_request(
    tmp_path: Path, mock: MockServer
) -> None:
    pq.write_table(pa.Table.from_pylist(columnar(conversations(3))), tmp_path / "in.parquet")
    config = write_config(
        tmp_path, mock.base_url, input="in.parquet", input_columns={"messages": "dialog"}
    )

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 2
    assert "input_columns.messages" in result.stderr and "no column 'dialog'" in result.stderr
    assert mock.stats.total_requests == 0
