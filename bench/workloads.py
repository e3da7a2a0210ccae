"""Benchmark inputs: single-turn prompts and multi-turn conversations, written as JSONL.

Deterministic (a seeded generator), streamed to disk row by row so that 10^6 rows
never sit in memory, and cached by name and size under ``bench/_work/inputs``.
Prompts are 20-40 words of plain text, so request and reply bodies have a realistic
shape (a few hundred bytes) without making JSON the whole story.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import orjson

SINGLE = "single"
MULTI = "multi"
MAX_TURNS = 6

_WORDS = (
    "explain describe compare summarise list outline why how what when which the a an of to in "
    "for with on by from about into over under between model data training loss gradient token "
    "prompt reply history dialogue turn server request latency cache journal checkpoint resume "
    "memory disk queue worker limit batch stream python async network socket error retry result"
).split()


@dataclass(frozen=True, slots=True)
class Workload:
    """One input file and what it asks for."""

    kind: str  # SINGLE or MULTI
    path: Path
    rows: int
    turns: int

    @property
    def label(self) -> str:
        return f"{self.kind}-turn, {self.rows:,} rows, {self.turns:,} turns"


def turns_of_row(kind: str, i: int) -> int:
    """Multi-turn rows cycle through 1..6 user turns (3.5 on average)."""
    return 1 if kind == SINGLE else 1 + i % MAX_TURNS


def _sentence(rng: random.Random, i: int, turn: int) -> str:
    words = rng.choices(_WORDS, k=rng.randint(20, 40))
    return f"Question {i}.{turn}: " + " ".join(words) + "?"


def make(kind: str, rows: int, folder: Path) -> Workload:
    """The workload ``kind`` with ``rows`` rows, written once and reused afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{kind}-{rows}.jsonl"
    turns = sum(turns_of_row(kind, i) for i in range(rows))
    if path.exists():
        return Workload(kind, path, rows, turns)
    rng = random.Random(f"{kind}-{rows}")
    partial = path.with_suffix(".part")
    with partial.open("wb", buffering=1 << 20) as f:
        for i in range(rows):
            f.write(orjson.dumps(_row(kind, i, rng)))
            f.write(b"\n")
    partial.replace(path)
    return Workload(kind, path, rows, turns)


def _row(kind: str, i: int, rng: random.Random) -> dict[str, object]:
    if kind == SINGLE:
        return {"id": f"p{i}", "prompt": _sentence(rng, i, 0)}
    messages: list[dict[str, str]] = []
    for turn in range(turns_of_row(kind, i)):
        messages.append({"role": "user", "content": _sentence(rng, i, turn)})
        messages.append({"role": "assistant", "content": "an old answer, to be rewritten"})
    return {"id": f"c{i}", "messages": messages, "source": "bench"}


def rows_for_turns(kind: str, turns: int) -> int:
    """How many rows make about ``turns`` turns."""
    if kind == SINGLE:
        return max(1, turns)
    return max(MAX_TURNS, round(turns / ((MAX_TURNS + 1) / 2)))
