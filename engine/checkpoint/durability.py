"""How durable the journal is: the ``journal:`` config section's values.

Its own module, importing nothing, so that the writer reads its policy without
importing the config (which imports the tasks, whose ``Context`` writes through
the writer).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class JournalConfig:
    """Durability of the journal.

    ``interval`` (default) fsyncs at most every ``fsync_interval_s`` seconds:
    a SIGKILL loses nothing (writes reach the OS before the next turn is
    requested); a power cut loses at most that interval. ``always`` fsyncs
    every group write; ``never`` leaves it to the OS.
    """

    fsync: str = "interval"
    fsync_interval_s: float = 1.0
