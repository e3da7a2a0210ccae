"""Preference data from a pool of models: generate, judge, pair.

Each prompt goes to every generator ``num_generations`` times, all at once, each
request under its own model's cap. When all of a row's generations are in, one
judge request rates them together (UltraFeedback's template or the config's
own, read as text blocks or JSON) and the row gets its chosen/rejected pair. A
row may bring generations of its own (``generations``, ``generation_models``):
they come first and are judged with the rest. Every generation and judge reply
is journaled before it is used, so a resumed run re-requests none of them (the
brought generations are read from the input again). A generator that fails is
recorded in the row; it delays nothing but its own requests.

Generations are asked for under ``Sample(slot)`` keys, judge replies under
``Rating(number)`` (their journal records are the context's: engine.tasks.asking).

A reasoning model's generations are its answers (the judge sees answers only); a
generation cut off by max_tokens while reasoning (no answer) fails for good, never
asked for again; a judge reply cut off so leaves the row unpaired, never re-asked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import anyio

from engine.config import RunConfig
from engine.errors import InputError, ModelDown, ModelError
from engine.http.reasoning import max_tokens_of
from engine.input.base import row_id
from engine.input.rows import Message, parse_row
from engine.tasks.asking import Answer, Rating, Sample
from engine.tasks.base import RowContext, Task, row_usage
from engine.tasks.preference import BROUGHT_KEYS, KIND, PreferenceConfig
from engine.tasks.preference.judge import JSON, has_usable_rating, judge_messages, parse_ratings
from engine.tasks.preference.judge_json import parse_json_ratings, ratings_response_format
from engine.tasks.preference.judge_template import compile_template, render_judge, render_pair
from engine.tasks.preference.pairs import preference_row
from engine.tasks.preference.pairwise import (
    AB,
    ORDER_DEPENDENT,
    TIE,
    VERDICT_TRIES,
    Judgement,
    judge_pair_messages,
    orders,
    pair_key,
    pairs_of,
    parse_verdict,
    score,
    verdict_response_format,
)
from engine.tasks.templates import RenderError

JUDGE_TRIES = 2  # a reply with no usable rating is retried once
BROUGHT_MODEL = "input"  # generation_models' entry for a brought generation it does not name
_COLUMN_FIX = "map a list column onto it with input_columns, e.g. {generations: responses}"


@dataclass(frozen=True, slots=True)
class Slot:
    """One generation to make: which model, and which of its generations."""

    index: int
    model: str
    repeat: int


@dataclass(slots=True)
class Generation:
    text: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    trace: str | None = None
    reasoning_tokens: int = 0
    model_down: bool = False  # failed because its model is down or refuses: never journaled


@dataclass(slots=True)
class RowState:
    """A row's generations and judge replies so far (from the journal and this run)."""

    generations: dict[int, Generation] = field(default_factory=dict)
    judge_replies: list[Answer] = field(default_factory=list)


def slots_for(config: PreferenceConfig) -> list[Slot]:
    """Generation slots in output order: each generator's generations in turn."""
    return [
        Slot(index=i * config.num_generations + j, model=model, repeat=j)
        for i, model in enumerate(config.generators)
        for j in range(config.num_generations)
    ]


def prompt_of(messages: list[Message]) -> list[Message]:
    """The conversation up to and including its last user turn."""
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    return [dict(m) for m in messages[: last_user + 1] if m["role"] != "tool"]


@dataclass(frozen=True, slots=True)
class Brought:
    """The generations an input row brings, and the models it says wrote them."""

    texts: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)


