"""``BatchEndpoint``: a model whose requests go through its provider's Batch API.

``complete`` enqueues the request and waits for its line to come back. One loop per
model submits the queue as a batch when it holds ``max_requests`` or ``max_bytes``,
when no row in flight can add to it (every row waits on a batch: ``BatchRun.stalled``),
or once its oldest request waited ``flush_s``; at most ``max_batches`` run at once.
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

import hashlib
import itertools
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
from engine.http.client import parse_completion
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


class BatchRun:
    """What a run's batch models share: its fingerprint, and who waits on them."""

    def __init__(self, fingerprint: str) -> None:
        self.fingerprint = fingerprint
        self.gauge: RowGauge | None = None  # None: only size and flush_s submit
        self.waiting = 0  # requests waiting in a batch model
        self.lines: Counter[int] = Counter()  # rows waiting, by line
        # Rows finished before this run: a result of an earlier run's batch for one of
        # them will never be asked for (the batch is done without it).
        self.finished: Container[int] = ()

    def stalled(self) -> bool:
        """Whether no row can add a request: every one waits on a batch."""
        gauge = self.gauge
        if gauge is None or self.waiting < gauge.requests():
            return False
        return len(self.lines) >= gauge.rows()


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


class _Waiter:
    __slots__ = ("event", "line", "result")

    def __init__(self, line: int | None) -> None:
        self.event = anyio.Event()
        self.result: Result | None = None
        self.line = line


