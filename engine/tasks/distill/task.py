"""Multi-turn distillation: the teacher writes every assistant turn, one at a time.

Each request carries the full history so far. Each reply is journaled before the
conversation's next turn is requested, so a resumed run never asks for it again.
"""

from __future__ import annotations

from typing import Any

from engine.config import RunConfig
from engine.errors import InputError, ModelError
from engine.http.reasoning import cut_off_error
from engine.input.base import row_id
from engine.input.rows import InputRow, parse_row
from engine.tasks.base import Context, Records
from engine.tasks.distill import KEEP, DistillConfig
from engine.tasks.distill.dialogue import TurnReply, new_dialogue, output_row

TURN = "t"


def turn_record(line: int, turn: int, reply: TurnReply) -> dict[str, Any]:
    """A reply as journaled: its trace (``r``) and reasoning tokens (``n``) when it has any."""
    record: dict[str, Any] = {
        "k": TURN,
        "l": line,
        "i": turn,
        "c": reply.content,
        "p": reply.prompt_tokens,
        "o": reply.completion_tokens,
        "f": reply.finish_reason,
    }
    if reply.trace is not None:
        record["r"] = reply.trace
    if reply.reasoning_tokens:
        record["n"] = reply.reasoning_tokens
    return record


def replies_from(records: Records) -> list[TurnReply]:
    """The journaled replies of one conversation, in turn order (duplicates ignored)."""
    by_turn: dict[int, TurnReply] = {}
    for record in records:
        if record.get("k") == TURN and isinstance(record.get("i"), int):
            trace = record.get("r")
            by_turn.setdefault(
                record["i"],
                TurnReply(
                    content=str(record.get("c", "")),
                    prompt_tokens=int(record.get("p") or 0),
                    completion_tokens=int(record.get("o") or 0),
                    finish_reason=record.get("f"),
                    trace=trace if isinstance(trace, str) else None,
                    reasoning_tokens=int(record.get("n") or 0),
                ),
            )
    replies: list[TurnReply] = []
    while len(replies) in by_turn:
        replies.append(by_turn[len(replies)])
    return replies


class DistillTask:
    """Rewrites every assistant turn of each conversation with the teacher model."""

    def __init__(self, config: RunConfig) -> None:
        section: DistillConfig = config.section
        self.model_name = section.model
        self.system_prompt = section.system_prompt
        self.turn_rule = section.turns
        self.keep_reasoning = section.reasoning_history == KEEP
        model = config.models[self.model_name]
        self.model = model.model
        self.params = model.params
        self.fail_on_length = model.fail_on_length

    def rows_in_flight(self, config: RunConfig) -> int:
        # Twice the caps of every replica: while some conversations wait for the
        # journal, others keep every slot busy.
        return max(4, 2 * config.models[self.model_name].total_concurrency)

    def optional_models(self) -> frozenset[str]:
        return frozenset()  # without its teacher the run cannot go on

    async def process(
        self, line: int, record: dict[str, Any], records: Records, ctx: Context
    ) -> None:
        try:
            row = parse_row(record, line)
            dialogue = new_dialogue(
                row, self.system_prompt, self.turn_rule, keep_reasoning=self.keep_reasoning
            )
        except InputError as exc:
            await ctx.fail(line, row_id(record, line), f"input: {exc}")
            return
        if records:  # a resumed conversation: its journaled replies first
            for reply in replies_from(records)[: len(dialogue.turns)]:
                if await self._cut_off(ctx, row, dialogue.next_turn, reply):
                    return
                dialogue.apply(reply)
                ctx.stats.turns_resumed += 1
        client = ctx.clients[self.model_name]
        stats = ctx.stats
        last = len(dialogue.turns) - 1
        turn = dialogue.next_turn
        replica = None  # the server of the previous turn: its cache holds this history
        while turn <= last:
            if ctx.stopping:
                return
            try:
                completion = await client.complete(dialogue.history(), prefer=replica)
            except ModelError as exc:
                if exc.model_down:
                    # Not this conversation's fault: stop the run, resumable, and
                    # leave the row to be tried again.
                    raise exc.stopped() from exc
                await ctx.fail(line, row.id, str(exc), turn=turn)
                return
            replica = completion.replica
            reply = TurnReply(
                completion.texts[0],
                completion.prompt_tokens,
                completion.completion_tokens,
                completion.finish_reasons[0],
                completion.trace(),
                completion.reasoning_tokens,
            )
            stats.turns_done += 1
            entry = turn_record(row.line, turn, reply)
            cut = self._is_cut_off(reply)
            if turn == last and not cut:
                # The last turn is journaled in the same group write as its row.
                dialogue.apply(reply)
                await ctx.finish(row.line, output_row(dialogue, self.model), (entry,))
                return
            await ctx.writer.record(entry)
            if cut and await self._cut_off(ctx, row, turn, reply):
                return
            dialogue.apply(reply)
            turn += 1
        await ctx.finish(row.line, output_row(dialogue, self.model))

    def _is_cut_off(self, reply: TurnReply) -> bool:
        return reply.cut_off or (self.fail_on_length and reply.finish_reason == "length")

    async def _cut_off(self, ctx: Context, row: InputRow, turn: int, reply: TurnReply) -> bool:
        """A reply cut off while reasoning (no answer) fails its row, and with
        fail_on_length so does any reply cut off by max_tokens."""
        if not self._is_cut_off(reply):
            return False
        if reply.cut_off:
            assert reply.trace is not None
            error = cut_off_error(self.model_name, self.params, reply.trace, f"turn {turn}")
        else:
            error = (
                "the reply was cut off by max_tokens (finish_reason: length); raise "
                f"models.{self.model_name}.params.max_tokens or set fail_on_length: false"
            )
        await ctx.fail(row.line, row.id, error, turn=turn)
        return True
