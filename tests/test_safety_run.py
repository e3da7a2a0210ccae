"""Nothing a careless user does loses data: outputs that are the input, the config or the
checkpoint; export targets that are the run's own files; a repaired journal that would
write a row twice; damage that stays valid JSON; unwritable or odd output paths; a killed
export's leftovers; two runs on one output. Real `turnstile` subprocesses."""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from engine.checkpoint.manifest import lock_output
from engine.checkpoint.snapshot import EMITS_NAME
from engine.testing.mock_server import MockServer
from tests.conftest import (
    by_id,
    conversations,
    kill_after,
    read_jsonl,
    turnstile,
    write_config,
    write_jsonl,
)

SOURCE = conversations(12, max_turns=2)


def _setup(tmp_path: Path, mock: MockServer, **extra: Any) -> Path:
    write_jsonl(tmp_path / "in.jsonl", SOURCE)
    return write_config(tmp_path, mock.base_url, **extra)


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


# -- #1: --fresh never deletes or overwrites the input, the config or the checkpoint --------


@pytest.mark.parametrize("fresh", [False, True], ids=["resume", "fresh"])
async def test_fresh_never_deletes_the_input(tmp_path: Path, mock: MockServer, fresh: bool) -> None:
    (tmp_path / "sub").mkdir()
    config = _setup(tmp_path, mock, output="sub/../in.jsonl")
    before = (tmp_path / "in.jsonl").read_bytes()

    result = await turnstile("run", str(config), "--quiet", *(["--fresh"] if fresh else []))

    assert result.returncode == 2, result.stderr
    assert "output:" in result.stderr and "must not be the input file" in result.stderr
    assert (tmp_path / "in.jsonl").read_bytes() == before
    assert mock.stats.total_requests == 0


async def test_fresh_never_deletes_an_input_that_is_a_link_to_the_output(
    tmp_path: Path, mock: MockServer
) -> None:
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "rows.jsonl", SOURCE)
    before = (tmp_path / "data" / "rows.jsonl").read_bytes()
    (tmp_path / "in.jsonl").symlink_to(tmp_path / "data" / "rows.jsonl")
    config = write_config(tmp_path, mock.base_url, output="data/rows.jsonl")

    result = await turnstile("run", str(config), "--quiet", "--fresh")

    assert result.returncode == 2, result.stderr
    assert "must not be the input file" in result.stderr
    assert (tmp_path / "data" / "rows.jsonl").read_bytes() == before
    assert mock.stats.total_requests == 0


async def test_fresh_never_overwrites_the_config(tmp_path: Path, mock: MockServer) -> None:
    config = _setup(tmp_path, mock, output="run.yaml")
    before = config.read_bytes()

    result = await turnstile("run", str(config), "--quiet", "--fresh")

    assert result.returncode == 2, result.stderr
    assert "output:" in result.stderr and "must not be the config file" in result.stderr
    assert config.read_bytes() == before
    assert not (tmp_path / "ck").exists()


async def test_an_output_inside_the_checkpoint_is_refused(tmp_path: Path, mock: MockServer) -> None:
    config = _setup(tmp_path, mock, output="ck/journal.jsonl")

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 2, result.stderr
    assert "inside checkpoint_dir" in result.stderr and "output:" in result.stderr
    assert not (tmp_path / "ck").exists()
    assert mock.stats.total_requests == 0


# -- #2: export --to never overwrites the run's own files -----------------------------------


async def test_export_never_overwrites_the_runs_own_files(tmp_path: Path, mock: MockServer) -> None:
    config = _setup(tmp_path, mock)
    assert (await turnstile("run", str(config), "--quiet")).returncode == 0
    requests = mock.stats.total_requests
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "in.jsonl")
    before = _files(tmp_path)

    for target in (
        "ck/journal.jsonl",
        "ck/manifest.json",
        "ck",
        str(config),
        "in.jsonl",
        "link.jsonl",
        "out/../in.jsonl",
        "out/distilled.jsonl",
        "out/distilled.failed.jsonl",
        "out/distilled.filtered.jsonl",
    ):
        to = str(tmp_path / target)
        result = await turnstile("export", str(config), "--format", "jsonl", "--to", to)
        assert result.returncode == 2, (target, result.stderr)
        assert "--to" in result.stderr and "pick another path" in result.stderr, target
    result = await turnstile("export", str(config), "--format", "hf", "--to", str(tmp_path))
    assert result.returncode == 2, result.stderr

    assert _files(tmp_path) == before
    rerun = await turnstile("run", str(config), "--quiet")
    assert rerun.returncode == 0, rerun.stderr
    assert mock.stats.total_requests == requests  # the journal is whole: nothing asked again


# -- #5, #6: repair writes each row once; checksums catch damage that stays valid JSON --------


