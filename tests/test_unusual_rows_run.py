"""Input a careless or hostile user feeds a run: a row the engine cannot handle fails alone
(into the failed file, with its line), numbers come out as they went in, a file that is not
what its name says is exit 2, and a cap the input cannot fill starts no more workers than
there are rows. Real runs against the mock server on loopback."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import anyio
import orjson
import pytest

import engine
from engine.testing.mock_server import MockServer
from tests.conftest import read_jsonl, turnstile, write_config, write_jsonl

DEEP = b'{"id": "deep", "x": ' + b"[" * 300 + b"]" * 300 + b', "prompt": "q"}'


async def test_a_row_nested_too_deep_fails_alone_with_its_line(
    tmp_path: Path, mock: MockServer
) -> None:
    write_jsonl(
        tmp_path / "in.jsonl",
        [{"id": "a", "prompt": "first"}, DEEP.decode(), {"id": "b", "prompt": "last"}],
    )
    config = str(write_config(tmp_path, mock.base_url))

    done = await turnstile("run", config, "--quiet")

    assert done.returncode == 1, done.stderr
    assert {row["id"] for row in read_jsonl(tmp_path / "out" / "distilled.jsonl")} == {"a", "b"}
    [failed] = read_jsonl(tmp_path / "out" / "distilled.failed.jsonl")
    assert (failed["line"], failed["id"]) == (1, "deep")
    assert "nested deeper than 250" in failed["error"]

    again = await turnstile("run", config, "--quiet")  # a resume is not stuck on it either

    assert again.returncode == 1, again.stderr
    assert len(read_jsonl(tmp_path / "out" / "distilled.failed.jsonl")) == 1


async def test_an_id_past_64_bits_comes_out_exactly_as_it_went_in(
    tmp_path: Path, mock: MockServer
) -> None:
    big, negative, wide = 2**70, -(2**64), 12345678901234567890  # the last fits 64 bits
    lines = [
        f'{{"id": {big}, "prompt": "q1", "n": {negative}}}',
        f'{{"id": {wide}, "prompt": "q2", "x": [1.5, "{big}"]}}',
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    config = str(write_config(tmp_path, mock.base_url))

    done = await turnstile("run", config, "--quiet")

    assert done.returncode == 0, done.stderr
    out = (tmp_path / "out" / "distilled.jsonl").read_bytes().splitlines()
    first = next(line for line in out if b"q1" in line)
    second = next(line for line in out if b"q2" in line)
    assert first.startswith(b'{"n":-18446744073709551616,"id":1180591620717411303424,')
    assert b'"id":12345678901234567890,' in second
    assert b'"x":[1.5,"1180591620717411303424"]' in second


async def test_a_file_named_parquet_that_is_not_parquet_is_exit_2_naming_it(
    tmp_path: Path, mock: MockServer
) -> None:
    pytest.importorskip("pyarrow")
    write_jsonl(tmp_path / "in.parquet", [{"prompt": "q"}])
    config = str(write_config(tmp_path, mock.base_url, input="in.parquet"))

    done = await turnstile("run", config, "--quiet")

    assert done.returncode == 2, done.stderr
    assert str(tmp_path / "in.parquet") in done.stderr
    assert "cannot be read as Parquet" in done.stderr and "rename it to .jsonl" in done.stderr
    assert "crashed" not in done.stderr
    assert mock.stats.total_requests == 0


async def test_a_cap_the_input_cannot_fill_starts_no_more_workers_than_rows(
    tmp_path: Path, mock: MockServer
) -> None:
    rows = 5
    write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": f"held {i}"} for i in range(rows)])
    config = write_config(tmp_path, mock.base_url, cap=100_000)
    mock.hold = "held"
    workers: list[int] = []
    async with anyio.create_task_group() as group:
        group.start_soon(engine.arun, str(config))
        await mock.wait_for_requests(rows)  # every row in flight, held by the server
        # anyio names a task after its function: the row workers are engine._runner._work.
        workers.append(sum(t.get_name() == "engine._runner._work" for t in asyncio.all_tasks()))
        mock.release()

    assert 0 < workers[0] <= rows
    assert len(read_jsonl(tmp_path / "out" / "distilled.jsonl")) == rows


async def test_a_cap_the_input_cannot_fill_costs_no_memory(
    tmp_path: Path, mock: MockServer
) -> None:
    # Workers that would wait for rows that never come exit once the input ends, so
    # their number is seen in the run's peak memory: 200,000 of them took 1.7 GB.
    write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": f"q {i}"} for i in range(5)])
    config = write_config(tmp_path, mock.base_url, cap=100_000)
    measure = (
        "import resource, subprocess, sys; "
        "done = subprocess.run([sys.executable, '-m', 'engine', 'run', sys.argv[1], '--quiet']); "
        "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", measure, str(config), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    code, peak_kib = (int(word) for word in out.split())

    assert code == 0
    assert peak_kib < 300 * 1024  # a run of 5 rows takes about 50 MiB


def test_an_integer_past_64_bits_is_read_exactly() -> None:
    from engine.input.reader import decode_line

    line = orjson.dumps({"prompt": "q"})[:-1] + b', "id": 1180591620717411303424}'
    record = decode_line(line)

    assert orjson.dumps(record) == b'{"prompt":"q","id":1180591620717411303424}'


async def test_an_integer_past_64_bits_survives_export(tmp_path: Path, mock: MockServer) -> None:
    big = 2**70
    (tmp_path / "in.jsonl").write_text(
        f'{{"id": {big}, "prompt": "q1", "n": {-(2**64)}, "label": 1}}\n'
        '{"id": 7, "prompt": "q2"}\n'
    )
    config = str(write_config(tmp_path, mock.base_url))
    assert (await turnstile("run", config, "--quiet")).returncode == 0

    to = tmp_path / "export.jsonl"
    # "label" is a column TRL reserves: export leaves it out, so it writes the row anew.
    done = await turnstile("export", config, "--format", "jsonl", "--to", str(to))
    assert done.returncode == 0, done.stderr
    first = next(line for line in to.read_bytes().splitlines() if b"q1" in line)
    assert b'"id":1180591620717411303424' in first and b'"n":-18446744073709551616' in first
    assert b'"label"' not in first

    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    parquet = tmp_path / "export.parquet"
    done = await turnstile("export", config, "--format", "parquet", "--to", str(parquet))
    assert done.returncode == 0, done.stderr
    ids = pq.read_table(parquet).column("id").to_pylist()
    assert str(big) in [str(i) for i in ids]  # stored exactly, as text: Arrow has no such int
