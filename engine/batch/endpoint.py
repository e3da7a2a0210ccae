"""``BatchEndpoint``: a model whose requests go through its provider's Batch API.

``complete`` enqueues the request and waits for its line to come back. One loop per
model submits the queue as a batch when it holds ``max_requests`` or ``max_bytes``,
when no row in flight can add to it (every row waits on a batch: ``BatchRun.stalled``),
or once its oldest request waited ``flush_s``; at most ``max_batches`` run at once.
The loop runs on events, not a timer: it sleeps until the next poll, the flush deadline
or a wake-up (a request queued, the queue full, the run stalled: ``BatchRun.changed``,
which the runner calls when a row ends or its input runs out).
Running batches are polled every ``poll_s``; a finished one's output and error files
are read line by line, each line waking its row (which journals the reply, as for an
online one). A line in the error file, or one its batch ended without, is asked again
in a later batch up to ``max_retries`` (a permanent 4xx fails its row at once).

Durability (``engine.batch.log``): the uploaded file's id is journaled before its batch
is created, the batch's id right after. On resume every batch not done is attached
again (found by its ``metadata`` when the kill fell between create and journal, created
from the journaled file when it was never created), and a row asking for a request one
of them holds waits for that batch instead of sending it again.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import math
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

import aiohttp
import anyio
import orjson
from anyio.abc import TaskGroup

from engine.batch.api import BatchApi
from engine.batch.lines import (
    TERMINAL,
    Result,
    custom_id,
    input_line,
    left_over,
    read_result,
    request_base,
    split_id,
)
from engine.batch.log import BatchLog, replay
from engine.batch.settings import BatchSettings
from engine.errors import ModelError
from engine.http.client import USER_AGENT, parse_completion
from engine.http.endpoint import Completion, EndpointStatistics, Messages, asker
from engine.http.reasoning import Dialect
from engine.http.settings import HttpSettings
from engine.stats import ModelStats

RUN_KEY, MODEL_KEY, SEQ_KEY = "turnstile_run", "turnstile_model", "turnstile_seq"


class RowGauge(Protocol):
    """What the runner tells its batch models about the rows."""

    def rows(self) -> int:
        """Rows that may still ask a model: those working, or about to start."""
        ...

    def requests(self) -> int:
        """Requests in flight, every model's."""
        ...

    def stopping(self) -> bool:
        """Whether the run was told to stop (its rows are cancelled, not finished)."""
        ...


class BatchRun:
    """What a run's batch models share: its fingerprint, and who waits on them.

    The runner calls ``changed`` when a row ends and when its input runs out: with
    the requests each model queues, those are the only things that can make the run
    ``stalled``, so the models' loops sleep until one happens instead of checking.
    """

    def __init__(self, fingerprint: str) -> None:
        self.fingerprint = fingerprint
        self.gauge: RowGauge | None = None  # None: only size and flush_s submit
        self.waiting = 0  # requests waiting in a batch model
        self.lines: Counter[int] = Counter()  # rows waiting, by line
        # Rows finished before this run: a result of an earlier run's batch for one of
        # them will never be asked for (the batch is done without it).
        self.finished: Container[int] = ()
        self._wakes: list[Callable[[], None]] = []  # each batch model's loop

    def stalled(self) -> bool:
        """Whether no row can add a request: every one waits on a batch."""
        gauge = self.gauge
        if gauge is None or self.waiting < gauge.requests():
            return False
        return len(self.lines) >= gauge.rows()

    def changed(self) -> None:
        """A row ended, a row asked a batch model, or the input ran out: wake the
        models' loops if no row can add a request any more."""
        if self.waiting and self.stalled():
            for wake in self._wakes:
                wake()

    def ended_cleanly(self) -> bool:
        """Whether the run's rows all finished: none stopped, none left to start."""
        gauge = self.gauge
        return gauge is not None and not gauge.stopping() and gauge.rows() == 0


