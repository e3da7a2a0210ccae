"""``python -m engine`` ends through engine.cli.entry: main's exit code, every line it
printed (stdout is block-buffered into a pipe), the atexit handlers run, and no
interpreter teardown. A command is parsed by a parser of that command alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from engine import cli
from engine.errors import EXIT_OK, EXIT_UNUSABLE
from tests.conftest import write_config


def _engine(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine", *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=cwd,
        timeout=60,
    )


def test_what_main_printed_reaches_the_pipe_and_its_code_is_the_exit_code(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, "http://127.0.0.1:9/v1")
    done = _engine("status", str(config), cwd=tmp_path)
    assert done.returncode == EXIT_OK, done.stderr
    assert "no run yet" in done.stdout
    missing = _engine("status", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert missing.returncode == EXIT_UNUSABLE
    assert "problem(s) in the config" in missing.stderr


def test_the_atexit_handlers_still_run(tmp_path: Path) -> None:
    config = write_config(tmp_path, "http://127.0.0.1:9/v1")
    script = (
        "import atexit, sys; atexit.register(lambda: print('handler ran')); "
        f"sys.argv = ['turnstile', 'status', {str(config)!r}]; "
        "from engine.cli import entry; entry()"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        timeout=60,
    )
    assert done.returncode == EXIT_OK, done.stderr
    assert done.stdout.splitlines()[-1] == "handler ran"


@pytest.mark.parametrize("command", sorted(cli._COMMANDS))
def test_a_command_parsed_by_its_own_parser_reads_as_by_the_whole_one(command: str) -> None:
    argv = [command, "c.yaml"]
    assert cli.build_parser(command).parse_args(argv) == cli.build_parser().parse_args(argv)
