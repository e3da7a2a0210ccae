"""Templated generation: render each row's prompt, ask for its generations, all at once.

The row's ``num_generations`` requests go out together, each under the model's
cap, each journaled when it lands (``attempts``), so a resumed run asks only for
what is missing. With a JSON Schema, a reply that is not JSON or does not fit is
journaled too and asked for again, up to ``max_invalid`` times per generation;
then the row fails with the last reason. A row fails alone for its own
problems (a column the template needs, a permanent model error); a model that
is down stops the run, resumable.
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
from engine.tasks.base import Context, Records, row_usage
from engine.tasks.generate import REASONING_KEY, TRUNCATED_KEY, GenerateConfig
from engine.tasks.generate.attempts import (
    Attempt,
    attempt_record,
    attempts_from,
    first_valid,
    invalid_count,
    seed_for,
)
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


class GenerateTask:
    """Fills the template with each row and asks the writer model for its generations."""

    def __init__(self, config: RunConfig) -> None:
        self.config: GenerateConfig = config.section
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

    def rows_in_flight(self, config: RunConfig) -> int:
        # As distillation: twice the caps of every replica, so that while some rows
        # wait for the journal, others keep every slot busy.
        return max(4, 2 * config.models[self.model_name].total_concurrency)

    def optional_models(self) -> frozenset[str]:
        return frozenset()  # without its one model the run cannot go on

    async def process(
        self, line: int, record: dict[str, Any], records: Records, ctx: Context
    ) -> None:
        row_id = input_base.row_id(record, line)
        try:
            text = render(self.template, record)
        except RenderError as exc:
            await ctx.fail(line, row_id, f"input: {exc}")
            return
        if not text.strip():
            await ctx.fail(line, row_id, "input: the template rendered empty text for this row")
            return
        prompt: list[Message] = []
        if self.config.system_prompt:
            prompt.append({"role": "system", "content": self.config.system_prompt})
        prompt.append({"role": "user", "content": text})

        state = self._replay(records, ctx)
        slots = range(self.config.num_generations)
        missing = [s for s in slots if s not in state.values]
        if missing and state.failure is None:
            async with anyio.create_task_group() as group:
                for slot in missing:
                    group.start_soon(self._generate, ctx, line, prompt, slot, state, group)
        if state.failure is not None:
            slot, error = state.failure
            await ctx.fail(line, row_id, f"generation {slot}: {error}", generation=slot)
            return
        if ctx.stopping or len(state.values) < len(slots):
            return  # stopping: the row is resumed from its journaled replies
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
        await ctx.finish(line, row)

    def _replay(self, records: Records, ctx: Context) -> RowState:
        """The row's state from its journaled replies: done generations, and a failure
        already reached (no reply is asked for again either way)."""
        state = RowState(attempts=attempts_from(records, self.config.num_generations))
        for attempts in state.attempts.values():
            ctx.stats.turns_resumed += len(attempts)
            for attempt in attempts:
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
        ctx: Context,
        line: int,
        prompt: list[Message],
        slot: int,
        state: RowState,
        group: TaskGroup,
    ) -> None:
        """Ask for one generation until a reply is valid or the row fails."""
        client = ctx.clients[self.model_name]
        attempts = state.attempts.setdefault(slot, [])
        while slot not in state.values and state.failure is None:
            if ctx.stopping:
                return
            number = len(attempts)
            extra = dict(self.extra)
            seed = seed_for(self.seed, slot, number, self.config.num_generations)
            if seed is not None:
                extra["seed"] = seed
            try:
                completion = await client.complete(prompt, extra or None)
            except ModelError as exc:
                if exc.model_down:
                    # Not this row's fault: stop the run, resumable, and leave the
                    # row to be tried again.
                    raise exc.stopped() from exc
                state.failure = (slot, str(exc))
                group.cancel_scope.cancel()  # the row fails: its other requests are moot
                return
            # The answer only: a trace is never validated against the schema.
            value, error = self._parse(completion.texts[0])
            attempt = Attempt(
                slot=slot,
                number=number,
                content=completion.texts[0],
                prompt_tokens=completion.prompt_tokens,
                completion_tokens=completion.completion_tokens,
                finish_reason=completion.finish_reasons[0],
                error=error,
                trace=completion.trace(),
                reasoning_tokens=completion.reasoning_tokens,
            )
            ctx.stats.turns_done += 1
            await ctx.writer.record(attempt_record(line, attempt))
            attempts.append(attempt)
            self._settle(state, attempt, value)
            if state.failure is not None:
                group.cancel_scope.cancel()
