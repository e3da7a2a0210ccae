"""bench.opcodes: Python per turn, counted, for this engine and another tree."""

from __future__ import annotations

from bench import opcodes
from bench.runners import ROOT


def cells(lines: list[str], first: str) -> list[str]:
    """The cells of the table row whose first cell is ``first``."""
    for line in lines:
        parts = [cell.strip() for cell in line.strip("| ").split(" | ")]
        if line.startswith("| ") and parts[0] == first:
            return parts
    raise AssertionError(f"no row {first!r} in:\n" + "\n".join(lines))


def test_opcodes_counts_a_turn_of_each_engine_and_lists_where_they_differ() -> None:
    lines = opcodes.compare([ROOT], rows=20, cap=8, cache=False, top=10)
    counted = {}
    for name in (opcodes.THIS, opcodes.OTHER):
        row = cells(lines, name)
        counted[name] = float(row[1].replace(",", ""))
        assert counted[name] > 1000 and float(row[2]) > 10  # thousands of instructions a turn
    # The same tree twice: the counts differ by no more than the writer's grouping.
    assert abs(counted[opcodes.THIS] - counted[opcodes.OTHER]) < 0.2 * counted[opcodes.THIS]
    differ = lines.index(f"Where {opcodes.THIS} and {opcodes.OTHER} differ most (per turn):")
    assert sum(1 for line in lines[differ:] if line.startswith("| ")) == 1 + 10


def test_opcodes_alone_lists_the_functions_that_run_most() -> None:
    lines = opcodes.compare([], rows=20, cap=8, cache=True, top=150)
    assert cells(lines, opcodes.THIS)
    # The protocol every reply goes through, and the cache's miss path with the cache on.
    assert float(cells(lines, "engine/tasks/base.py:ask")[1]) > 50
    assert float(cells(lines, "engine/cache/store.py:add")[1]) > 10