def run_fingerprint(fields: Mapping[str, Any], checkpoint_dir: Path) -> str:
    """The run's name in batch metadata: its config's fingerprint and checkpoint folder."""
    data = orjson.dumps(fields, option=orjson.OPT_SORT_KEYS) + str(checkpoint_dir).encode()
    return hashlib.blake2b(data, digest_size=12).hexdigest()


def should_submit(
    queued: int,
    queued_bytes: int,
    waited_s: float,
    running: int,
    batch: BatchSettings,
    *,
    stalled: bool,
) -> bool:
    """Whether to submit the queue now. Pure."""
    if queued == 0 or running >= batch.max_batches:
        return False
    if queued >= batch.max_requests or queued_bytes >= batch.max_bytes:
        return True
    return stalled or waited_s >= batch.flush_s


def next_wake(
    now: float,
    queued: int,
    oldest: float,
    running: int,
    polls: list[float],
    retry_at: float,
    batch: BatchSettings,
    *,
    ready: bool,
) -> float | None:
    """When the loop must look again if nothing wakes it (None: only a wake-up). Pure.

    ``ready``: the queue would go now but for ``retry_at`` (it is full, or the run is
    stalled). Called after ``should_submit`` said no, with the same values.
    """
    times = list(polls)
    if queued and running < batch.max_batches:
        at = now if ready else oldest + batch.flush_s
        times.append(max(at, retry_at))
    return min(times, default=None)


@dataclass(slots=True)
class BatchState:
    """One batch of the model, as last polled."""

    seq: int
    file_id: str
    batch_id: str
    cids: tuple[str, ...]  # its lines' custom ids (until it is collected)
    status: str = "validating"
    completed: int = 0
    failed: int = 0
    total: int = 0
    created_at: float = 0.0  # the provider's, wall seconds
    next_poll: float = 0.0
    held: int = 0  # lines read back that no row has asked for yet
    collected: bool = False  # its output and error files were read
    done: bool = False  # its "done" record was written
    extra: dict[str, Any] = field(default_factory=dict)


