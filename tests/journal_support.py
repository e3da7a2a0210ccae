"""Replaying one journal file, for tests that write a journal by hand.

The engine replays a checkpoint's segments with ``snapshot.load`` (built on
``journal.replay_segments``); a test holding one journal file replays it here.
"""

from __future__ import annotations

from pathlib import Path

from engine.checkpoint.journal import Replay, replay_segments


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