def brought_from(record: dict[str, Any]) -> Brought:
    """A row's own ``generations`` and ``generation_models``; raises InputError naming the fix.

    Both are optional (a null counts as absent, as a Parquet row's often is);
    ``generations`` is a list of strings, ``generation_models`` a list of names
    of the same length, by default ``"input"`` for each.
    """
    texts = record.get("generations")
    if texts is None:
        texts = []
    elif not isinstance(texts, list):
        raise InputError(
            f"'generations' must be a list of strings (the responses to rate), "
            f"got {type(texts).__name__}; {_COLUMN_FIX}"
        )
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(
                f"'generations[{i}]' must be a string, got {type(text).__name__}; "
                "give each response as text"
            )
    models = record.get("generation_models")
    if models is None:
        return Brought(list(texts), [BROUGHT_MODEL] * len(texts))
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise InputError(
            "'generation_models' must be a list of model names (strings), one per generation; "
            "fix the column or leave it out (each then reads 'input')"
        )
    if len(models) != len(texts):
        raise InputError(
            f"'generation_models' has {len(models)} names for {len(texts)} generations; "
            "give one name per generation, in the same order"
        )
    return Brought(list(texts), list(models))


def read_reply(
    judge_format: str, reply: str, n: int
) -> tuple[list[int | None], list[str | None], str | None]:
    """A judge reply as ratings and rationales for ``n`` candidates, and why it is
    unusable when it is (JSON only: a free-text reply just has no ratings)."""
    if judge_format == JSON:
        return parse_json_ratings(reply, n)
    ratings, rationales = parse_ratings(reply, n)
    return ratings, rationales, None


def _reason(value: Any) -> str | None:
    return value if isinstance(value, str) else None