class BatchEndpoint:
    """A ``ModelEndpoint`` on a provider's Batch API (see the module's docstring)."""

    def __init__(
        self,
        settings: HttpSettings,
        batch: BatchSettings,
        stats: ModelStats | None,
        *,
        log: BatchLog,
        run: BatchRun,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.batch = batch
        if stats is None:
            stats = ModelStats(name=settings.name, cap=batch.max_requests)
        stats.batch = True
        self.stats = stats
        self._log = log
        self._run = run
        self._clock = clock
        self._body: dict[str, Any] = {**settings.params, "model": settings.model}
        self._dialect = Dialect(settings.reasoning, *settings.reasoning_tags)
        # Requests not yet in a batch: (custom id, input line). Nothing else is kept for
        # a row waiting on a batch than its line while queued and its future (below):
        # the row's own coroutine holds its messages for a retry.
        self._queue: deque[tuple[str, bytes]] = deque()
        self._queued_bytes = 0
        self._oldest = 0.0
        self._gone = 0  # rows cancelled since the queue was last swept of theirs
        self._waiters: dict[str, asyncio.Future[Result]] = {}  # custom id -> its row
        self._known: dict[str, str] = {}  # base -> custom id, in a batch of an earlier run
        # base -> a result read before its row asked, and its batch
        self._held: dict[str, tuple[Result, BatchState]] = {}
        self._batches: dict[str, BatchState] = {}  # running or being read
        self._closing: list[BatchState] = []  # every line handed over: "done" to write
        self.finished: list[BatchState] = []
        self._seq = 0
        self._anon = itertools.count()
        self._wake = anyio.Event()
        self.passes = 0  # the loop's passes: one per wake-up or deadline, never a timer
        self._retry_at = 0.0
        self._session: aiohttp.ClientSession | None = None
        self._group: TaskGroup | None = None
        self._down: ModelError | None = None
        self.api: BatchApi | None = None

    # -- the seam ---------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.settings.timeout_s),
            headers={"User-Agent": USER_AGENT},
        )
        self.api = BatchApi(self._session, self.settings.base_urls[0], self.settings.api_key)
        try:
            await self._reattach()
        except BaseException:
            await self._session.close()
            raise
        self._group = anyio.create_task_group()
        await self._group.__aenter__()
        self._group.start_soon(self._loop)
        self._run._wakes.append(self._wake_up)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        group, self._group = self._group, None
        if self._wake_up in self._run._wakes:
            self._run._wakes.remove(self._wake_up)
        if group is not None:
            group.cancel_scope.cancel()
            await group.__aexit__(None, None, None)
        if exc_type is None:
            clean = self._run.ended_cleanly()
            with anyio.CancelScope(shield=True):
                for state in self.finished:
                    # Lines still held at a clean end belong to rows that finished without
                    # asking for them (replayed from the journal after a kill): none will.
                    if state.collected and not state.done and (not state.held or clean):
                        await self._done(state)
        running = [b.batch_id for b in self._batches.values() if b.status not in TERMINAL]
        if running:
            print(
                f"models.{self.settings.name}: {len(running)} batch(es) left running "
                f"(paid for; the next run collects them, `turnstile cancel` cancels them): "
                + ", ".join(running),
                file=sys.stderr,
                flush=True,
            )
        if self._session is not None:
            with anyio.CancelScope(shield=True):
                await self._session.close()

    async def probe(self) -> list[str]:
        return []  # a batch model is reached when its first batch is uploaded

    def set_share(self, cap: int | None) -> None:
        self.stats.limit = cap

    def down_from_start(self) -> None:
        self._down = ModelError(
            f"models.{self.settings.name}: down", retryable=False, model_down=True
        )

    def statistics(self) -> EndpointStatistics:
        return EndpointStatistics.of(self.stats, live=1, down=self._down is not None)

    def batches(self) -> list[BatchState]:
        """The model's batches this run: running, then finished (a copy of the list)."""
        return [*self._batches.values(), *self.finished]

    async def complete(
        self,
        messages: Messages,
        extra: Mapping[str, Any] | None = None,
        *,
        prefer: int | None = None,
    ) -> Completion:
        if self._down is not None:
            raise self._down
        tag = asker.get()
        if tag is not None:
            line: int | None = tag[0]
            base = request_base(tag[0], tag[1])
        else:
            line, base = None, f"q{next(self._anon)}"
        attempt, charged = 0, 0
        started = time.perf_counter()
        run, stats = self._run, self.stats
        while True:
            # Awaited here, not in a helper coroutine: a row waiting on a batch holds one
            # frame fewer (rows in flight are counted in tens of thousands).
            result = self._held_result(base)
            if result is None:
                cid, future = self._wait(base, attempt, messages, extra)
                run.waiting += 1
                if line is not None:
                    run.lines[line] += 1
                stats.in_flight += 1
                stats.requests += 1
                run.changed()  # the last row to wait: the queue goes now
                try:
                    result = await future
                finally:
                    stats.in_flight -= 1
                    run.waiting -= 1
                    if line is not None:
                        run.lines[line] -= 1
                        if not run.lines[line]:
                            del run.lines[line]
                    if not future.done() or future.cancelled():  # the row was cancelled
                        self._forget(cid, future)
            if result.body is not None:
                return self._completed(result.body, started)
            if not result.retryable:
                stats.failures += 1
                raise ModelError(result.error, retryable=False)
            if result.charged:
                charged += 1
                if charged > self.settings.max_retries:
                    stats.failures += 1
                    raise ModelError(
                        f"{result.error} (given up after {charged} tries)", retryable=False
                    )
                stats.retries += 1
            else:
                stats.resent += 1
            attempt = split_id(result.custom_id)[1] + 1

    # -- requests -----------------------------------------------------------------------
    def _held_result(self, base: str) -> Result | None:
        """The result of ``base`` read before its row asked (a batch of an earlier run)."""
        held = self._held.pop(base, None)
        if held is None:
            return None
        result, state = held
        state.held -= 1
        if not state.held and state.collected:
            self._closing.append(state)  # its last held line was the one still owed
            self._wake.set()
        return result

    def _wait(
        self, base: str, attempt: int, messages: Messages, extra: Mapping[str, Any] | None
    ) -> tuple[str, asyncio.Future[Result]]:
        """The request's custom id and the future its result comes in: in a batch of an
        earlier run, or queued now (its input line is all that is kept of it)."""
        cid = self._known.pop(base, None)
        if cid is None:
            cid = custom_id(base, attempt)
            body = {**self._body, **extra} if extra else dict(self._body)
            body["messages"] = messages
            raw = input_line(cid, body)
            queue = self._queue
            queue.append((cid, raw))
            self._queued_bytes += len(raw)
            if len(queue) == 1:
                self._oldest = self._clock()
                self._wake.set()  # a flush deadline to keep
            elif len(queue) >= self.batch.max_requests or (
                self._queued_bytes >= self.batch.max_bytes
            ):
                self._wake.set()
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiters[cid] = future
        return cid, future

    def _forget(self, cid: str, future: asyncio.Future[Result]) -> None:
        """A cancelled row's request: its line leaves the queue; a result for it read
        later is held (a later run's row asks for it again)."""
        if self._waiters.get(cid) is future:
            del self._waiters[cid]
        self._gone += 1
        self._wake.set()

    def _completed(self, body: bytes, started: float) -> Completion:
        try:
            completion = parse_completion(body, dialect=self._dialect)
        except ModelError as exc:
            self.stats.failures += 1
            raise ModelError(str(exc), retryable=False) from exc
        completion.latency_s = time.perf_counter() - started
        stats = self.stats
        stats.ok += 1
        stats.prompt_tokens += completion.prompt_tokens
        stats.completion_tokens += completion.completion_tokens
        stats.reasoning_tokens += completion.reasoning_tokens
        stats.latency.add(completion.latency_s)
        return completion

    # -- the loop -----------------------------------------------------------------------
    def _wake_up(self) -> None:
        self._wake.set()

    async def _loop(self) -> None:
        """Submit and poll; between, sleep until the next poll, the queue's flush
        deadline or a wake-up (a request queued, the queue full, the run stalled)."""
        batch = self.batch
        while True:
            self.passes += 1
            self._wake = anyio.Event()  # a wake-up from here on is seen
            while self._closing:
                await self._done(self._closing.pop())
            if self._gone:
                self._drop_cancelled()
            now = self._clock()
            queued = len(self._queue)
            stalled = queued > 0 and self._run.stalled()
            if now >= self._retry_at and should_submit(
                queued,
                self._queued_bytes,
                now - self._oldest,
                len(self._batches),
                batch,
                stalled=stalled,
            ):
                await self._submit()
                continue
            due = [state for state in self._batches.values() if state.next_poll <= now]
            for state in due:
                await self._poll(state)
            if due:
                continue  # a batch may have ended: room for the queue, rows going on
            full = queued >= batch.max_requests or self._queued_bytes >= batch.max_bytes
            wake_at = next_wake(
                now,
                queued,
                self._oldest,
                len(self._batches),
                [state.next_poll for state in self._batches.values()],
                self._retry_at,
                batch,
                ready=full or stalled,
            )
            delay = math.inf if wake_at is None else max(0.0, wake_at - self._clock())
            with anyio.move_on_after(delay):
                await self._wake.wait()

    def _drop_cancelled(self) -> None:
        """Take the lines of cancelled rows out of the queue."""
        self._gone = 0
        waiters = self._waiters
        kept = deque(item for item in self._queue if item[0] in waiters)
        if len(kept) != len(self._queue):
            self._queue = kept
            self._queued_bytes = sum(len(raw) for _, raw in kept)
            if kept:
                self._oldest = min(self._oldest, self._clock())

    def _take(self) -> list[tuple[str, bytes]]:
        taken: list[tuple[str, bytes]] = []
        size = 0
        queue = self._queue
        while queue and len(taken) < self.batch.max_requests:
            item = queue[0]
            if taken and size + len(item[1]) > self.batch.max_bytes:
                break
            queue.popleft()
            taken.append(item)
            size += len(item[1])
        self._queued_bytes -= size
        self._oldest = self._clock()
        return taken

    async def _submit(self) -> None:
        api = self.api
        assert api is not None
        taken = self._take()
        seq = self._seq
        data = b"".join(raw for _, raw in taken)
        try:
            file_id = await api.upload(data, f"turnstile-{self.settings.name}-{seq}.jsonl")
        except ModelError as exc:
            self._queue.extendleft(reversed(taken))
            self._queued_bytes += len(data)
            self._failed_call(exc)
            return
        self._seq += 1
        cids = tuple(cid for cid, _ in taken)
        del taken, data  # uploaded: the lines are the provider's now
        await self._log.record({"k": "file", "seq": seq, "file": file_id})
        await self._create(seq, file_id, cids)

    async def _create(self, seq: int, file_id: str, cids: tuple[str, ...]) -> None:
        api = self.api
        assert api is not None
        metadata = {
            RUN_KEY: self._run.fingerprint,
            MODEL_KEY: self.settings.name,
            SEQ_KEY: str(seq),
        }
        while True:
            try:
                batch = await api.create(file_id, self.batch.completion_window, metadata)
                break
            except ModelError as exc:
                if not exc.retryable:
                    self._fail_all(exc)
                    return
                await anyio.sleep(self.batch.poll_s)
        await self._log.record(_batch_record(seq, file_id, batch))
        self._track(seq, file_id, batch, cids)

    def _track(
        self,
        seq: int,
        file_id: str,
        batch: dict[str, Any],
        cids: tuple[str, ...],
        *,
        attached: bool = False,
    ) -> None:
        state = BatchState(seq, file_id, str(batch["id"]), cids)
        self._update(state, batch)
        state.next_poll = self._clock() + self.batch.poll_s
        self._batches[state.batch_id] = state
        stats = self.stats
        stats.batches_running += 1
        if attached:
            stats.batches_attached += 1
        else:
            stats.batches_submitted += 1

    def _failed_call(self, exc: ModelError) -> None:
        if exc.retryable:
            self._retry_at = self._clock() + self.batch.poll_s
            return
        self._fail_all(exc)

    def _fail_all(self, exc: ModelError) -> None:
        """The provider refuses the model's batches (a bad key, a wrong URL): it is down."""
        self._down = ModelError(
            f"models.{self.settings.name}: the Batch API refused: {exc}",
            retryable=False,
            model_down=True,
            fix="check base_url and api_key_env",
        )
        for cid, _ in self._queue:
            future = self._waiters.pop(cid, None)
            if future is not None and not future.done():
                future.set_result(Result(cid, None, str(exc), retryable=False))
        self._queue.clear()
        self._queued_bytes = 0

    @staticmethod
    def _update(state: BatchState, batch: Mapping[str, Any]) -> None:
        state.status = str(batch.get("status") or state.status)
        counts = batch.get("request_counts") or {}
        state.completed = int(counts.get("completed") or 0)
        state.failed = int(counts.get("failed") or 0)
        state.total = int(counts.get("total") or state.total)
        state.created_at = float(batch.get("created_at") or state.created_at)
        state.extra = {k: batch.get(k) for k in ("output_file_id", "error_file_id") if batch.get(k)}

    async def _poll(self, state: BatchState) -> None:
        api = self.api
        assert api is not None
        try:
            batch = await api.get(state.batch_id)
        except ModelError:
            state.next_poll = self._clock() + self.batch.poll_s
            return
        self._update(state, batch)
        if state.status not in TERMINAL:
            state.next_poll = self._clock() + self.batch.poll_s
            return
        try:
            await self._collect(state)
        except ModelError:
            state.next_poll = self._clock() + self.batch.poll_s  # read it again later
            return
        del self._batches[state.batch_id]
        self.finished.append(state)
        self.stats.batches_running -= 1
        self.stats.batches_done += 1
        state.collected = True
        if not state.held:
            await self._done(state)

    async def _done(self, state: BatchState) -> None:
        """Every line of ``state`` is accounted for: it need not be read again."""
        state.done = True
        await self._log.record(
            {
                "k": "done",
                "batch": state.batch_id,
                "status": state.status,
                "completed": state.completed,
                "failed": state.failed,
                "total": state.total,
            }
        )

    async def _collect(self, state: BatchState) -> None:
        """Read a finished batch's files, each line handed over as it is read."""
        api = self.api
        assert api is not None
        pending = set(state.cids)
        for key in ("output_file_id", "error_file_id"):
            file_id = state.extra.get(key)
            if not file_id:
                continue
            async for raw in api.lines(str(file_id)):
                result = read_result(raw)
                if result is not None and result.custom_id in pending:
                    pending.discard(result.custom_id)
                    self._deliver(state, result)
        for cid in pending:
            self._deliver(state, left_over(cid, state.batch_id, state.status))
        state.cids = ()

    def _deliver(self, state: BatchState, result: Result) -> None:
        future = self._waiters.pop(result.custom_id, None)
        if future is not None and not future.done():
            future.set_result(result)
            return
        base = split_id(result.custom_id)[0]
        self._known.pop(base, None)
        line = _line_of(base)
        if line is not None and line in self._run.finished:
            return  # its row finished in an earlier run: accounted for
        self._held[base] = (result, state)
        state.held += 1

    # -- resume -------------------------------------------------------------------------
    async def _reattach(self) -> None:
        """Attach the batches earlier runs left (see the module's docstring)."""
        api = self.api
        assert api is not None
        state = replay(self._log.replay())
        self._seq = state.next_seq
        if state.files:
            found: dict[int, dict[str, Any]] = {}
            async for batch in api.batches():
                meta = batch.get("metadata") or {}
                if (
                    meta.get(RUN_KEY) == self._run.fingerprint
                    and meta.get(MODEL_KEY) == self.settings.name
                ):
                    seq = int(meta.get(SEQ_KEY, -1))
                    if seq in state.files and seq not in found:
                        found[seq] = batch
            for seq, file_id in sorted(state.files.items()):
                cids = await self._cids(file_id)
                if seq in found:
                    batch = found[seq]
                    await self._log.record(_batch_record(seq, file_id, batch))
                    self._track(seq, file_id, batch, cids, attached=True)
                else:
                    await self._create(seq, file_id, cids)
        for seq, (file_id, batch_id) in sorted(state.batches.items()):
            batch = await api.get(batch_id)
            self._track(seq, file_id, batch, await self._cids(file_id), attached=True)
        for batch_state in self._batches.values():
            batch_state.next_poll = 0.0
            for cid in batch_state.cids:
                self._known[split_id(cid)[0]] = cid

    async def _cids(self, file_id: str) -> tuple[str, ...]:
        api = self.api
        assert api is not None
        cids = []
        async for raw in api.lines(file_id):
            cids.append(str(orjson.loads(raw)["custom_id"]))
        return tuple(cids)


def _batch_record(seq: int, file_id: str, batch: Mapping[str, Any]) -> dict[str, Any]:
    """The log record of a created batch, with what the provider said of it then."""
    counts = batch.get("request_counts") or {}
    return {
        "k": "batch",
        "seq": seq,
        "file": file_id,
        "batch": batch["id"],
        "status": batch.get("status"),
        "total": counts.get("total"),
        "created_at": batch.get("created_at"),
    }


def _line_of(base: str) -> int | None:
    """The input line a custom id's base names (None for a request no row asked)."""
    head = base.partition(".")[0]
    return int(head) if head.isdigit() else None
