"""The progress line: counts, the estimate of total turns and the rule it counts by."""

from __future__ import annotations

from engine.progress import status_line
from engine.stats import RunStats


def test_the_turn_estimate_names_the_turn_rule() -> None:
    stats = RunStats(rows_total=100, rows_done=20, turns_done=60, turn_rule="every_user")
    line = status_line(stats, elapsed=10.0)
    # 3 turns a row so far, 80 rows to go: 60 + 240.
    assert "turns 60/~300 every_user (6/s)" in line


def test_no_estimate_before_ten_rows_and_no_rule_outside_distillation() -> None:
    stats = RunStats(rows_total=100, rows_done=5, turns_done=15)
    assert "turns 15 (" in status_line(stats, elapsed=1.0)
