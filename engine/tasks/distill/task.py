"""Multi-turn distillation: the teacher writes every assistant turn, one at a time.

Each request carries the full history so far. Each reply is asked for under its
turn's key (``Turn(i)``), so the context journals it before the conversation's
next turn is requested and a resumed run never asks for it again.

With ``distill.user`` a simulator writes the user messages after the input's:
each is asked for under its own key (``user:<turn>:<attempt>``), so it too is
journaled before the teacher is asked to answer it. Which request comes next is
then ``engine.tasks.distill.simulator.Simulation``'s to say.
"""

from __future__ import annotations

from typing import Any

from engine.config import RunConfig
from engine.errors import InputError, ModelError
from engine.http.reasoning import cut_off_error
from engine.input.base import row_id
from engine.input.rows import parse_row
from engine.tasks.asking import Answer, turn_key
from engine.tasks.base import RowContext, Task
from engine.tasks.distill import KEEP, KIND
from engine.tasks.distill.dialogue import new_dialogue, output_row
from engine.tasks.distill.simulator import Simulation, Step, UserRules


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
        user = section.user
        self.user = user
        self.rules = (
            None
            if user is None
            else UserRules(user.turns, end_marker=user.end_marker, max_similar=user.max_similar)
        )
        self.user_template = None
        if user is not None and user.template:
            # Jinja2 is imported only by a run that renders a template.
            from engine.tasks.templates import compile_template

            self.user_template = compile_template(user.template)
        self.user_params = config.models[user.model].params if user is not None else {}

    async def process(self, record: dict[str, Any], ctx: RowContext) -> None:
        try:
            row = parse_row(record, ctx.line)
            dialogue = new_dialogue(
                row, self.system_prompt, self.turn_rule, keep_reasoning=self.keep_reasoning
            )
        except InputError as exc:
            await ctx.fail(row_id(record, ctx.line), f"input: {exc}")
            return
        system = ""
        if self.user is not None:
            if self.user_template is not None:
                from engine.tasks.templates import RenderError, render

                try:
                    system = render(self.user_template, record)
                except RenderError as exc:
                    await ctx.fail(row.id, f"distill.user.template: {exc}")
                    return
            else:
                system = self.user.system_prompt or ""
        # Plain distillation asks for the input's turns in order; with a simulated
        # user, the Simulation says which request comes next.
        sim = Simulation(dialogue, self.rules, system) if self.user is not None else None
        turns = len(dialogue.turns)
        replies = dialogue.replies
        replica = None  # the server of the previous turn: its cache holds this history
        user_replica = None  # the simulator's, likewise
        user_usage = [0, 0, 0]
        done, user_step = Step.DONE, Step.USER
        while True:
            if sim is None:
                turn = len(replies)
                if turn == turns:
                    break
                last = turn == turns - 1
            else:
                step = sim.next_step()
                if step is done:
                    break
                turn = sim.turn
                if step is user_step:
                    answer = await self._ask_user(ctx, sim, row.id, user_replica)
                    if answer is None:
                        return  # the row failed
                    user_replica = answer.replica
                    user_usage[0] += answer.prompt_tokens
                    user_usage[1] += answer.completion_tokens
                    user_usage[2] += answer.reasoning_tokens
                    continue
                last = sim.is_last()
            try:
                answer = await ctx.ask(
                    self.model_name,
                    dialogue.history(),
                    key=turn_key(turn),
                    prefer=replica,
                    last=last,
                )
            except ModelError as exc:
                await ctx.fail(row.id, str(exc), turn=turn)
                return
            if answer.trace is not None or self.fail_on_length:
                problem = self._cut_off(answer, turn)
                if problem is not None:
                    await ctx.fail(row.id, problem, turn=turn)
                    return
            replica = answer.replica
            dialogue.apply(answer)
        out = output_row(dialogue, self.model)
        if sim is not None:
            out["simulated_turns"] = sim.simulated
            out["end_reason"] = sim.end_reason
            out["user_usage"] = {
                "prompt_tokens": user_usage[0],
                "completion_tokens": user_usage[1],
                "reasoning_tokens": user_usage[2],
            }
        await ctx.finish(out)

    async def _ask_user(
        self, ctx: RowContext, sim: Simulation, row_id: Any, prefer: int | None
    ) -> Answer | None:
        """The simulated user's next message, taken by ``sim``; None when it failed the row."""
        assert self.user is not None
        turn = sim.turn
        try:
            answer = await ctx.ask(
                self.user.model, sim.user_request(), key=sim.user_key, prefer=prefer
            )
        except ModelError as exc:
            await ctx.fail(row_id, f"the simulated user: {exc}", turn=turn)
            return None
        if answer.cut_off:
            assert answer.trace is not None
            where = f"the simulated user's message for turn {turn}"
            error = cut_off_error(self.user.model, self.user_params, answer.trace, where)
            await ctx.fail(row_id, error, turn=turn)
            return None
        sim.apply_user(answer.text)  # the answer only: its reasoning is dropped
        return answer

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
