"""The seam every task plugs into: what a task is, what it sees, and what it shares.

A task is two objects. Its *kind* (a ``TaskKind[S]``, one per ``task:`` name, ``S``
its config section's type) owns everything decided before a run. A new kind must
provide:

- ``name``, and ``section_type`` (``S``);
- ``parse_section`` (the ``task:`` section from the config, problems collected),
  ``section_fields`` (its plain values: the checkpoint's fingerprint and the card)
  and ``models_used`` (the names under ``models:`` it asks);
- ``build`` (its runner for one run) and ``card_text`` (the dataset card's sentence);
- ``replies`` (what the quality filters check of a finished row);

and may override the rest (``column_keys``, ``card_usage``, ``row_problem``,
``is_paired``, ``describe``, ``progress_note``, ``resume_problem``).

Its *runner* (a ``Task``) must provide ``process(record, ctx)``: move one input
row to its end. It sees a ``RowContext`` only: ``ctx.ask(model, messages, key=...)``
for every reply (journaled before it returns, answered from the journal on resume,
counted, a down model stopping the run, a stop request ending the row by
cancellation), then ``ctx.finish(row)`` or ``ctx.fail(...)``. A task never touches
the journal, the clients or the stop flag itself. It may say which models it can go
on without (``optional_models``) and how many rows it wants in flight
(``rows_in_flight``; by default the runner's ``max(4, 2 * the largest cap)``).

A new task is one subpackage of ``engine.tasks`` exporting ``KIND`` (the registry
finds it), or a kind defined anywhere and passed to ``engine.tasks.register``.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, NoReturn, Protocol, TypeVar

import anyio

from engine.cache.keys import request_key, stored_reply
from engine.cost import SPENT, Price, worst_case, worst_case_body
from engine.errors import ModelError
from engine.http.endpoint import RawEndpoint, asker
from engine.http.reasoning import cut_off_error
from engine.output.filters import FilterConfig, Reply, check_row, filtered_record, rule_of
from engine.output.quality import (
    QUALITY_KEY,
    QualityJudge,
    dialogue_of,
    parse_quality,
    quality_messages,
    quality_request_fields,
    quality_verdict,
)
from engine.output.quality import TRIES as QUALITY_TRIES
from engine.output.quality import ask_key as quality_key
from engine.tasks.asking import (
    Answer,
    Key,
    RawAnswer,
    Sample,
    answer_of,
    failure_of,
    failure_record,
    generation_of,
    index,
    raw_answer_of,
    raw_record,
    raw_slot,
    reply_record,
    slot_of,
)

if TYPE_CHECKING:
    from engine.cache.store import ReplyCache
    from engine.config import ModelConfig, RunConfig
    from engine.cost import Budget
    from engine.http.endpoint import Messages, ModelEndpoint
    from engine.problems import Problems
    from engine.stats import RunStats

Records = Sequence[dict[str, Any]]
S = TypeVar("S")


class RowWriter(Protocol):
    """What a task writes through: the run's single writer (engine.checkpoint.writer).

    Each call returns once what it wrote is in the OS (safe from a SIGKILL), except
    ``hand_over``: a finished row has nothing left to wait for.
    """

    async def record(self, record: dict[str, Any]) -> None:
        """Journal one record (replayed to the row's task on resume)."""
        ...

    def hand_over(
        self, line: int, row: dict[str, Any], records: Records = ()
    ) -> Coroutine[Any, Any, None] | None:
        """Queue a finished row for the output, journaling ``records`` before it; the
        wait to await when the caller must wait for the write all the same, else None."""
        ...

    async def filtered(self, line: int, row: dict[str, Any], records: Records = ()) -> None:
        """Write a row the quality filters left out to the filtered file."""
        ...

    async def failed(self, line: int, row: dict[str, Any]) -> None:
        """Write a row's failure to the failed file."""
        ...


class Task(ABC):
    """One run's worker for a task: what happens to each input row."""

    def rows_in_flight(self, config: RunConfig) -> int | None:
        """How many rows to work on at once, when the task wants other than the
        runner's default (None)."""
        return None

    def optional_models(self) -> frozenset[str]:
        """Models the task can go on without (a request to one that is down raises
        its ModelError instead of stopping the run)."""
        return frozenset()

    @abstractmethod
    async def process(self, record: dict[str, Any], ctx: RowContext) -> None:
        """Move one row to its end: ``ctx.ask`` for replies, then ``ctx.finish`` or
        ``ctx.fail``. ``record`` is the input row as read (columns mapped)."""


class TaskKind(ABC, Generic[S]):
    """A task as the config, the checkpoint, the filters and the dataset card see it."""

    name: ClassVar[str]
    section_type: type[S]  # the parsed section's class
    tags: ClassVar[tuple[str, ...]] = ()  # the dataset card's tags
    # Row keys `input_columns:` may map a column onto (besides `id`).
    column_keys: ClassVar[tuple[str, ...]] = ()
    pairs: ClassVar[bool] = False  # rows may carry chosen/rejected pairs (--pairs-only)
    # Whether each model entry must name the model its server serves (`model:`); a task
    # whose requests carry their own (a batch file's bodies) does without it.
    model_names: ClassVar[bool] = True

    def section(self, config: RunConfig) -> S:
        """``config``'s section, as this kind parsed it."""
        section = config.section
        if not isinstance(section, self.section_type):
            raise TypeError(f"task {self.name}: the config's section is {section!r}")
        return section

    @abstractmethod
    def parse_section(
        self, raw: Any, models: Mapping[str, ModelConfig], p: Problems, base: Path
    ) -> S | None:
        """The task's config section (``raw`` is None when absent); problems go to ``p``."""

    @abstractmethod
    def section_fields(self, section: S) -> dict[str, Any]:
        """The section as plain values: the fingerprint's and the card's."""

    @abstractmethod
    def models_used(self, section: S) -> set[str]: ...

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

    def status_lines(self, config: RunConfig) -> list[str]:
        """Lines of the task's own for ``turnstile status`` (read from the run's files)."""
        return []

    def describe(self, section: S) -> str | None:
        """A line for ``turnstile status`` (how the task counts its turns), if it has one."""
        return None

    def progress_note(self, section: S) -> str | None:
        """A word after the progress display's turn count (what the estimate counts by)."""
        return None

    def resume_problem(self, recorded: Mapping[str, Any] | None, config: RunConfig) -> str | None:
        """Why a checkpoint made with section ``recorded`` must not be resumed, if it must not."""
        return None


def rows_in_flight(config: RunConfig, task: Task) -> int:
    """How many rows the runner works on at once: ``max_conversations`` when set, else
    what the task wants, else twice the largest cap of the models it uses (while some
    rows wait for the journal or their slowest model, the others keep every slot busy)."""
    if config.max_conversations:
        return config.max_conversations
    wanted = task.rows_in_flight(config)
    if wanted is None:
        caps = [config.models[name].total_concurrency for name in config.models_used()]
        wanted = max(4, 2 * max(caps, default=1))
    # A batch model answers a whole batch at once: enough rows to fill all its batches.
    used = [config.models[name] for name in config.models_used()]
    return max([wanted, *(m.batch.rows_in_flight for m in used if m.batch is not None)])


@dataclass(slots=True)
class Context:
    """A run's side of the task seam: the protocol every row's requests go through.

    The runner makes one per run and a ``RowContext`` per row (``row``). ``stop()``
    asks for a graceful stop: no request is sent after it; a row that asks for one
    waits, and once no request is in flight and every row still working waits so,
    ``scope`` (the runner's, around the row workers) is cancelled.
    """

    config: RunConfig
    kind: TaskKind[Any]
    writer: RowWriter
    clients: Mapping[str, ModelEndpoint]
    stats: RunStats
    optional: frozenset[str] = frozenset()  # models whose outage does not stop the run
    scope: anyio.CancelScope | None = None  # cancelled once a stop has nothing left to wait for
    cache: ReplyCache | None = None  # replies shared by runs (cache.dir); None: off
    budget: Budget | None = None  # the spend a run may not go past; None: no budget
    # Per row and model, what its replies took (engine.estimate asks for it; None: off):
    # {line: {model: [requests, prompt tokens, completion tokens, USD, seconds asking]}}
    ledger: dict[int, dict[str, list[float]]] | None = None
    _filtering: bool = field(init=False, repr=False)  # any filter rule on: asked once, not per row
    _judge: QualityJudge | None = field(init=False, repr=False)  # filters.judge, likewise
    # A stop was asked for (``stop()``; read-only outside): an attribute, not a
    # property, as the runner reads it twice a row.
    stopping: bool = field(default=False, init=False)
    _in_flight: int = field(default=0, init=False, repr=False)  # requests sent, not yet back
    _rows: int = field(default=0, init=False, repr=False)  # rows being processed
    _parked: int = field(default=0, init=False, repr=False)  # of those, waiting on a stop
    # Told when a row ends (a batch model's loop wakes on it: engine.batch.endpoint.BatchRun).
    rows_changed: Callable[[], None] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._filtering = self.config.filters.active
        self._judge = self.config.filters.judge

    @property
    def rows_working(self) -> int:
        """Rows being processed now (a batch model's gauge reads it)."""
        return self._rows

    @property
    def requests_in_flight(self) -> int:
        return self._in_flight

    def stop(self) -> None:
        """No more requests: rows finish what is in flight, then are cancelled."""
        self.stopping = True
        self._settle()

    def row(self, line: int, records: Records = ()) -> RowContext:
        """The context of the row at ``line``, with its journal records from earlier runs."""
        return RowContext(self, line, index(records) if records else {})

    def begin(self, line: int, records: Records = ()) -> RowContext:
        """The row at ``line`` taken on: its context, counted as in progress (a stop
        waits for it) until ``end``. The runner awaits the task's ``process`` itself
        between the two: one coroutine fewer for every request's reply to pass through."""
        self._rows += 1
        return RowContext(self, line, index(records) if records else {})

    def end(self, row: RowContext) -> None:
        """The row's ``process`` returned or raised: no longer in progress."""
        self._rows -= 1
        if self.rows_changed is not None:
            self.rows_changed()
        if row._parked:
            self._parked -= 1
        if self.stopping:
            self._settle()

    def _settle(self) -> None:
        if self.stopping and self._in_flight == 0 and self._parked == self._rows:
            if self.scope is not None:
                self.scope.cancel()

    async def _park(self, row: RowContext) -> NoReturn:
        """A request asked for after a stop: wait to be cancelled with the other rows."""
        if not row._parked:
            row._parked = True
            self._parked += 1
            self._settle()
        await anyio.sleep_forever()
        raise AssertionError("a parked request is only ever cancelled")  # pragma: no cover

    def check(self, row: dict[str, Any]) -> str | None:
        """The first string rule the row fails (engine.output.filters), or None."""
        return check_row(row, self.kind, self.config.filters) if self._filtering else None

    def count_filtered(self, reason: str) -> None:
        """A finished row went to the filtered file for ``reason`` (see ``RowContext.finish``)."""
        self.stats.rows_filtered += 1
        rule = rule_of(reason)
        self.stats.filtered_by_rule[rule] = self.stats.filtered_by_rule.get(rule, 0) + 1

    async def fail(
        self, line: int, row_id: Any, error: str, *, turn: int | None = None, **extra: Any
    ) -> None:
        """The one way a row fails for good: a line in the failed file, counted."""
        await self.fail_line(
            line, {"id": row_id, "line": line, "turn": turn, "error": error, **extra}
        )

    async def fail_line(self, line: int, row: dict[str, Any]) -> None:
        """Fail a row for good with a failed-file line of the task's own shape, counted."""
        await self.writer.failed(line, row)
        self.stats.rows_done += 1
        self.stats.rows_failed += 1


class RowContext:
    """What a task sees of the run while it moves one row: ``ask``, ``finish``, ``fail``."""

    __slots__ = ("_journaled", "_parked", "_pending", "_run", "line")

    def __init__(
        self, run: Context, line: int, journaled: dict[tuple[str, Any], dict[str, Any]]
    ) -> None:
        self._run = run
        self.line = line  # the row's place in the input (0-based)
        self._journaled = journaled
        self._parked = False
        self._pending: list[dict[str, Any]] = []  # a last reply, journaled with the row

    @property
    def config(self) -> RunConfig:
        return self._run.config

    @property
    def stats(self) -> RunStats:
        return self._run.stats

    def replayed(self, key: Key) -> Answer | None:
        """The reply an earlier run journaled under ``key``, if any (counted as resumed).

        Each journaled reply is handed out once, here or by ``ask``. Raises ModelError
        for a generation journaled as failed for good (a ``Sample``).
        """
        record = self._journaled.pop(slot_of(key), None) if self._journaled else None
        if record is None:
            return None
        error = failure_of(record)
        if error is not None:
            raise ModelError(error, retryable=False)
        self._run.stats.turns_resumed += 1
        return answer_of(record)

    async def ask(
        self,
        model: str,
        messages: Messages,
        *,
        key: Key,
        extra: Mapping[str, Any] | None = None,
        prefer: int | None = None,
        check: Callable[[str], str | None] | None = None,
        last: bool = False,
    ) -> Answer:
        """The reply of ``model`` (a name under ``models:``) to ``messages``, under ``key``.

        ``key`` names the reply within the row, the same in every run (``Turn``,
        ``Try``, ``Sample``, ``Rating`` or a string of the task's own): a reply an
        earlier run journaled under it is returned without a request. Otherwise the
        request goes to the model's endpoint (``extra``: request fields such as
        ``response_format`` or ``seed``; ``prefer``: the replica to try first), and the
        reply is journaled before it is returned, with ``check(text)`` (why the text is
        unusable, or None) when given. A reply cut off while reasoning is returned
        (``Answer.cut_off``) for the task to fail its row; a ``Sample``'s is journaled
        as failed instead and raised as ModelError, as is any permanent failure of it.

        ``last``: the row's last reply, which ``finish`` writes in the same group as the
        row (one writer round trip fewer a row; a kill in between asks it again, as it
        would a reply in flight).

        Raises ModelError for a failed request (``model_down`` only for an optional
        model's outage), ModelDown when a model the run needs is down. After a stop
        request no request is sent: the row waits to be cancelled.
        """
        if self._journaled:
            answer = self.replayed(key)
            if answer is not None:
                return answer
        run = self._run
        if run.stopping:
            await run._park(self)
        settings = run.config.models[model]
        params: Mapping[str, Any] = {**settings.params, **extra} if extra else settings.params
        cache_key = stored = None
        cache = run.cache
        if cache is not None:
            cache_key = request_key(settings.model, params, messages, generation_of(key))
            if not cache.claim(cache_key):  # (a miss known at once needs no await)
                stored = await cache.get(cache_key)
                if run.stopping and stored is None:
                    await run._park(self)
        held = None
        batch = settings.batch is not None  # a batch model is charged at its batch price
        if stored is None and run.budget is not None:
            held = run.budget.hold(model, *worst_case(messages, params), batch=batch)
            if held is None:  # it could take the run past its budget: start no more turns
                run.stop()
                await run._park(self)
        cached_tokens = 0
        spent: float | None = None  # what a sent request cost (journaled: spend survives a kill)
        began = time.monotonic() if run.ledger is not None else 0.0
        try:
            if stored is not None:
                answer = _stored_answer(stored, check)
                _count_hit(run, model, answer, stored.get("ct", 0), batch=batch)
            else:
                if batch:
                    asker.set((self.line, key))  # a batch model names the request by it
                run._in_flight += 1
                try:
                    completion = await run.clients[model].complete(messages, extra, prefer=prefer)
                except ModelError as exc:
                    if exc.model_down and model not in run.optional:
                        # Not this row's fault: stop the run, resumable, the row tried again.
                        raise exc.stopped(getattr(key, "role", "")) from exc
                    if isinstance(key, Sample) and not exc.model_down:
                        await run.writer.record(failure_record(self.line, key, str(exc)))
                    raise
                finally:
                    run._in_flight -= 1
                text = completion.texts[0]
                traces = completion.traces
                answer = Answer(
                    text,
                    completion.prompt_tokens,
                    completion.completion_tokens,
                    completion.finish_reasons[0],
                    traces[0] if traces is not None else None,
                    completion.reasoning_tokens,
                    check(text) if check is not None else None,
                    completion.replica,
                )
                cached_tokens = completion.cached_tokens
                spent = _count_cost(
                    run,
                    model,
                    settings.price,
                    answer.prompt_tokens,
                    answer.completion_tokens,
                    cached_tokens,
                    batch=batch,
                )
                run.stats.turns_done += 1
        finally:
            if held is not None and run.budget is not None:
                run.budget.release(held)
        try:
            if answer.trace is not None and isinstance(key, Sample) and answer.cut_off:
                params = settings.params
                error = cut_off_error(model, params, answer.trace, key.where)
                await run.writer.record(failure_record(self.line, key, error))
                raise ModelError(error, retryable=False)
            record = reply_record(self.line, key, answer)
            if spent is not None:
                record[SPENT] = spent  # replay sums it: the spend is exact across a kill
            if run.ledger is not None:
                _enter(run.ledger, self.line, model, answer, spent, time.monotonic() - began)
            if last and answer.error is None:
                self._pending.append(record)
            else:
                await run.writer.record(record)
            if cache_key is not None and stored is None and cache is not None:
                # Journaled first (resume stays exact), then in the store for other runs.
                reply = stored_reply(
                    answer.text,
                    answer.finish_reason,
                    answer.prompt_tokens,
                    answer.completion_tokens,
                    answer.reasoning_tokens,
                    answer.trace,
                    cached_tokens,
                )
                room = cache.add(cache_key, reply)
                if room is not None:  # the store's backlog is full
                    await room
            return answer
        finally:
            if run.stopping:
                run._settle()

    async def send(
        self,
        model: str,
        path: str,
        body: bytes,
        *,
        key: str,
        prefer: int | None = None,
        last: bool = False,
    ) -> RawAnswer:
        """``body`` POSTed as it is to ``path`` under ``model``'s base URL; the reply whole.

        ``ask``'s sibling for requests the task builds itself (a batch file's line, to
        ``/completions`` or ``/embeddings`` as well as ``/chat/completions``): the same
        caps, retries and replicas (``RawEndpoint.post``), the reply journaled under
        ``key`` before it is returned (or with the row, ``last``) and answered from the
        journal on resume, counted as a turn, a down model stopping the run, no request
        after a stop. Raises ModelError for a failed request, and a ``model_down`` one
        when the model's endpoint cannot send raw requests.
        """
        run = self._run
        record = self._journaled.pop(raw_slot(key), None) if self._journaled else None
        if record is not None:
            run.stats.turns_resumed += 1
            return raw_answer_of(record)
        client = run.clients[model]
        if not isinstance(client, RawEndpoint):
            error = ModelError(
                f"models.{model}: its endpoint ({type(client).__name__}) cannot send a "
                "request body as it is",
                retryable=False,
                model_down=True,
                fix="use an online model (base_url) for it",
            )
            raise error if model in run.optional else error.stopped("")
        if run.stopping:
            await run._park(self)
        held = None
        if run.budget is not None:
            held = run.budget.hold(model, *worst_case_body(body))
            if held is None:  # it could take the run past its budget: start no more turns
                run.stop()
                await run._park(self)
        run._in_flight += 1
        try:
            reply = await client.post(path, body, prefer=prefer)
        except ModelError as exc:
            if exc.model_down and model not in run.optional:
                raise exc.stopped("") from exc
            raise
        finally:
            run._in_flight -= 1
            if held is not None and run.budget is not None:
                run.budget.release(held)
        try:
            answer = RawAnswer(
                status=reply.status,
                body=reply.data,
                prompt_tokens=reply.prompt_tokens,
                completion_tokens=reply.completion_tokens,
                replica=reply.replica,
            )
            run.stats.turns_done += 1
            record = raw_record(self.line, key, answer)
            # Counted and journaled as ask's replies are: the spend is exact across a kill.
            price = run.config.models[model].price
            record[SPENT] = _count_cost(
                run, model, price, reply.prompt_tokens, reply.completion_tokens, reply.cached_tokens
            )
            if last:
                self._pending.append(record)
            else:
                await run.writer.record(record)
            return answer
        finally:
            if run.stopping:
                run._settle()

    async def finish(self, row: dict[str, Any], *, drop: str | None = None) -> None:
        """Write the finished row: to the output, or the filtered file when a rule fires
        (``drop``: the task's own reason, ``"rule: detail"``, to filter it regardless).

        With ``filters.judge`` a row that passes the string rules is scored by the judge
        model first (asked here, journaled with the row; engine.output.quality).
        """
        run = self._run
        reason = drop
        if reason is None and run._filtering:
            reason = run.check(row)
        if reason is None and run._judge is not None:
            reason = await self._judge_quality(run._judge, row)
        pending, self._pending = self._pending, []
        if reason is None:
            # Handed over, not waited for: the row is written at the end of this loop
            # pass, and the worker takes its next row meanwhile (Writer.hand_over).
            wait = run.writer.hand_over(self.line, row, pending)
            if wait is not None:
                await wait
        else:
            await run.writer.filtered(self.line, filtered_record(row, reason), pending)
            run.count_filtered(reason)
        run.stats.rows_done += 1

    async def _judge_quality(self, judge: QualityJudge, row: dict[str, Any]) -> str | None:
        """Score the row's conversation: ``row["quality"]`` set, and the filter's reason
        when it scored below ``min_score``. Its replies are the row's last: journaled
        in the row's own group write, so a finished row is never scored again."""
        messages = dialogue_of(row)
        if messages is None:
            return None  # nothing to score: a row of another task's shape
        request, problem = quality_messages(judge, messages)
        if request is None:
            row[QUALITY_KEY] = {"score": None, "reason": problem}
            return None
        fields = quality_request_fields()
        for number in range(QUALITY_TRIES):
            answer = await self.ask(
                judge.model, request, key=quality_key(number), extra=fields, last=True
            )
            if answer.replica is not None:  # sent, not answered from the journal
                self.stats.judge_filter_requests += 1
            score, why, problem = parse_quality(answer.text)
            if score is not None:
                row[QUALITY_KEY] = {"score": score, "reason": why}
                return quality_verdict(score, why, judge.min_score)
        row[QUALITY_KEY] = {
            "score": None,
            "reason": f"no usable score in {QUALITY_TRIES} replies (the last one: {problem})",
        }
        return None

    async def fail(self, row_id: Any, error: str, *, turn: int | None = None, **extra: Any) -> None:
        """Fail the row for good: a line in the failed file naming ``error``."""
        await self._journal_pending()
        await self._run.fail(self.line, row_id, error, turn=turn, **extra)

    async def fail_line(self, row: dict[str, Any]) -> None:
        """Fail the row for good with a failed-file line of the task's own shape (an
        OpenAI error-file line, say); the task puts the row's line in it if it wants."""
        await self._journal_pending()
        await self._run.fail_line(self.line, row)

    async def _journal_pending(self) -> None:
        """A last reply (``ask(last=True)``) journaled though its row fails: what it cost
        stays in the spend, and it is never asked for again."""
        pending, self._pending = self._pending, []
        for record in pending:
            await self._run.writer.record(record)


def _stored_answer(stored: Mapping[str, Any], check: Callable[[str], str | None] | None) -> Answer:
    """A reply from the cache, as ``ask`` hands it back (checked again: the check may
    be another run's)."""
    text = str(stored.get("c", ""))
    reason, trace = stored.get("f"), stored.get("r")
    return Answer(
        text=text,
        prompt_tokens=int(stored.get("p", 0)),
        completion_tokens=int(stored.get("o", 0)),
        finish_reason=reason if isinstance(reason, str) else None,
        trace=trace if isinstance(trace, str) else None,
        reasoning_tokens=int(stored.get("n", 0)),
        error=check(text) if check is not None else None,
    )


def _count_cost(
    run: Context,
    model: str,
    price: Price | None,
    prompt: int,
    completion: int,
    cached: int,
    *,
    batch: bool = False,
) -> float:
    """A sent request's cost (at the model's ``price``; ``batch``: at its batch price) and
    tokens, counted and spent; returns the cost (0.0 without a price)."""
    if price is None and not cached and run.budget is None:
        return 0.0  # nothing to count (the common case: a local teacher)
    usd = price.cost(prompt, completion, cached, batch=batch) if price else 0.0
    if price is not None or cached:
        counters = run.stats.models.get(model)
        if counters is not None:
            counters.cached_tokens += cached
            if price is not None:
                counters.cost_usd += usd
                counters.priced = True
    if run.budget is not None:
        run.budget.spend(usd, prompt + completion)
    return usd


def _count_hit(run: Context, model: str, answer: Answer, cached: int, *, batch: bool) -> None:
    """A reply the cache answered: counted, and what it saved valued at the model's price."""
    run.stats.cached += 1
    counters = run.stats.models.get(model)
    if counters is None:
        return
    counters.cached += 1
    price = run.config.models[model].price
    if price is not None:
        counters.priced = True  # it costs $0, and that is worth showing
        counters.saved_usd += price.cost(
            answer.prompt_tokens, answer.completion_tokens, cached, batch=batch
        )


def _enter(
    ledger: dict[int, dict[str, list[float]]],
    line: int,
    model: str,
    answer: Answer,
    spent: float | None,
    seconds: float,
) -> None:
    """One reply in a row's ledger (a cached one costs nothing and takes no time)."""
    entry = ledger.setdefault(line, {}).setdefault(model, [0, 0, 0, 0.0, 0.0])
    entry[0] += 1
    entry[1] += answer.prompt_tokens
    entry[2] += answer.completion_tokens
    if spent is not None:
        entry[3] += spent
        entry[4] += seconds


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
