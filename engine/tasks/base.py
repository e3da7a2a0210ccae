"""The seam every task plugs into: what a task is, what it sees, and what it shares.

A task is two objects. Its *kind* (a ``TaskKind``, one per ``task:`` name) owns
everything decided before a run: its config section and the parsing of it, what
of it goes into the checkpoint's fingerprint, which models it uses, what the
dataset card says, and the view the quality filters get of a finished row. Its
*runner* (a ``Task``, built by the kind for one run) moves one input row at a
time: it gets the raw input record, parses it its own way, journals its own
records (replayed to it on resume) and writes the finished row.

A new task is one subpackage of ``engine.tasks`` exporting ``KIND``; nothing
else changes (the registry finds it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from engine.output.filters import FilterConfig, Reply, check_row, filtered_record, rule_of

if TYPE_CHECKING:
    from engine.config import ModelConfig, RunConfig
    from engine.http.endpoint import ModelEndpoint
    from engine.problems import Problems
    from engine.stats import RunStats

Records = Sequence[dict[str, Any]]


class RowWriter(Protocol):
    """What a task writes through: the run's single writer (engine.checkpoint.writer).

    Each call returns once what it wrote is in the OS (safe from a SIGKILL).
    """

    async def record(self, record: dict[str, Any]) -> None:
        """Journal one record (replayed to the row's task on resume)."""
        ...

    async def output(self, line: int, row: dict[str, Any], records: Records = ()) -> None:
        """Write a finished row to the output, journaling ``records`` before it."""
        ...

    async def filtered(self, line: int, row: dict[str, Any], records: Records = ()) -> None:
        """Write a row the quality filters left out to the filtered file."""
        ...

    async def failed(self, line: int, row: dict[str, Any]) -> None:
        """Write a row's failure to the failed file."""
        ...


class Task(Protocol):
    """One run's worker for a task: what happens to each input row."""

    def rows_in_flight(self, config: RunConfig) -> int:
        """How many rows to work on at once by default."""
        ...

    def optional_models(self) -> frozenset[str]:
        """Models the task can go on without (a row records their failure)."""
        ...

    async def process(
        self, line: int, record: dict[str, Any], records: Records, ctx: Context
    ) -> None:
        """Move one row to its end (or until ctx.stopping), journaling as it goes.

        ``record`` is the input row as read (columns mapped); ``records`` are this
        row's journal records from earlier runs.
        """
        ...


class TaskKind(ABC):
    """A task as the config, the checkpoint, the filters and the dataset card see it."""

    name: ClassVar[str]
    tags: ClassVar[tuple[str, ...]] = ()  # the dataset card's tags
    # Row keys `input_columns:` may map a column onto (besides `id`).
    column_keys: ClassVar[tuple[str, ...]] = ()
    pairs: ClassVar[bool] = False  # rows may carry chosen/rejected pairs (--pairs-only)

    @abstractmethod
    def parse_section(
        self, raw: Any, models: Mapping[str, ModelConfig], p: Problems, base: Path
    ) -> Any | None:
        """The task's config section (``raw`` is None when absent); problems go to ``p``."""

    @abstractmethod
    def section_fields(self, section: Any) -> dict[str, Any]:
        """The section as plain values: the fingerprint's and the card's."""

    @abstractmethod
    def models_used(self, section: Any) -> set[str]: ...

    @abstractmethod
    def build(self, config: RunConfig) -> Task:
        """The runner for one run of ``config``."""

    @abstractmethod
    def card_text(self, config: RunConfig) -> str:
        """What made the data, in a sentence or two, for the dataset card."""

    def card_usage(self, config: RunConfig, *, pairs_only: bool) -> str:
        """How to use the exported dataset's columns (the card's "Columns" section)."""
        return "Rows are in input order."

    @abstractmethod
    def replies(self, row: Mapping[str, Any]) -> Iterator[Reply]:
        """The replies a finished row offers for training: what the filters check."""

    def row_problem(self, row: Mapping[str, Any], cfg: FilterConfig) -> str | None:
        """A filter rule that looks at the row as a whole, beyond its replies."""
        return None

    def is_paired(self, row: Mapping[str, Any]) -> bool:
        return False

    def describe(self, section: Any) -> str | None:
        """A line for ``turnstile status`` (how the task counts its turns), if it has one."""
        return None

    def progress_note(self, section: Any) -> str | None:
        """A word after the progress display's turn count (what the estimate counts by)."""
        return None

    def resume_problem(self, recorded: Mapping[str, Any] | None, config: RunConfig) -> str | None:
        """Why a checkpoint made with section ``recorded`` must not be resumed, if it must not."""
        return None


@dataclass(slots=True)
class Context:
    """What a task sees while it processes rows."""

    config: RunConfig
    kind: TaskKind
    writer: RowWriter
    clients: dict[str, ModelEndpoint]
    stats: RunStats
    stopping: bool = False
    _filtering: bool = field(init=False, repr=False)  # any filter rule on: asked once, not per row

    def __post_init__(self) -> None:
        self._filtering = self.config.filters.active

    async def finish(self, line: int, row: dict[str, Any], records: Records = ()) -> None:
        """Write a finished row: to the output, or to the filtered file when a rule fires.

        ``records`` are journaled with it (in the same group write, before it).
        """
        reason = check_row(row, self.kind, self.config.filters) if self._filtering else None
        if reason is None:
            await self.writer.output(line, row, records)
        else:
            await self.writer.filtered(line, filtered_record(row, reason), records)
            self.stats.rows_filtered += 1
            rule = rule_of(reason)
            self.stats.filtered_by_rule[rule] = self.stats.filtered_by_rule.get(rule, 0) + 1
        self.stats.rows_done += 1

    async def fail(
        self, line: int, row_id: Any, error: str, *, turn: int | None = None, **extra: Any
    ) -> None:
        """The one way a row fails for good: a line in the failed file, counted."""
        await self.writer.failed(
            line, {"id": row_id, "line": line, "turn": turn, "error": error, **extra}
        )
        self.stats.rows_done += 1
        self.stats.rows_failed += 1


def usage_of(counts: Iterable[tuple[int, int]]) -> dict[str, int]:
    """Token usage: ``(prompt, completion)`` token counts summed."""
    prompt = completion = 0
    for p, c in counts:
        prompt += p
        completion += c
    return {"prompt_tokens": prompt, "completion_tokens": completion}


def row_usage(counts: Iterable[tuple[int, int, int]]) -> dict[str, int]:
    """A row's ``usage``: its ``(prompt, completion, reasoning)`` token counts summed
    (reasoning tokens are part of completion tokens, 0 where a server does not say)."""
    prompt = completion = reasoning = 0
    for p, c, r in counts:
        prompt += p
        completion += c
        reasoning += r
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "reasoning_tokens": reasoning,
    }