@dataclass(slots=True)
class BatchState:
    """One batch of the model, as last polled."""

    seq: int
    file_id: str
    batch_id: str
    cids: set[str]
    status: str = "validating"
    completed: int = 0
    failed: int = 0
    total: int = 0
    created_at: float = 0.0  # the provider's, wall seconds
    next_poll: float = 0.0
    held: int = 0  # lines read back that no row has asked for yet
    collected: bool = False  # its output and error files were read
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
        self._queue: deque[tuple[str, bytes, _Waiter]] = deque()
        self._queued_bytes = 0
        self._oldest = 0.0
        self._waiters: dict[str, _Waiter] = {}  # submitted, awaited
        self._known: dict[str, str] = {}  # base -> custom id, in a batch of an earlier run
        # base -> a result read before its row asked, and its batch
        self._held: dict[str, tuple[Result, BatchState]] = {}
        self._batches: dict[str, BatchState] = {}  # running or being read
        self.finished: list[BatchState] = []
        self._seq = 0
        self._anon = itertools.count()
        self._wake = anyio.Event()
        self._retry_at = 0.0
        self._session: aiohttp.ClientSession | None = None
        self._group: TaskGroup | None = None
        self._down: ModelError | None = None
        self.api: BatchApi | None = None

    # -- the seam ---------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.settings.timeout_s)
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
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        group, self._group = self._group, None
        if group is not None:
            group.cancel_scope.cancel()
            await group.__aexit__(None, None, None)
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
        body = {**self._body, **extra} if extra else dict(self._body)
        body["messages"] = messages
        attempt, charged = 0, 0
        started = time.perf_counter()
        while True:
            result = await self._result(base, attempt, body, line)
            if result.body is not None:
                return self._completed(result.body, started)
            if not result.retryable:
                self.stats.failures += 1
                raise ModelError(result.error, retryable=False)
            if result.charged:
                charged += 1
                if charged > self.settings.max_retries:
                    self.stats.failures += 1
                    raise ModelError(
                        f"{result.error} (given up after {charged} tries)", retryable=False
                    )
                self.stats.retries += 1
            else:
                self.stats.resent += 1
            attempt = split_id(result.custom_id)[1] + 1

    # -- requests -----------------------------------------------------------------------
    async def _result(
        self, base: str, attempt: int, body: dict[str, Any], line: int | None
    ) -> Result:
        held = self._held.pop(base, None)
        if held is not None:
            result, state = held
            state.held -= 1
            if not state.held and state.collected:
                await self._done(state)  # its last held line was the one still owed
            return result
        known = self._known.pop(base, None)
        waiter = _Waiter(line)
        if known is not None:
            self._waiters[known] = waiter
        else:
            cid = custom_id(base, attempt)
            raw = input_line(cid, body)
            if not self._queue:
                self._oldest = self._clock()
            self._queue.append((cid, raw, waiter))
            self._queued_bytes += len(raw)
            self._wake.set()
        run = self._run
        run.waiting += 1
        if line is not None:
            run.lines[line] += 1
        self.stats.in_flight += 1
        self.stats.requests += 1
        try:
            await waiter.event.wait()
        finally:
            self.stats.in_flight -= 1
            run.waiting -= 1
            if line is not None:
                run.lines[line] -= 1
                if not run.lines[line]:
                    del run.lines[line]
            if waiter.result is None:
                waiter.line = -1  # cancelled: the loop drops it from the queue
        self._wake.set()
        assert waiter.result is not None
        return waiter.result

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
    async def _loop(self) -> None:
        tick = min(self.batch.poll_s, self.batch.flush_s, 0.05)
        while True:
            now = self._clock()
            self._drop_cancelled()
            if now >= self._retry_at and should_submit(
                len(self._queue),
                self._queued_bytes,
                now - self._oldest,
                len(self._batches),
                self.batch,
                stalled=self._run.stalled(),
            ):
                await self._submit()
                continue
            for state in list(self._batches.values()):
                if state.next_poll <= now:
                    await self._poll(state)
            self._wake = anyio.Event()
            with anyio.move_on_after(tick):
                await self._wake.wait()

    def _drop_cancelled(self) -> None:
        if any(w.line == -1 for _, _, w in self._queue):
            kept = deque(item for item in self._queue if item[2].line != -1)
            self._queue = kept
            self._queued_bytes = sum(len(raw) for _, raw, _ in kept)
            if kept:
                self._oldest = min(self._oldest, self._clock())

    def _take(self) -> list[tuple[str, bytes, _Waiter]]:
        taken: list[tuple[str, bytes, _Waiter]] = []
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
        data = b"".join(raw for _, raw, _ in taken)
        try:
            file_id = await api.upload(data, f"turnstile-{self.settings.name}-{seq}.jsonl")
        except ModelError as exc:
            self._queue.extendleft(reversed(taken))
            self._queued_bytes += len(data)
            self._failed_call(exc, taken)
            return
        self._seq += 1
        await self._log.record({"k": "file", "seq": seq, "file": file_id})
        for cid, _, waiter in taken:
            self._waiters[cid] = waiter
        await self._create(seq, file_id, {cid for cid, _, _ in taken})

    async def _create(self, seq: int, file_id: str, cids: set[str]) -> None:
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
        cids: set[str],
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

    def _failed_call(self, exc: ModelError, taken: list[tuple[str, bytes, _Waiter]]) -> None:
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
        for _, _, waiter in self._queue:
            self._deliver_to(waiter, Result("", None, str(exc), retryable=False))
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
        state.cids = set()

    def _deliver(self, state: BatchState, result: Result) -> None:
        waiter = self._waiters.pop(result.custom_id, None)
        if waiter is not None and waiter.line != -1:
            self._deliver_to(waiter, result)
            return
        base = split_id(result.custom_id)[0]
        self._known.pop(base, None)
        line = _line_of(base)
        if line is not None and line in self._run.finished:
            return  # its row finished in an earlier run: accounted for
        self._held[base] = (result, state)
        state.held += 1

    @staticmethod
    def _deliver_to(waiter: _Waiter, result: Result) -> None:
        waiter.result = result
        waiter.event.set()

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

    async def _cids(self, file_id: str) -> set[str]:
        api = self.api
        assert api is not None
        cids = set()
        async for raw in api.lines(file_id):
            cids.add(str(orjson.loads(raw)["custom_id"]))
        return cids


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
