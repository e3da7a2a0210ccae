"""Replaying one journal file, for tests that write a journal by hand; a row written
and waited for.

The engine replays a checkpoint's segments with ``snapshot.load`` (built on
``journal.replay_segments``); a test holding one journal file replays it here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.checkpoint.journal import Replay, replay_segments
from engine.checkpoint.writer import Writer


async def output(
    writer: Writer, line: int, row: dict[str, Any], records: Sequence[dict[str, Any]] = ()
) -> None:
    """``row`` handed over (``Writer.hand_over``), then its batch waited for, as a task
    never does: the row, its ``v`` record and its emit are in the files on return."""
    batch = writer._batch
    wait = writer.hand_over(line, row, records)
    await (wait if wait is not None else writer._wait(batch))


def replay(
    path: Path,
    out_size: int,
    failed_size: int,
    filtered_size: int = 0,
    *,
    repair: bool = False,
) -> Replay:
    """The state the journal file at ``path`` gives (an empty one when there is none).

    ``out_size``, ``failed_size`` and ``filtered_size`` are the files' current
    lengths: a row the journal says was written past the end of its file (possible
    only after a power cut) is taken as not written. With ``repair`` damaged records
    are skipped and listed instead of raising.
    """
    state = Replay()
    if path.exists():
        replay_segments(state, [(0, path)], (out_size, failed_size, filtered_size), repair=repair)
    return state
