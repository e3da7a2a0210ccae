"""Templated generation: render each row's prompt, ask for its generations, all at once.

The row's ``num_generations`` requests go out together, each under the model's
cap, each asked for under its key (``Try(slot, number)``), so the context journals
it when it lands and a resumed run asks only for what is missing. With a JSON
Schema, a reply that is not JSON or does not fit is journaled too and asked for
again, up to ``max_invalid`` times per generation; then the row fails with the
last reason. A row fails alone for its own problems (a column the template
needs, a permanent model error); a model that is down stops the run, resumable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskGroup

from engine.config import RunConfig
from engine.errors import ModelError
from engine.http.reasoning import cut_off_error
from engine.input import base as input_base
from engine.input.rows import Message
from engine.tasks.asking import Answer, Try
from engine.tasks.base import RowContext, Task, row_usage
from engine.tasks.generate import KIND, REASONING_KEY, TRUNCATED_KEY
from engine.tasks.generate.attempts import Attempt, first_valid, invalid_count, seed_for
from engine.tasks.structured import ReplyChecker, response_format
from engine.tasks.templates import RenderError, compile_template, render

# Keys the row writes itself: an input column of one of these names is dropped, so the
# row's own value wins (and filters.truncated never obeys an input column).
OWN_KEYS = frozenset(
    {"id", "prompt", "generations", REASONING_KEY, "model", "usage", TRUNCATED_KEY}
)


@dataclass(slots=True)
class RowState:
    """A row's replies so far (from the journal and this run) and, once known, why it fails."""

    attempts: dict[int, list[Attempt]] = field(default_factory=dict)
    values: dict[int, Any] = field(default_factory=dict)  # slot -> the generation
    failure: tuple[int, str] | None = None  # (slot, error): the row fails


def output_row(
    record: dict[str, Any],
    row_id: Any,
    prompt: list[Message],
    generations: list[Any],
    model: str,
    usage: dict[str, int],
    truncated: list[int],
    reasoning: list[str | None] | None = None,
) -> dict[str, Any]:
    """The input's other fields, then the row's own keys (see OWN_KEYS) in a fixed order.

    ``reasoning`` (each generation's trace, None where it had none) is written after
    ``generations`` when any generation had a trace.
    """
    row = {key: value for key, value in record.items() if key not in OWN_KEYS}
    row.update(id=row_id, prompt=prompt, generations=generations)
    if reasoning is not None and any(trace is not None for trace in reasoning):
        row[REASONING_KEY] = reasoning
    row.update(model=model, usage=usage)
    if truncated:
        row[TRUNCATED_KEY] = truncated
    return row


