"""What an export does with reasoning traces (``--reasoning keep|inline|drop``). Pure.

A finished row keeps each trace where the run wrote it: ``reasoning_content`` on a
generated assistant message (distillation's ``messages``, preference's ``chosen``
and ``rejected``), and lists parallel to the generations (preference's
``generation_reasoning``, generate's ``reasoning``).

- ``keep`` (default): the rows as the run wrote them.
- ``inline``: each trace goes into its answer as ``<think>\\nTRACE\\n</think>\\n\\nANSWER``
  (for chat templates that do not read ``reasoning_content``); no message keeps the
  key and the parallel lists go, their traces written into the string generations.
- ``drop``: answers only; every trace is removed.
"""

from __future__ import annotations

from typing import Any, Final

from engine.http.reasoning import TRACE_KEY

KEEP: Final = "keep"
INLINE: Final = "inline"
DROP: Final = "drop"
REASONING_MODES: Final = (KEEP, INLINE, DROP)
# The columns of generated assistant messages.
_MESSAGE_COLUMNS = ("messages", "chosen", "rejected")
# Each task's list of traces parallel to its generations (the column the task owns).
PARALLEL: Final = {"generate": "reasoning", "preference": "generation_reasoning"}


def inline(trace: str, answer: str) -> str:
    """A trace written into its answer, as DeepSeek-R1's and Qwen3's templates render it."""
    return f"<think>\n{trace}\n</think>\n\n{answer}"


class Reshaper:
    """Keeps, inlines or drops the traces of one task's rows."""

    def __init__(self, mode: str, task: str) -> None:
        if mode not in REASONING_MODES:
            raise ValueError(f"reasoning must be one of {', '.join(REASONING_MODES)}, got {mode!r}")
        self.mode = mode
        self.parallel = PARALLEL.get(task)
        marks = [b'"' + TRACE_KEY.encode() + b'"']
        if self.parallel is not None:
            marks.append(b'"' + self.parallel.encode() + b'"')
        self._marks = tuple(marks)

    @property
    def active(self) -> bool:
        return self.mode != KEEP

    def touches(self, raw: bytes) -> bool:
        """Whether a row as written may hold a trace: a cheap test before parsing it."""
        return self.mode != KEEP and any(mark in raw for mark in self._marks)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        """``row`` with its traces kept, inlined or dropped (changed in place, and returned)."""
        if self.mode == KEEP:
            return row
        for column in _MESSAGE_COLUMNS:
            messages = row.get(column)
            if isinstance(messages, list):
                for message in messages:
                    if isinstance(message, dict) and TRACE_KEY in message:
                        trace = message.pop(TRACE_KEY)
                        if self.mode == INLINE and isinstance(trace, str):
                            message["content"] = inline(trace, str(message.get("content", "")))
        key = self.parallel
        traces = row.get(key) if key is not None else None
        if key is None or not isinstance(traces, list):
            return row
        generations = row.get("generations")
        if self.mode == INLINE and isinstance(generations, list):
            if not all(isinstance(g, str) or g is None for g in generations):
                return row  # parsed JSON generations: no text to write a trace into; kept
            row["generations"] = [
                inline(t, g) if isinstance(t, str) and isinstance(g, str) else g
                for g, t in zip(generations, traces, strict=False)
            ] + generations[len(traces) :]
        del row[key]
        return row