class PreferenceTask(Task):
    """Generates with a pool of models and pairs the answers by a judge's ratings."""

    def __init__(self, config: RunConfig) -> None:
        self.config = KIND.section(config)
        self.slots = slots_for(self.config)
        # Rows name models as the server knows them (like distillation's `model`).
        self.served = {name: config.models[name].model for name in self.config.generators}
        self.seeds = {
            name: config.models[name].params.get("seed") for name in self.config.generators
        }
        self.params = {name: config.models[name].params for name in config.models_used()}
        text = self.config.judge_template_text
        self.template = compile_template(text) if text is not None else None
        pw = self.config.pairwise
        self.pair_template = (
            compile_template(pw.template_text)
            if pw is not None and pw.template_text is not None
            else None
        )

    def optional_models(self) -> frozenset[str]:
        return frozenset(self.config.generators)  # one failing generator never stops the others

    async def process(self, record: dict[str, Any], ctx: RowContext) -> None:
        try:
            row = parse_row(record, ctx.line)
            brought = brought_from(record)
        except InputError as exc:
            await ctx.fail(row_id(record, ctx.line), f"input: {exc}")
            return
        extra = {k: v for k, v in row.extra.items() if k not in BROUGHT_KEYS}
        prompt = prompt_of(row.messages)
        if not prompt or prompt[-1]["role"] != "user":
            await ctx.fail(row.id, "input: has no user turn; add at least one user message")
            return
        state = RowState()
        async with anyio.create_task_group() as group:
            for slot in self.slots:
                group.start_soon(self._generate, ctx, prompt, slot, state)
        made = [(s, state.generations[s.index]) for s in self.slots]
        # The row's own generations first, then the generators', in output order.
        texts = brought.texts + [g.text for _, g in made if g.text is not None]
        models = brought.models + [self.served[s.model] for s, g in made if g.text is not None]
        # The generator entries too: two of them may serve one model with other params.
        makers: list[str | None] = [None] * len(brought.texts)
        makers += [s.model for s, g in made if g.text is not None]
        # Indices into `texts`: which replies max_tokens cut off (for filters.truncated).
        kept = [g for _, g in made if g.text is not None]
        traces = [None] * len(brought.texts) + [g.trace for g in kept]
        first = len(brought.texts)
        truncated = [first + i for i, g in enumerate(kept) if g.finish_reason == "length"]
        errors = [
            {"model": self.served[s.model], "generation": s.repeat, "error": g.error}
            for s, g in made
            if g.error is not None
        ]
        if not texts and errors and all(g.model_down for _, g in made if g.error is not None):
            # Every generator is down or refuses requests: no fault of this row's. Stop,
            # resumable, rather than fail every row until they are back.
            raise ModelDown(
                "no generator answers ("
                + "; ".join(dict.fromkeys(str(g.error) for _, g in made if g.error))
                + "); start them (or fix their base_url, model or key) and run the same "
                "command to resume"
            )
        if not texts and errors:
            await ctx.fail(
                row.id,
                "every generation failed: "
                + "; ".join(f"{e['model']}: {e['error']}" for e in errors),
            )
            return
        ratings: list[int | None] | None = None
        rationales: list[str | None] | None = None
        judge_note = None
        judgements: list[dict[str, Any]] | None = None
        drop = None
        if self.config.pairwise is not None:
            judgements = []
        if self.config.judge and len(texts) >= 2 and self.config.pairwise is not None:
            ratings, rationales, judge_note, judgements, drop = await self._judge_pairwise(
                ctx, prompt, texts, state
            )
        elif self.config.judge and len(texts) >= 2:
            ratings, rationales, judge_note = await self._judge(ctx, prompt, texts, state)
        elif self.config.judge:
            ratings, rationales = [None] * len(texts), [None] * len(texts)
            total = len(brought.texts) + len(self.slots)
            judge_note = f"fewer than two generations to compare ({len(texts)} of {total})"
        usage = row_usage(
            [(g.prompt_tokens, g.completion_tokens, g.reasoning_tokens) for _, g in made]
            + [
                (j.prompt_tokens, j.completion_tokens, j.reasoning_tokens)
                for j in state.judge_replies
            ]
        )
        out = preference_row(
            extra=extra,
            row_id=row.id,
            prompt=prompt,
            generations=texts,
            generation_models=models,
            generation_errors=errors,
            usage=usage,
            judged=self.config.judge is not None,
            ratings=ratings,
            rationales=rationales,
            truncated=truncated,
            reasoning=traces,
            generators=makers,
            judgements=judgements,
        )
        if judge_note is not None:
            out["pair_error"] = judge_note
        await ctx.finish(out, drop=drop)

    async def _generate(
        self, ctx: RowContext, prompt: list[Message], slot: Slot, state: RowState
    ) -> None:
        extra: dict[str, Any] = {}
        seed = self.seeds.get(slot.model)
        if isinstance(seed, int) and slot.repeat:
            extra["seed"] = seed + slot.repeat  # same seed would give the same answer again
        # A generation that fails for good (cut off while reasoning, refused) is
        # journaled by the context and never asked for again.
        key = Sample(slot.index, where=f"generation {slot.repeat} of {slot.model}")
        try:
            answer = await ctx.ask(slot.model, prompt, key=key, extra=extra)
        except ModelError as exc:
            # model_down: its model is down or refuses every request, not this row's
            # doing. The row records it if it finishes now; a resumed row asks again.
            state.generations[slot.index] = Generation(error=str(exc), model_down=exc.model_down)
            return
        state.generations[slot.index] = Generation(
            text=answer.text,
            prompt_tokens=answer.prompt_tokens,
            completion_tokens=answer.completion_tokens,
            finish_reason=answer.finish_reason,
            trace=answer.trace,
            reasoning_tokens=answer.reasoning_tokens,
        )

    async def _judge(
        self, ctx: RowContext, prompt: list[Message], texts: list[str], state: RowState
    ) -> tuple[list[int | None], list[str | None], str | None]:
        """Ratings and rationales for ``texts``, and a note when they are unusable."""
        judge = self.config.judge
        assert judge is not None
        n = len(texts)
        unrated: tuple[list[int | None], list[str | None]] = ([None] * n, [None] * n)
        fmt = self.config.judge_format
        if self.template is None:
            messages = judge_messages(prompt, texts, self.config.aspect, judge_format=fmt)
        else:
            try:
                messages = render_judge(self.template, prompt, texts, self.config.aspect)
            except RenderError as exc:
                return *unrated, str(exc)
        extra = {"response_format": ratings_response_format(n)} if fmt == JSON else None
        problem = None
        for number in range(JUDGE_TRIES):
            try:
                reply = await ctx.ask(judge, messages, key=Rating(number), extra=extra)
            except ModelError as exc:
                if exc.model_down:  # the judge is never optional, even as a generator too
                    raise exc.stopped(Rating.role) from exc
                return *unrated, f"judge failed: {exc}"
            state.judge_replies.append(reply)
            if reply.cut_off:
                return *unrated, self._judge_cut_off()
            # The answer: ratings are never read from the trace.
            ratings, rationales, problem = read_reply(fmt, reply.text, n)
            if has_usable_rating(ratings):
                return ratings, rationales, None
        why = f" (the last one: {problem})" if problem else ""
        return *unrated, f"the judge gave no usable rating in {JUDGE_TRIES} replies{why}"

    async def _judge_pairwise(
        self, ctx: RowContext, prompt: list[Message], texts: list[str], state: RowState
    ) -> tuple[list[int | None], list[str | None], str | None, list[dict[str, Any]], str | None]:
        """Every pair judged (in both orders with ``swap``), all at once: the candidates'
        round-robin points as ratings, a note when there is no pair, the verdicts, and
        the filter reason when an order-dependent verdict drops the row."""
        judge, pw = self.config.judge, self.config.pairwise
        assert judge is not None and pw is not None
        n = len(texts)
        jobs = [(a, b, order) for a, b in pairs_of(n) for order in orders(pw.swap)]
        found: dict[tuple[int, int, str], Judgement] = {}
        errors: list[str] = []
        stopped: list[BaseException] = []
        async with anyio.create_task_group() as group:
            for a, b, order in jobs:
                group.start_soon(
                    self._verdict, ctx, prompt, texts, (a, b, order), found, errors, stopped, state
                )
        if stopped:
            raise stopped[0]
        judgements = [found[job] for job in jobs if job in found]
        written = [j.as_dict() for j in judgements]
        if errors:
            return [None] * n, [None] * n, errors[0], written, None
        outcome = score(n, judgements, pw.on_disagree)
        stats = ctx.stats
        stats.order_pairs[judge] = stats.order_pairs.get(judge, 0) + outcome.both_orders
        stats.order_flips[judge] = stats.order_flips.get(judge, 0) + len(outcome.flipped)
        drop = f"pairwise: {ORDER_DEPENDENT} (on_disagree: drop)" if outcome.drop else None
        return list(outcome.points), [None] * n, outcome.error, written, drop

    async def _verdict(
        self,
        ctx: RowContext,
        prompt: list[Message],
        texts: list[str],
        job: tuple[int, int, str],
        found: dict[tuple[int, int, str], Judgement],
        errors: list[str],
        stopped: list[BaseException],
        state: RowState,
    ) -> None:
        """One verdict, asked again once when it does not fit; an unusable one is a tie."""
        judge, pw = self.config.judge, self.config.pairwise
        assert judge is not None and pw is not None
        a, b, order = job
        first, second = (texts[a], texts[b]) if order == AB else (texts[b], texts[a])
        try:
            if self.pair_template is None:
                messages = judge_pair_messages(prompt, first, second)
            else:
                messages = render_pair(self.pair_template, prompt, first, second)
        except RenderError as exc:
            errors.append(str(exc))
            return
        extra = {"response_format": verdict_response_format()}
        problem = None
        for number in range(VERDICT_TRIES):
            key = pair_key(a, b, order, number, texts)
            try:
                reply = await ctx.ask(judge, messages, key=key, extra=extra)
            except ModelError as exc:
                if exc.model_down:  # the judge is never optional
                    stopped.append(exc.stopped(Rating.role))
                else:
                    errors.append(f"judge failed: {exc}")
                return
            state.judge_replies.append(reply)
            if reply.cut_off:
                problem = "cut off by max_tokens while reasoning"
                break  # it would be cut off again
            winner, rationale, problem = parse_verdict(reply.text)
            if winner is not None:
                found[job] = Judgement(a, b, order, winner, rationale)
                return
        found[job] = Judgement(
            a, b, order, TIE, f"no usable verdict, counted as a tie (the last reply: {problem})"
        )

    def _judge_cut_off(self) -> str:
        judge = self.config.judge
        assert judge is not None
        limit = max_tokens_of(self.params[judge])
        said = f"max_tokens ({limit})" if limit is not None else "the server's default max_tokens"
        return (
            f"the judge's reply was cut off by {said} while reasoning, with no answer "
            f"(finish_reason: length); not requested again: raise models.{judge}.params.max_tokens"
        )
