"""bench.versus: two engine trees and the bare loop, back to back on the mock server."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import versus
from bench.runners import ROOT


def test_versus_runs_every_engine_and_the_bare_loop_and_reports_each_against_it() -> None:
    lines = versus.compare([ROOT, ROOT], latency_ms=0, cap=8, rows=60, repeats=2, uvloop=False)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines if line.startswith("| ")}
    others = (f"{versus.OTHER} 1", f"{versus.OTHER} 2")
    assert set(rows) >= {versus.THIS, *others, versus.BARE}
    assert rows[versus.BARE].endswith("| 1 | 1 |")
    for name in (versus.THIS, *others):
        cells = rows[name].strip("| ").split(" | ")
        assert cells[-2].endswith("%") and cells[-1].endswith("x")
        assert len(cells[3].split()) == 2  # CPU per request of each repeat


def test_versus_refuses_a_folder_without_an_engine(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_:
        versus.main(["--engine", str(tmp_path)])
    assert exit_.value.code == 2