class GenerateTask(Task):
    """Fills the template with each row and asks the writer model for its generations."""

    def __init__(self, config: RunConfig) -> None:
        self.config = KIND.section(config)
        self.model_name = self.config.model
        model = config.models[self.model_name]
        self.served = model.model
        self.seed = model.params.get("seed")
        self.params = model.params
        self.fail_on_length = model.fail_on_length
        self.template = compile_template(self.config.template)
        schema = self.config.json_schema
        self.checker = ReplyChecker(schema, "generate.json_schema") if schema is not None else None
        self.extra: dict[str, Any] = (
            {"response_format": response_format(schema, "generate")} if schema is not None else {}
        )

    async def process(self, record: dict[str, Any], ctx: RowContext) -> None:
        row_id = input_base.row_id(record, ctx.line)
        try:
            text = render(self.template, record)
        except RenderError as exc:
            await ctx.fail(row_id, f"input: {exc}")
            return
        if not text.strip():
            await ctx.fail(row_id, "input: the template rendered empty text for this row")
            return
        prompt: list[Message] = []
        if self.config.system_prompt:
            prompt.append({"role": "system", "content": self.config.system_prompt})
        prompt.append({"role": "user", "content": text})

        state = self._replay(ctx)
        slots = range(self.config.num_generations)
        missing = [s for s in slots if s not in state.values]
        if missing and state.failure is None:
            async with anyio.create_task_group() as group:
                for slot in missing:
                    group.start_soon(self._generate, ctx, prompt, slot, state, group)
        if state.failure is not None:
            slot, error = state.failure
            await ctx.fail(row_id, f"generation {slot}: {error}", generation=slot)
            return
        kept = [first_valid(state.attempts[s]) for s in slots]
        truncated = [s for s, a in enumerate(kept) if a is not None and a.finish_reason == "length"]
        usage = row_usage(
            (a.prompt_tokens, a.completion_tokens, a.reasoning_tokens)
            for s in slots
            for a in state.attempts[s]
        )
        generations = [state.values[s] for s in slots]
        traces = [a.trace if a is not None else None for a in kept]
        row = output_row(record, row_id, prompt, generations, self.served, usage, truncated, traces)
        await ctx.finish(row)

    def _replay(self, ctx: RowContext) -> RowState:
        """The row's state from its journaled replies: done generations, and a failure
        already reached (no reply is asked for again either way)."""
        state = RowState()
        for slot in range(self.config.num_generations):
            attempts = state.attempts[slot] = []
            while (answer := ctx.replayed(Try(slot, len(attempts)))) is not None:
                attempt = _attempt(slot, len(attempts), answer)
                attempts.append(attempt)
                # Journaled as valid, so it parses again (the schema is in the fingerprint).
                value = self._parse(attempt.content)[0] if attempt.valid else None
                self._settle(state, attempt, value)
        return state

    def _parse(self, text: str) -> tuple[Any, str | None]:
        """The generation a reply makes, or why the reply is invalid."""
        if self.checker is None:
            return text, None
        return self.checker.check(text)

    def _settle(self, state: RowState, attempt: Attempt, value: Any) -> None:
        """Take one reply into the row's state: a generation, a failure, or one more try."""
        slot = attempt.slot
        if slot in state.values or state.failure is not None:
            return
        if attempt.cut_off:
            assert attempt.trace is not None
            where = f"reply {attempt.number}"
            state.failure = (
                slot,
                cut_off_error(self.model_name, self.params, attempt.trace, where),
            )
            return
        if self.fail_on_length and attempt.finish_reason == "length":
            state.failure = (
                slot,
                "the reply was cut off by max_tokens (finish_reason: length); raise "
                f"models.{self.model_name}.params.max_tokens or set fail_on_length: false",
            )
            return
        if attempt.valid:
            state.values[slot] = value
            return
        # Replay settles a slot's replies one by one: count those up to this one.
        tries = invalid_count(a for a in state.attempts[slot] if a.number <= attempt.number)
        if tries > self.config.max_invalid:
            state.failure = (
                slot,
                f"{tries} invalid replies (max_invalid: {self.config.max_invalid}); "
                f"the last: {attempt.error}",
            )

    async def _generate(
        self,
        ctx: RowContext,
        prompt: list[Message],
        slot: int,
        state: RowState,
        group: TaskGroup,
    ) -> None:
        """Ask for one generation until a reply is valid or the row fails."""
        attempts = state.attempts[slot]
        while slot not in state.values and state.failure is None:
            number = len(attempts)
            extra = dict(self.extra)
            seed = seed_for(self.seed, slot, number, self.config.num_generations)
            if seed is not None:
                extra["seed"] = seed
            try:
                # The answer only: a trace is never validated against the schema.
                answer = await ctx.ask(
                    self.model_name,
                    prompt,
                    key=Try(slot, number),
                    extra=extra or None,
                    check=self._problem,
                )
            except ModelError as exc:
                state.failure = (slot, str(exc))
                group.cancel_scope.cancel()  # the row fails: its other requests are moot
                return
            attempt = _attempt(slot, number, answer)
            attempts.append(attempt)
            value = self._parse(attempt.content)[0] if attempt.valid else None
            self._settle(state, attempt, value)
            if state.failure is not None:
                group.cancel_scope.cancel()

    def _problem(self, text: str) -> str | None:
        return self._parse(text)[1]


def _attempt(slot: int, number: int, answer: Answer) -> Attempt:
    return Attempt(
        slot=slot,
        number=number,
        content=answer.text,
        prompt_tokens=answer.prompt_tokens,
        completion_tokens=answer.completion_tokens,
        finish_reason=answer.finish_reason,
        error=answer.error,
        trace=answer.trace,
        reasoning_tokens=answer.reasoning_tokens,
    )