def _journal_lines(tmp_path: Path) -> tuple[Path, list[bytes]]:
    journal = tmp_path / "ck" / "journal.jsonl"
    return journal, journal.read_bytes().splitlines(keepends=True)


async def test_repair_after_a_damaged_emit_writes_each_row_once(
    tmp_path: Path, mock: MockServer
) -> None:
    source = conversations(120, max_turns=2)
    write_jsonl(tmp_path / "in.jsonl", source)
    config = write_config(tmp_path, mock.base_url, cap=4)
    killed = await kill_after(mock, 100, "run", str(config), "--quiet")
    assert killed.returncode == -signal.SIGKILL
    journal, lines = _journal_lines(tmp_path)
    emits = [i for i, line in enumerate(lines) if b'"k":"o"' in line]
    assert len(emits) > 3
    at = emits[len(emits) // 2]  # an emit in the middle: rows were written after its row
    lines[at] = lines[at].replace(b'"k":"o"', b'"k":"o', 1)  # one byte: no longer parses
    journal.write_bytes(b"".join(lines))

    refused = await turnstile("run", str(config), "--quiet")
    assert refused.returncode == 2 and "turnstile repair" in refused.stderr, refused.stderr
    repaired = await turnstile("repair", str(config))
    assert repaired.returncode == 0, repaired.stderr
    rerun = await turnstile("run", str(config), "--quiet")

    assert rerun.returncode == 0, rerun.stderr
    rows = read_jsonl(tmp_path / "out" / "distilled.jsonl")
    assert len(rows) == 120
    assert sorted(by_id(rows)) == sorted(row["id"] for row in source)
    exported = await turnstile("export", str(config), "--format", "jsonl")
    assert exported.returncode == 0, exported.stderr


async def test_a_changed_byte_inside_a_valid_record_is_caught_by_its_checksum(
    tmp_path: Path, mock: MockServer
) -> None:
    config = _setup(tmp_path, mock)
    reference = tmp_path / "reference.jsonl"
    assert (await turnstile("run", str(config), "--quiet")).returncode == 0
    shutil.copy(tmp_path / "out" / "distilled.jsonl", reference)
    expected = by_id(read_jsonl(reference))
    # Pretend the run stopped early (turns journaled, no row written), then change one
    # letter of a reply: the record is still valid JSON.
    journal, lines = _journal_lines(tmp_path)
    turns = [line for line in lines if b'"k":"t"' in line]
    target = next(i for i, line in enumerate(turns) if b'"c":"' in line)
    start = turns[target].index(b'"c":"') + 5
    byte = turns[target][start : start + 1]
    new = b"Y" if byte != b"Y" else b"Z"
    turns[target] = turns[target][:start] + new + turns[target][start + 1 :]
    orjson.loads(turns[target])  # still JSON
    journal.write_bytes(b"".join(turns))
    for path in (tmp_path / "out").iterdir():
        path.unlink()
    mock.reset()

    refused = await turnstile("run", str(config), "--quiet")
    repaired = await turnstile("repair", str(config))
    rerun = await turnstile("run", str(config), "--quiet")

    assert refused.returncode == 2 and "checksum" in refused.stderr, refused.stderr
    assert repaired.returncode == 0, repaired.stderr
    assert rerun.returncode == 0, rerun.stderr
    assert by_id(read_jsonl(tmp_path / "out" / "distilled.jsonl")) == expected
    assert mock.stats.total_requests >= 1  # the damaged turn was asked again


async def test_status_and_repair_count_the_records_failing_their_checksum(
    tmp_path: Path, mock: MockServer
) -> None:
    config = _setup(tmp_path, mock)
    assert (await turnstile("run", str(config), "--quiet")).returncode == 0
    journal, lines = _journal_lines(tmp_path)
    # A digit of a line number changed in a row's turn record: valid JSON, another row.
    at = next(i for i, line in enumerate(lines) if line.startswith(b'{"k":"t","l":3,'))
    lines[at] = lines[at].replace(b'"l":3,', b'"l":4,', 1)
    journal.write_bytes(b"".join(lines))

    status = await _run_capturing("status", str(config))
    repair = await _run_capturing("repair", str(config))

    assert status[0] == 2 and "1 damaged record, 1 failing their checksum" in status[1]
    assert "turnstile repair" in status[1]
    assert repair[0] == 0 and "1 failing their checksum" in repair[1]


async def _run_capturing(*args: str) -> tuple[int, str]:
    import asyncio

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "engine",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_a_flipped_bit_in_the_emits_index_is_a_clear_error(
    tmp_path: Path, mock: MockServer
) -> None:
    source = conversations(60, max_turns=1)
    write_jsonl(tmp_path / "in.jsonl", source)
    config = write_config(tmp_path, mock.base_url)
    done = await turnstile("run", str(config), "--quiet", "--snapshot-every-rows", "10")
    assert done.returncode == 0, done.stderr
    emits = tmp_path / "ck" / EMITS_NAME
    data = bytearray(emits.read_bytes())
    assert len(data) >= 32
    data[6] ^= 0x10  # a high bit of the first entry's line number
    emits.write_bytes(bytes(data))

    result = await turnstile("export", str(config), "--format", "jsonl")

    assert result.returncode == 2, result.stderr
    assert str(emits) in result.stderr and "damaged" in result.stderr


# -- #11: odd or unwritable output paths are refusals, not crashes -----------------------------


async def test_an_existing_folder_as_the_output_is_refused_even_with_fresh(
    tmp_path: Path, mock: MockServer
) -> None:
    config = _setup(tmp_path, mock, output="out")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")

    for flags in ((), ("--fresh",)):
        result = await turnstile("run", str(config), "--quiet", *flags)
        assert result.returncode == 2, result.stderr
        assert "is a folder" in result.stderr and str(tmp_path / "out") in result.stderr
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert mock.stats.total_requests == 0


async def test_a_read_only_output_folder_is_refused_naming_it(
    tmp_path: Path, mock: MockServer
) -> None:
    import asyncio

    config = _setup(tmp_path, mock, output="ro/out.jsonl")
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    # As root, the folder's mode binds only without the override capabilities.
    drop = (
        ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]
        if os.geteuid() == 0
        else []
    )
    if drop and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: a read-only folder is writable")
    try:
        for flags in ((), ("--fresh",)):
            proc = await asyncio.create_subprocess_exec(
                *drop,
                sys.executable,
                "-m",
                "engine",
                "run",
                str(config),
                "--quiet",
                *flags,
                stderr=asyncio.subprocess.PIPE,
            )
            _, err = await proc.communicate()
            assert proc.returncode == 2, err.decode()
            assert str(tmp_path / "ro") in err.decode() and "writable" in err.decode()
    finally:
        (tmp_path / "ro").chmod(0o755)
    assert mock.stats.total_requests == 0


