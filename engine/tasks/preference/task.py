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

Journal records (besides the emits): ``{"k": "g", "l", "s", "c", "p", "o", "f"}`` a
generation for slot ``s`` (plus ``"r"`` its reasoning trace and ``"n"`` its reasoning
tokens, when it has them); ``{"k": "ge", "l", "s", "e"}`` a slot that failed for
good; ``{"k": "r", "l", "a", "c", "p", "o"}`` judge reply number ``a`` (plus ``"n"``,
and ``"x": true`` when it was cut off while reasoning).

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
from engine.http.reasoning import cut_off_error, max_tokens_of
from engine.input.base import row_id
from engine.input.rows import InputRow, Message, parse_row
from engine.tasks.base import Context, Records, row_usage
from engine.tasks.preference import BROUGHT_KEYS, PreferenceConfig
from engine.tasks.preference.judge import JSON, has_usable_rating, judge_messages, parse_ratings
from engine.tasks.preference.judge_json import parse_json_ratings, ratings_response_format
from engine.tasks.preference.judge_template import compile_template, render_judge
from engine.tasks.preference.pairs import preference_row
from engine.tasks.templates import RenderError

GENERATION, GENERATION_ERROR, RATING = "g", "ge", "r"
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


@dataclass(frozen=True, slots=True)
class JudgeReply:
    """One judge reply: its answer (never its trace), its cost, whether it was cut off."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cut_off: bool = False


@dataclass(slots=True)
class RowState:
    """A row's generations and judge replies so far (from the journal and this run)."""

    generations: dict[int, Generation] = field(default_factory=dict)
    judge_replies: list[JudgeReply] = field(default_factory=list)


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


def state_from(records: Records) -> RowState:
    state = RowState()
    for record in records:
        kind = record.get("k")
        if kind == GENERATION and isinstance(record.get("s"), int):
            trace = record.get("r")
            state.generations.setdefault(
                record["s"],
                Generation(
                    text=str(record.get("c", "")),
                    prompt_tokens=int(record.get("p") or 0),
                    completion_tokens=int(record.get("o") or 0),
                    finish_reason=_reason(record.get("f")),
                    trace=trace if isinstance(trace, str) else None,
                    reasoning_tokens=int(record.get("n") or 0),
                ),
            )
        elif kind == GENERATION_ERROR and isinstance(record.get("s"), int):
            state.generations.setdefault(record["s"], Generation(error=str(record.get("e"))))
        elif kind == RATING:
            state.judge_replies.append(
                JudgeReply(
                    str(record.get("c", "")),
                    int(record.get("p") or 0),
                    int(record.get("o") or 0),
                    int(record.get("n") or 0),
                    record.get("x") is True,
                )
            )
    return state


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


