"""`turnstile export`: rows in input order from a completion-order output and its journal,
as JSONL, Parquet and a saved Hugging Face dataset with its card."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from engine.checkpoint.journal import JOURNAL_NAME, encode
from engine.config import RunConfig, parse_config
from engine.output.export import ExportError, default_destination, export, index_rows, infer_schema
from engine.testing.mock_server import MockServer
from tests.conftest import conversations, read_jsonl, turnstile, write_config, write_jsonl
from tests.test_preference_run import prefs_config, prompts

SECRET = "sk-do-not-leak-0123456789"


def make_config(folder: Path, task: str = "distill") -> RunConfig:
    model = {
        # A user and password in the URL with api_key_env too is a config error (one
        # Authorization header): a secret query value stands for the URL's credentials.
        "base_url": "https://api.example.com/v1?key=query-secret&password=hunter2",
        "model": "teacher-m",
        "api_key_env": "TURNSTILE_TEST_KEY",
        "params": {"temperature": 0.5, "max_tokens": 64, "api_key": "params-secret"},
    }
    raw: dict[str, Any] = {
        "task": task,
        "input": "in.jsonl",
        "output": "out/rows.jsonl",
        "checkpoint_dir": "ck",
        "models": {"teacher": model, "judge": {**model, "model": "judge-m"}},
    }
    if task == "distill":
        raw["distill"] = {"model": "teacher"}
    else:
        raw["preference"] = {"generators": ["teacher"], "judge": "judge"}
    return parse_config(raw, folder / "run.yaml", env={"TURNSTILE_TEST_KEY": SECRET})


def write_run(
    config: RunConfig,
    rows: dict[int, dict[str, Any]],
    order: list[int],
    *,
    tail: bytes = b"",
    journal_extra: list[dict[str, Any]] | None = None,
) -> None:
    """The output in ``order`` (completion order) and a journal whose emits vouch for it,
    as the writer makes them: turn records, then the row, then its emit."""
    config.output.parent.mkdir(parents=True, exist_ok=True)
    config.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    out = b""
    journal = b""
    for record in journal_extra or []:
        journal += encode(record)
    for line in order:
        # A turn whose text looks like an emit record: it must not be taken for one.
        journal += encode({"k": "t", "l": line, "i": 0, "c": '{"k":"o","l":7,"e":1}'})
        out += orjson.dumps(rows[line]) + b"\n"
        journal += encode({"k": "o", "l": line, "e": len(out)})
    config.output.write_bytes(out + tail)
    (config.checkpoint_dir / JOURNAL_NAME).write_bytes(journal)


def tricky_rows() -> dict[int, dict[str, Any]]:
    """Rows whose types only settle over several batches."""
    rows: dict[int, dict[str, Any]] = {}
    for line in range(7):
        messages = [
            {"role": "user", "content": f"q{line}"},
            {"role": "assistant", "content": f"a{line}"},
        ]
        row: dict[str, Any] = {
            "meta": None if line < 3 else {"source": f"s{line}", "n": line},
            "id": line if line % 2 == 0 else f"row-{line}",  # int in some rows, str in others
            "messages": messages,
            "model": "teacher-m",
            "usage": {"prompt_tokens": line, "completion_tokens": 2 * line},
        }
        if line == 5:
            row["truncated_turns"] = [0]
        rows[line] = row
    return rows


# --- order -------------------------------------------------------------------------------


def test_index_rows_last_emit_wins_and_ends_past_the_file_are_dropped() -> None:
    ends = index_rows([(0, 10), (2, 30), (1, 20), (2, 45), (4, 99)], out_size=50)
    assert list(ends) == [10, 20, 45, -1, -1]


def test_jsonl_export_is_in_input_order(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    rows = tricky_rows()
    order = [3, 0, 6, 1, 5, 2, 4]
    write_run(config, rows, order)

    dest = export(config, "jsonl", None)

    assert dest == tmp_path / "out" / "rows.sorted.jsonl"
    assert read_jsonl(dest) == [rows[line] for line in range(7)]
    assert read_jsonl(config.output) == [rows[line] for line in order]  # untouched


def test_rows_not_vouched_for_by_the_journal_are_left_out(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    rows = tricky_rows()
    # A crash after the output write, before the journal's: the run would cut it back.
    write_run(config, rows, [2, 0], tail=orjson.dumps(rows[1]) + b"\n")

    assert read_jsonl(export(config, "jsonl", None)) == [rows[0], rows[2]]


def test_a_row_written_again_after_a_lost_write_is_exported_once(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    rows = tricky_rows()
    first = orjson.dumps(rows[0]) + b"\n"
    lost_end = len(first) + len(orjson.dumps(rows[1])) + 1
    # Run 1 journaled rows 0 and 1, but a power cut lost row 1's bytes; run 2 wrote
    # row 2, then row 1 again.
    write_run(
        config,
        rows,
        [0, 2, 1],
        journal_extra=[{"k": "o", "l": 0, "e": len(first)}, {"k": "o", "l": 1, "e": lost_end}],
    )

    assert read_jsonl(export(config, "jsonl", None)) == [rows[0], rows[1], rows[2]]


def test_a_journal_that_does_not_describe_the_output_is_refused(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    write_run(config, tricky_rows(), [0, 1, 2], journal_extra=[{"k": "o", "l": 3, "e": 5}])

    with pytest.raises(ExportError, match="disagree near byte"):
        export(config, "jsonl", None)


def test_no_run_yet(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    with pytest.raises(ExportError, match="no run journal"):
        export(config, "jsonl", None)
    write_run(config, {}, [])
    with pytest.raises(ExportError, match="no finished rows yet"):
        export(config, "jsonl", None)


def test_the_destination_may_not_be_the_runs_own_files_or_a_foreign_folder(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path)
    write_run(config, tricky_rows(), [0])
    with pytest.raises(ExportError, match="overwrite the run's own files"):
        export(config, "jsonl", config.output)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not a saved dataset"):
        export(config, "hf", tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_default_destinations() -> None:
    out = Path("/data/out/distilled.jsonl")
    assert default_destination(out, "parquet") == Path("/data/out/distilled.parquet")
    assert default_destination(out, "hf") == Path("/data/out/distilled_hf")
    assert default_destination(out, "jsonl") == Path("/data/out/distilled.sorted.jsonl")
    with pytest.raises(ExportError, match="unknown export format"):
        default_destination(out, "csv")


# --- Parquet and Hugging Face --------------------------------------------------------------


def test_parquet_schema_is_stable_across_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    monkeypatch.setattr("engine.output.export.ROWS_PER_GROUP", 2)  # several batches, several groups
    config = make_config(tmp_path)
    rows = tricky_rows()
    write_run(config, rows, [6, 5, 4, 3, 2, 1, 0])

    dest = export(config, "parquet", None)

    assert dest == tmp_path / "out" / "rows.parquet"
    table = pq.read_table(dest)
    assert table.num_rows == 7
    assert pq.ParquetFile(dest).metadata.num_row_groups == 4
    assert table.column_names == ["meta", "id", "messages", "model", "usage", "truncated_turns"]
    schema = table.schema
    assert schema.field("messages").type == pa.list_(
        pa.struct([("role", pa.string()), ("content", pa.string())])
    )
    assert schema.field("meta").type == pa.struct([("source", pa.string()), ("n", pa.int64())])
    assert schema.field("truncated_turns").type == pa.list_(pa.int64())
    assert schema.field("id").type == pa.string()  # mixed int/str: text
    got = table.to_pylist()
    assert [r["id"] for r in got] == ["0", "row-1", "2", "row-3", "4", "row-5", "6"]
    assert [r["messages"] for r in got] == [rows[i]["messages"] for i in range(7)]
    assert [r["truncated_turns"] for r in got] == [None] * 5 + [[0], None]
    assert got[0]["meta"] is None and got[4]["meta"] == {"source": "s4", "n": 4}


def test_infer_schema_unifies_and_falls_back_to_json() -> None:
    pa = pytest.importorskip("pyarrow")
    batches = [
        [{"a": 1, "b": None, "c": {}}],
        [{"a": 2.5, "b": [{"x": 1}], "d": True, "c": {}}],
        [{"a": None, "b": [{"y": "s"}], "d": 3}],
    ]
    schema, as_json = infer_schema(batches, pa)
    assert schema.names == ["a", "b", "c", "d"]
    assert schema.field("a").type == pa.float64()
    assert schema.field("b").type == pa.list_(pa.struct([("x", pa.int64()), ("y", pa.string())]))
    assert as_json == ["c", "d"]  # an empty struct Parquet cannot store; bool meets int


def test_hf_export_loads_with_datasets_and_carries_a_card(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    config = make_config(tmp_path)
    rows = tricky_rows()
    write_run(config, rows, [1, 0, 3, 2, 6, 5, 4])
    failures = [
        {"id": "x", "line": 7, "turn": 0, "error": "HTTP 400 from models.teacher: bad request"},
        {"id": "y", "line": 8, "turn": 1, "error": "HTTP 400 from models.teacher: bad request"},
        {"id": "z", "line": 9, "turn": None, "error": "input: is not valid JSON"},
    ]
    write_jsonl(config.failed_output, failures)
    write_jsonl(config.input, [{"prompt": "p"}] * 12)

    dest = export(config, "hf", None)
    again = export(config, "hf", None)  # replaces its own earlier export

    assert dest == again == tmp_path / "out" / "rows_hf"
    ds = datasets.load_from_disk(str(dest))
    assert ds.num_rows == 7
    assert ds["id"] == [str(rows[i]["id"]) for i in range(7)]
    assert ds[2]["messages"] == rows[2]["messages"]
    card = (dest / "README.md").read_text()
    assert "Multi-turn distillation" in card and "`teacher-m`" in card
    assert "Turns: every_user: every user message gets its own reply." in card
    assert "| in this dataset | 7 |" in card
    assert "| failed (not in this dataset) | 3 |" in card
    assert "| not finished yet (the run was stopped) | 2 |" in card
    assert "| 2 | HTTP 400 from models.teacher: bad request |" in card
    assert "`id`: values of differing types" in card
    assert "api_key_env: TURNSTILE_TEST_KEY" in card
    assert "base_url: https://api.example.com/v1" in card
    for secret in (SECRET, "hunter2", "query-secret", "params-secret"):
        assert secret not in card
    assert "max_tokens=64" in card  # a param named like tokens is not a secret
    assert not list(dest.parent.glob(".rows_hf*"))  # no temporary left behind


# --- real runs on the mock server ---------------------------------------------------------


async def test_a_real_distillation_exports_in_input_order_to_every_format(
    tmp_path: Path, mock: MockServer
) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    datasets = pytest.importorskip("datasets")
    source = conversations(40)
    lines: list[Any] = [*source[:10], "not json", *source[10:]]
    write_jsonl(tmp_path / "in.jsonl", lines)
    config_path = write_config(tmp_path, mock.base_url, cap=8)
    result = await turnstile("run", str(config_path), "--quiet")
    assert result.returncode == 1, result.stderr  # the bad line failed
    from engine.config import load_config

    config = load_config(config_path)
    completion = [row["id"] for row in read_jsonl(config.output)]
    expected = [s["id"] for s in source]
    assert sorted(completion) == sorted(expected)

    jsonl = export(config, "jsonl", None)
    table = pq.read_table(export(config, "parquet", None))
    ds = datasets.load_from_disk(str(export(config, "hf", tmp_path / "hf")))

    assert [row["id"] for row in read_jsonl(jsonl)] == expected
    assert table.column("id").to_pylist() == expected
    assert ds["id"] == expected
    by_id = {row["id"]: row for row in read_jsonl(config.output)}
    assert ds[11]["messages"] == by_id[expected[11]]["messages"]
    assert table.num_rows == ds.num_rows == 40
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "| failed (not in this dataset) | 1 |" in card
    assert "is not valid JSON" in card


async def test_a_real_preference_run_exports_trl_columns_and_pairs_only(
    tmp_path: Path, mock: MockServer
) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    datasets = pytest.importorskip("datasets")
    write_jsonl(tmp_path / "in.jsonl", prompts(30))
    config_path = prefs_config(tmp_path, mock.base_url, num_generations=2)
    result = await turnstile("run", str(config_path), "--quiet")
    assert result.returncode == 0, result.stderr
    from engine.config import load_config

    config = load_config(config_path)
    rows = sorted(read_jsonl(config.output), key=lambda r: int(r["id"][1:]))
    paired = [r for r in rows if r["chosen"] is not None]
    assert 0 < len(paired) < len(rows), "the mock judge should leave some rows unpaired"

    table = pq.read_table(export(config, "parquet", None))
    assert table.column("id").to_pylist() == [r["id"] for r in rows]
    dest = export(config, "hf", None, pairs_only=True)
    ds = datasets.load_from_disk(str(dest))

    assert ds["id"] == [r["id"] for r in paired]
    for got, want in zip(ds, paired, strict=True):
        assert got["prompt"] == want["prompt"]
        assert got["chosen"] == want["chosen"]
        assert got["rejected"] == want["rejected"]
    card = (dest / "README.md").read_text()
    assert "Preference pairs" in card and "DPOTrainer" in card
    assert f"| with no chosen/rejected pair | {len(rows) - len(paired)} |" in card
    assert "--pairs-only" in card
    with pytest.raises(ExportError, match="--pairs-only is for preference runs"):
        export(make_config(tmp_path / "d"), "jsonl", None, pairs_only=True)


def test_a_missing_extra_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config(tmp_path)
    write_run(config, tricky_rows(), [0, 1])
    monkeypatch.setitem(sys.modules, "datasets", None)
    hf_extra = r"needs (datasets|pyarrow): pip install 'turnstile\[hf\]'"
    with pytest.raises(ExportError, match=hf_extra):
        export(config, "hf", None)
    assert not (tmp_path / "out" / "rows_hf").exists()
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ExportError, match=r"needs pyarrow: pip install 'turnstile\[parquet\]'"):
        export(config, "parquet", None)
    assert export(config, "jsonl", None).exists()  # JSONL needs no extra


@pytest.mark.parametrize("fmt", ["jsonl", "hf"])
def test_columns_trl_reserves_are_left_out_unless_kept(tmp_path: Path, fmt: str) -> None:
    if fmt == "hf":
        pytest.importorskip("datasets")
    config = make_config(tmp_path)
    rows = {
        i: {
            "id": f"r{i}",
            "completion": "an input column named like TRL's",
            "label": i % 2 == 0,
            "topic": "kept",
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        }
        for i in range(3)
    }
    write_run(config, rows, [0, 1, 2])

    dest = export(config, fmt, tmp_path / f"plain.{fmt}")
    kept = export(config, fmt, tmp_path / f"kept.{fmt}", keep_columns=True)

    if fmt == "jsonl":
        assert [set(r) for r in read_jsonl(dest)] == [{"id", "topic", "messages"}] * 3
        assert read_jsonl(kept) == [rows[i] for i in range(3)]
        return
    import datasets

    assert set(datasets.load_from_disk(str(dest)).column_names) == {"id", "topic", "messages"}
    assert {"completion", "label"} <= set(datasets.load_from_disk(str(kept)).column_names)
    card = (dest / "README.md").read_text()
    assert "Left out: `completion`, `label`" in card and "--keep-columns" in card
    assert "Left out" not in (kept / "README.md").read_text()