# -- #13: a killed export's leftovers; two runs on one output --------------------------------


async def test_the_next_export_removes_what_a_killed_export_left(
    tmp_path: Path, mock: MockServer
) -> None:
    config = _setup(tmp_path, mock)
    assert (await turnstile("run", str(config), "--quiet")).returncode == 0
    out = tmp_path / "out"
    dead = 2**22 + 12345  # above pid_max's default: no process has it
    (out / f".distilled.parquet.tmp-{dead}").write_bytes(b"half a parquet file")
    (out / f".distilled_hf.tmp-{dead}").mkdir()
    (out / f".distilled_hf.tmp-{dead}" / "data.arrow").write_bytes(b"half")
    (out / f".distilled_hf.tmp-{dead}.arrow").write_bytes(b"half a stream")
    alive = out / f".distilled.parquet.tmp-{os.getpid()}"  # an export still running
    alive.write_bytes(b"in progress")
    (out / f".distilled.sorted.jsonl.tmp-{dead}").write_bytes(b"rows")
    (out / f".distilled.sorted.jsonl.old-{dead}").write_bytes(b"the export before")

    for fmt in ("jsonl", "parquet", "hf"):
        result = await turnstile("export", str(config), "--format", fmt)
        assert result.returncode == 0, result.stderr

    left = sorted(p.name for p in out.iterdir() if ".tmp-" in p.name or ".old-" in p.name)
    assert left == [alive.name]


async def test_two_runs_writing_one_output_are_refused(tmp_path: Path, mock: MockServer) -> None:
    config = _setup(tmp_path, mock)
    holder = lock_output(tmp_path / "out" / "distilled.jsonl", tmp_path / "other-ck")
    try:
        second = await turnstile("run", str(config), "--quiet")
    finally:
        holder.close()

    assert second.returncode == 2, second.stderr
    assert "being written by another run" in second.stderr
    assert str(tmp_path / "other-ck") in second.stderr
    assert mock.stats.total_requests == 0
    assert (await turnstile("run", str(config), "--quiet")).returncode == 0  # lock gone


def test_config_refusals_name_the_key_and_resolve_links(tmp_path: Path) -> None:
    from engine.config import load_config
    from engine.errors import ConfigError

    write_jsonl(tmp_path / "in.jsonl", SOURCE)
    (tmp_path / "alias.jsonl").symlink_to(tmp_path / "in.jsonl")
    for output, says in (
        ("alias.jsonl", "must not be the input file"),
        ("./sub/../in.jsonl", "must not be the input file"),
        ("run.yaml", "must not be the config file"),
        ("ck/x.jsonl", "inside checkpoint_dir"),
    ):
        path = tmp_path / "run.yaml"
        raw = yaml.safe_load(write_config(tmp_path, "http://127.0.0.1:9/v1").read_text())
        raw["output"] = output
        path.write_text(yaml.safe_dump(raw))
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert any(p.startswith("output: ") and says in p for p in info.value.problems), output