class PreferenceTask:
    """Generates with a pool of models and pairs the answers by a judge's ratings."""

    def __init__(self, config: RunConfig) -> None:
        self.config: PreferenceConfig = config.section
        self.slots = slots_for(self.config)
        # Rows name models as the server knows them (like distillation's `model`).
        self.served = {name: config.models[name].model for name in self.config.generators}
        self.seeds = {
            name: config.models[name].params.get("seed") for name in self.config.generators
        }
        self.params = {name: config.models[name].params for name in config.models_used()}
        text = self.config.judge_template_text
        self.template = compile_template(text) if text is not None else None

    def rows_in_flight(self, config: RunConfig) -> int:
        # Each row fans out to every generator: enough rows to keep the largest
        # cap busy while rows wait for their slowest model or the judge.
        caps = [config.models[name].total_concurrency for name in config.models_used()]
        return max(4, 2 * max(caps))

    def optional_models(self) -> frozenset[str]:
        return frozenset(self.config.generators)  # one failing generator never stops the others

    async def process(
        self, line: int, record: dict[str, Any], records: Records, ctx: Context
    ) -> None:
        try:
            row = parse_row(record, line)
            brought = brought_from(record)
        except InputError as exc:
            await ctx.fail(line, row_id(record, line), f"input: {exc}")
            return
        extra = {k: v for k, v in row.extra.items() if k not in BROUGHT_KEYS}
        prompt = prompt_of(row.messages)
        if not prompt or prompt[-1]["role"] != "user":
            await ctx.fail(line, row.id, "input: has no user turn; add at least one user message")
            return
        state = state_from(records)
        missing = [s for s in self.slots if s.index not in state.generations]
        if missing:
            async with anyio.create_task_group() as group:
                for slot in missing:
                    group.start_soon(self._generate, ctx, row, prompt, slot, state)
        if ctx.stopping or len(state.generations) < len(self.slots):
            return
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
                line,
                row.id,
                "every generation failed: "
                + "; ".join(f"{e['model']}: {e['error']}" for e in errors),
            )
            return
        ratings: list[int | None] | None = None
        rationales: list[str | None] | None = None
        judge_note = None
        if self.config.judge and len(texts) >= 2:
            judged = await self._judge(ctx, row, prompt, texts, state)
            if judged is None:
                return  # stopping
            ratings, rationales, judge_note = judged
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
        )
        if judge_note is not None:
            out["pair_error"] = judge_note
        await ctx.finish(row.line, out)

    async def _generate(
        self, ctx: Context, row: InputRow, prompt: list[Message], slot: Slot, state: RowState
    ) -> None:
        if ctx.stopping:
            return
        extra: dict[str, Any] = {}
        seed = self.seeds.get(slot.model)
        if isinstance(seed, int) and slot.repeat:
            extra["seed"] = seed + slot.repeat  # same seed would give the same answer again
        try:
            completion = await ctx.clients[slot.model].complete(prompt, extra)
        except ModelError as exc:
            if exc.model_down:
                # Its model is down or refuses every request: not this row's doing. The
                # row records it if it finishes now; unjournaled, a resumed row asks again.
                state.generations[slot.index] = Generation(error=str(exc), model_down=True)
                return
            generation, record = self._failed(row, slot, str(exc))
        else:
            trace = completion.trace()
            ctx.stats.turns_done += 1
            if completion.cut_off():
                assert trace is not None
                where = f"generation {slot.repeat} of {slot.model}"
                error = cut_off_error(slot.model, self.params[slot.model], trace, where)
                generation, record = self._failed(row, slot, error)
            else:
                generation = Generation(
                    text=completion.texts[0],
                    prompt_tokens=completion.prompt_tokens,
                    completion_tokens=completion.completion_tokens,
                    finish_reason=completion.finish_reasons[0],
                    trace=trace,
                    reasoning_tokens=completion.reasoning_tokens,
                )
                record = {
                    "k": GENERATION,
                    "l": row.line,
                    "s": slot.index,
                    "c": generation.text,
                    "p": generation.prompt_tokens,
                    "o": generation.completion_tokens,
                    "f": generation.finish_reason,
                }
                if trace is not None:
                    record["r"] = trace
                if completion.reasoning_tokens:
                    record["n"] = completion.reasoning_tokens
        await ctx.writer.record(record)
        state.generations[slot.index] = generation

    @staticmethod
    def _failed(row: InputRow, slot: Slot, error: str) -> tuple[Generation, dict[str, Any]]:
        """A generation that failed for good, and its journal record."""
        record: dict[str, Any] = {
            "k": GENERATION_ERROR,
            "l": row.line,
            "s": slot.index,
            "e": error,
        }
        return Generation(error=error), record

    async def _judge(
        self,
        ctx: Context,
        row: InputRow,
        prompt: list[Message],
        texts: list[str],
        state: RowState,
    ) -> tuple[list[int | None], list[str | None], str | None] | None:
        """Ratings and rationales for ``texts``, a note when unusable; None when stopping."""
        assert self.config.judge is not None
        n = len(texts)
        unrated: tuple[list[int | None], list[str | None]] = ([None] * n, [None] * n)
        fmt = self.config.judge_format
        problem = None
        for judged in state.judge_replies:
            if judged.cut_off:
                return *unrated, self._judge_cut_off()
            ratings, rationales, problem = read_reply(fmt, judged.text, n)
            if has_usable_rating(ratings):
                return ratings, rationales, None
        if self.template is None:
            messages = judge_messages(prompt, texts, self.config.aspect, judge_format=fmt)
        else:
            try:
                messages = render_judge(self.template, prompt, texts, self.config.aspect)
            except RenderError as exc:
                return *unrated, str(exc)
        extra = {"response_format": ratings_response_format(n)} if fmt == JSON else None
        client = ctx.clients[self.config.judge]
        while len(state.judge_replies) < JUDGE_TRIES:
            if ctx.stopping:
                return None
            try:
                completion = await client.complete(messages, extra)
            except ModelError as exc:
                if exc.model_down:
                    raise exc.stopped(" (the judge)") from exc
                return *unrated, f"judge failed: {exc}"
            reply = completion.texts[0]  # the answer: ratings are never read from the trace
            cut = completion.cut_off()
            record: dict[str, Any] = {
                "k": RATING,
                "l": row.line,
                "a": len(state.judge_replies),
                "c": reply,
                "p": completion.prompt_tokens,
                "o": completion.completion_tokens,
            }
            if completion.reasoning_tokens:
                record["n"] = completion.reasoning_tokens
            if cut:
                record["x"] = True
            await ctx.writer.record(record)
            state.judge_replies.append(
                JudgeReply(
                    reply,
                    completion.prompt_tokens,
                    completion.completion_tokens,
                    completion.reasoning_tokens,
                    cut,
                )
            )
            ctx.stats.turns_done += 1
            if cut:
                return *unrated, self._judge_cut_off()
            ratings, rationales, problem = read_reply(fmt, reply, n)
            if has_usable_rating(ratings):
                return ratings, rationales, None
        why = f" (the last one: {problem})" if problem else ""
        return *unrated, f"the judge gave no usable rating in {JUDGE_TRIES} replies{why}"

    def _judge_cut_off(self) -> str:
        judge = self.config.judge
        assert judge is not None
        limit = max_tokens_of(self.params[judge])
        said = f"max_tokens ({limit})" if limit is not None else "the server's default max_tokens"
        return (
            f"the judge's reply was cut off by {said} while reasoning, with no answer "
            f"(finish_reason: length); not requested again: raise models.{judge}.params.max_tokens"
        )
