"""A crash (a bug, not a failed row) exits 70 with a crash log, and the run resumes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine import cli
from engine.crash import crash_report
from engine.tasks.distill.task import DistillTask
from engine.testing.mock_server import MockServer
from tests.conftest import by_id, conversations, read_jsonl, write_config, write_jsonl

KEY = "sk-test-secret-0123456789"


def test_crash_report_has_one_summary_line_and_the_traceback() -> None:
    try:
        raise ValueError(f"bad value\nwith {KEY} on a second line")
    except ValueError as exc:
        summary, text = crash_report(exc, [KEY])
    assert summary == "ValueError: bad value"
    assert "Traceback (most recent call last)" in text
    assert KEY not in text and "***" in text


def run_cli(*args: str) -> int:
    return cli.main(list(args))


def test_a_crash_exits_70_with_a_crash_log_and_the_rerun_is_exact(
    tmp_path: Path,
    threaded_mock: MockServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    mock = threaded_mock
    monkeypatch.setenv("TEACHER_KEY", KEY)
    source = conversations(30)
    write_jsonl(tmp_path / "in.jsonl", source)
    config = write_config(tmp_path, mock.base_url, cap=2)
    text = config.read_text().replace("model: mock", "model: mock\n    api_key_env: TEACHER_KEY")
    config.write_text(text)
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    write_jsonl(reference_dir / "in.jsonl", source)
    reference_config = write_config(reference_dir, mock.base_url)
    assert run_cli("run", str(reference_config), "--quiet") == 0
    expected = by_id(read_jsonl(reference_dir / "out" / "distilled.jsonl"))
    capsys.readouterr()

    real_process = DistillTask.process
    seen = 0

    async def buggy(self: DistillTask, record: Any, ctx: Any) -> None:
        nonlocal seen
        seen += 1
        if seen == 10:
            raise ZeroDivisionError(f"a bug that mentions the key {KEY}")
        await real_process(self, record, ctx)

    monkeypatch.setattr(DistillTask, "process", buggy)
    code = run_cli("run", str(config), "--quiet")

    assert code == cli.EXIT_CRASHED == 70
    err = capsys.readouterr().err
    [line] = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert "Turnstile crashed: ZeroDivisionError" in line
    assert str(tmp_path / "ck" / "crash.log") in line
    log = (tmp_path / "ck" / "crash.log").read_text()
    assert "Traceback" in log and "ZeroDivisionError" in log and "in buggy" in log
    assert KEY not in log and KEY not in err

    monkeypatch.setattr(DistillTask, "process", real_process)
    assert run_cli("run", str(config), "--quiet") == 0
    assert by_id(read_jsonl(tmp_path / "out" / "distilled.jsonl")) == expected
    assert KEY not in (tmp_path / "ck" / "journal.jsonl").read_text()
