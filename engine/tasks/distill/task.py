"""Multi-turn distillation: the teacher writes every assistant turn, one at a time.

Each request carries the full history so far. Each reply is asked for under its
turn's key (``Turn(i)``), so the context journals it before the conversation's
next turn is requested and a resumed run never asks for it again.
"""

from __future__ import annotations

from typing import Any

from engine.config import RunConfig
from engine.errors import InputError, ModelError
from engine.http.reasoning import cut_off_error
from engine.input.base import row_id
from engine.input.rows import parse_row
from engine.tasks.asking import Answer, Turn
from engine.tasks.base import RowContext, Task
from engine.tasks.distill import KEEP, KIND
from engine.tasks.distill.dialogue import TurnReply, new_dialogue, output_row


class DistillTask(Task):
    """Rewrites every assistant turn of each conversation with the teacher model."""

    def __init__(self, config: RunConfig) -> None:
        section = KIND.section(config)
        self.model_name = section.model
        self.system_prompt = section.system_prompt
        self.turn_rule = section.turns
        self.keep_reasoning = section.reasoning_history == KEEP
        model = config.models[self.model_name]
        self.model = model.model
        self.params = model.params
        self.fail_on_length = model.fail_on_length

    async def process(self, record: dict[str, Any], ctx: RowContext) -> None:
        try:
            row = parse_row(record, ctx.line)
            dialogue = new_dialogue(
                row, self.system_prompt, self.turn_rule, keep_reasoning=self.keep_reasoning
            )
        except InputError as exc:
            await ctx.fail(row_id(record, ctx.line), f"input: {exc}")
            return
        replica = None  # the server of the previous turn: its cache holds this history
        turns = len(dialogue.turns)
        for turn in range(turns):
            try:
                answer = await ctx.ask(
                    self.model_name,
                    dialogue.history(),
                    key=Turn(turn),
                    prefer=replica,
                    last=turn == turns - 1,
                )
            except ModelError as exc:
                await ctx.fail(row.id, str(exc), turn=turn)
                return
            problem = self._cut_off(answer, turn)
            if problem is not None:
                await ctx.fail(row.id, problem, turn=turn)
                return
            replica = answer.replica
            dialogue.apply(
                TurnReply(
                    answer.text,
                    answer.prompt_tokens,
                    answer.completion_tokens,
                    answer.finish_reason,
                    answer.trace,
                    answer.reasoning_tokens,
                )
            )
        await ctx.finish(output_row(dialogue, self.model))

    def _cut_off(self, answer: Answer, turn: int) -> str | None:
        """Why a reply fails its row: cut off while reasoning (no answer), or, with
        fail_on_length, cut off by max_tokens at all."""
        if answer.cut_off:
            assert answer.trace is not None
            return cut_off_error(self.model_name, self.params, answer.trace, f"turn {turn}")
        if self.fail_on_length and answer.finish_reason == "length":
            return (
                "the reply was cut off by max_tokens (finish_reason: length); raise "
                f"models.{self.model_name}.params.max_tokens or set fail_on_length: false"
            )
        return None
