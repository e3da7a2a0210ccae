"""bench/: the report is numbered by the run, its header says what produced it, and the
full plan fits the time it is meant to (arithmetic on the plan; nothing is measured)."""

from __future__ import annotations

import datetime as dt
import signal
from pathlib import Path

import pytest

from bench import __main__ as bench_main
from bench import report
from bench.plan import BIG_ROWS, FULL, QUICK, estimate_s, with_big
from bench.report import Section, Target


def test_unnumbered_drops_a_leading_section_number() -> None:
    assert report.unnumbered("9. Fast at every concurrency") == "Fast at every concurrency"
    assert report.unnumbered("16.1 steady requests/s") == "steady requests/s"
    assert report.unnumbered("10. memory (this run): peak RSS") == "memory (this run): peak RSS"
    assert report.unnumbered("Judging: pairwise") == "Judging: pairwise"
    assert report.unnumbered("2 x cap in flight") == "2 x cap in flight"


def test_render_numbers_sections_in_run_order_and_lists_every_target() -> None:
    sections = [
        Section("caps", "9. Caps", ["caps text"], [Target("9.1 rate", ">= 90%", "95%", True)]),
        Section("judging", "Judging", ["judging text"], [Target("cost", "2", "3", False)]),
    ]
    text = report.render(sections, ["HEAD"], ["", "## How it was measured"])
    assert "## 1. Caps" in text and "## 2. Judging" in text
    assert "| 1 | rate | >= 90% | 95% | met |" in text
    assert "| 2 | cost | 2 | 3 | **not met** |" in text
    assert "1 met, 1 not met, 0 reported without a target" in text
    assert text.index("HEAD") < text.index("## Targets") < text.index("## 1. Caps")


def test_every_suite_name_has_an_estimate_and_the_full_run_fits() -> None:
    for name in bench_main.NAMES:
        assert estimate_s(FULL, name) > 0 and estimate_s(QUICK, name) > 0
    full = sum(estimate_s(FULL, suite.names[0]) for suite in bench_main.SUITES)
    assert full <= 39 * 60, f"the full plan is estimated at {full / 60:.1f} min"
    # The 10^7-row memory/resume run is opt-in, and memory and resume are measured once.
    assert BIG_ROWS not in FULL.memory_rows and not FULL.caps_memory_rows
    assert BIG_ROWS in with_big(FULL).resume_rows


def test_header_lists_what_was_left_out_with_its_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    run = bench_main.Run(
        plan=QUICK,
        command="python -m bench --quick --only report",
        chosen={"report"},
        started=dt.datetime.now(dt.UTC),
        git={"commit": "abc1234", "tree": "clean", "digest": ""},
        big=False,
    )
    run.took["report"] = 1.0
    run.first_section["report"] = 1
    monkeypatch.setattr(report, "machine", lambda: {"cpus": "2"})
    head = "\n".join(bench_main._head(run))
    assert "`abc1234`" in head and "| `report` | bench/report_write.py | 1 |" in head
    assert "--only caps --out bench/_work/caps.md" in head
    assert "--only memory,resume --out" in head


def test_a_failing_suite_is_reported_and_the_others_kept(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def boom(plan: object, chosen: object) -> list[Section]:
        raise RuntimeError("mock server did not start")

    def fine(plan: object, chosen: object) -> list[Section]:
        return [Section("fine", "3. Fine", ["what and how"], [Target("3. x", "y", "z", True)])]

    suites = (
        bench_main.Suite(("boom",), "boom", run=boom),
        bench_main.Suite(("fine",), "fine", run=fine),
    )
    monkeypatch.setattr(bench_main, "SUITES", suites)
    monkeypatch.setattr(bench_main, "NAMES", ("boom", "fine"))
    monkeypatch.setattr(bench_main, "WORK", tmp_path)
    monkeypatch.setattr(bench_main, "estimate_s", lambda plan, name: 1.0)
    monkeypatch.setattr(report, "machine", lambda: {"cpus": "2"})
    monkeypatch.setattr(signal, "signal", lambda *_: None)  # pytest keeps its own
    out = tmp_path / "RESULTS.md"
    assert bench_main.main(["--quick", "--only", "boom,fine", "--out", str(out)]) == 0
    text = out.read_text()
    assert "## 1. boom: failed" in text and "RuntimeError: mock server did not start" in text
    assert "## 2. Fine" in text and "| 2 | x | y | z | met |" in text
    assert "complete, 1 suite(s) failed" in text
    assert "*Suite `fine` (bench/fine.py)" in text
