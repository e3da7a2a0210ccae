"""Rows that reached the output though their emit did not reach the journal.

A row's group write journals its ``v`` record (where the row goes, and the row's last
replies, which the row alone holds), writes the row, then journals its emit. A kill
between the last two leaves the row whole in the output and no emit for it. Its
replies are in nowhere else, so cutting the row off, as for any row the journal does
not vouch for, would ask for them again. Instead the replay's rows in that state are
checked against the output's bytes: from the vouched end on, each row in turn whose
``v`` record starts where the last one ended and whose bytes are there, one whole
JSON object and its newline, is taken as written. The first that is not (torn, cut,
never written) ends it: that row and those after it are cut off and made again.
"""

from __future__ import annotations

from pathlib import Path

import orjson

from engine.checkpoint.journal import EMIT_OUTPUT, Replay, apply, emit_record


def adopt(state: Replay, output: Path) -> None:
    """Take the rows ``state.writing`` names as written where the output holds them whole:
    each done, the output vouched for up to its end, its emit in ``state.adopted`` for
    the run's writer to journal. ``state.writing`` is empty after. Blocking."""
    writing = sorted((start, end, line) for line, (start, end) in state.writing.items())
    state.writing.clear()
    if not writing:
        return
    try:
        f = output.open("rb")
    except FileNotFoundError:
        return
    with f:
        at = state.out_end
        for start, end, line in writing:
            if start < at:
                continue  # below the vouched end: another row's bytes
            if start > at or line in state.done:
                return
            f.seek(start)
            if not _whole_row(f.read(end - start), end - start):
                return
            apply(state, emit_record(EMIT_OUTPUT, line, end))  # as its journaled emit will be
            state.adopted.append((line, end))
            at = end


def _whole_row(data: bytes, size: int) -> bool:
    if len(data) != size or data[-1:] != b"\n":
        return False
    try:
        return isinstance(orjson.loads(data), dict)
    except orjson.JSONDecodeError:
        return False
