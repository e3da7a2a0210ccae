"""The short chaos run: 10^3 turns, a faulty server, ten SIGKILLs; the output must be exact.

The long version is `python -m bench.chaos` (10^4 turns), reported in bench/RESULTS.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.chaos import chaos


@pytest.mark.timeout(600)
async def test_faults_and_repeated_sigkills_end_in_the_fault_free_output(tmp_path: Path) -> None:
    report = await chaos(tmp_path, turns=1_000, kills=10, seed=7)

    assert report.lost == 0
    assert report.duplicated == 0
    assert report.mismatched == 0
    assert report.kills >= 5, report  # the kills really landed mid-run
    for fault in ("429", "500", "drop", "malformed", "hang"):
        assert report.faults.get(fault, 0) > 0, report.faults
