"""One run, whatever its task: checkpoint, writer, model clients, workers, signals.

The task (distillation, preference) decides what to do with one input row; this
module owns everything around it. One task group owns every task: the writer,
the progress display, the signal watcher, and (in an inner group that a stop
request can cancel) the input reader and a fixed pool of row workers. No batch
barriers: a worker moves its row forward the moment a reply lands.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from engine import progress
from engine.checkpoint.checkpoint import Checkpoint
from engine.checkpoint.journal import Replay
from engine.checkpoint.manifest import Locks, clear_checkpoint, has_checksums, open_manifest
from engine.checkpoint.paths import clashes, run_targets
from engine.checkpoint.snapshotter import SNAPSHOT_EVERY_ROWS
from engine.checkpoint.writer import Writer
from engine.config import ModelConfig, RunConfig
from engine.cost import Budget
from engine.endpoints import model_endpoint
from engine.errors import BudgetReached, CheckpointError, InputError, ModelDown, TurnstileError
from engine.history import History, run_id
from engine.http.endpoint import ModelEndpoint
from engine.input.sources import Marks, Resume, Row, Source, open_source
from engine.stats import ModelStats, Outcome, RunStats
from engine.tasks.base import Context, Task, rows_in_flight

if TYPE_CHECKING:
    from engine.batch.endpoint import BatchRun
    from engine.cache.store import ReplyCache

log = logging.getLogger("turnstile")
T = TypeVar("T")


class Companion(Protocol):
    """Something that runs beside a run: started before its first request, with its
    model clients and counters, then run until the run ends (cancelled there)."""

    async def start(self, clients: dict[str, ModelEndpoint], stats: RunStats) -> None: ...

    async def run(self) -> None: ...


def run_loop(main: Callable[[], Awaitable[T]], *, uvloop: bool) -> T:
    """Run ``main`` to its end on a new event loop: uvloop when asked and installed."""
    use = uvloop and importlib.util.find_spec("uvloop") is not None
    return anyio.run(main, backend="asyncio", backend_options={"use_uvloop": use})


def prepare(
    config: RunConfig, *, fresh: bool, known_input: dict[str, Any] | None = None
) -> tuple[Locks, Replay, bool, Source]:
    """Lock the checkpoint, check or write its manifest, and replay its journal.

    Blocking (runs before the event loop does any network work). Returns the
    locks (the checkpoint's and the output's: keep them until the run ends, then
    close), the replay, whether this resumes a run, and the input's source (the
    run's one: pass it to :func:`execute`).
    ``known_input`` is the input's fingerprint as the manifest stores it, when the
    caller has it (a shard: the driver hashed the input once for every shard).
    """
    if not config.input.exists():
        raise InputError(f"input {config.input} does not exist; check input: in the config")
    # An unusable folder, a missing extra or a mapped column the input lacks: exit 2.
    source = open_source(config.input, config.input_columns)
    source.check()
    check_targets(config)  # before anything is written or deleted
    checkpoint = Checkpoint.of(config)
    lock = checkpoint.lock()
    try:
        probe_targets(config)
        if fresh:
            clear_checkpoint(config)
        manifest = checkpoint.manifest
        if manifest is None:
            _refuse_foreign_output(config)
        resumed, _ = open_manifest(config, source, manifest, known_input)
        # The snapshot and the journal after it: the same state as the whole journal.
        state = checkpoint.state(strict=manifest is None or has_checksums(manifest))
    except BaseException:
        lock.close()
        raise
    return lock, state, resumed, source


def check_targets(config: RunConfig) -> None:
    """Refuse output files that are the input, inside the checkpoint, or folders.

    The config's own check, again, for a RunConfig made in code; a shard's rows
    live in its checkpoint folder by design.
    """
    targets = run_targets(config.output, config.failed_output, config.filtered_output)
    checkpoint_dir = None if config.piece is not None else config.checkpoint_dir
    problems = clashes(targets, input=config.input, checkpoint_dir=checkpoint_dir, config_file=None)
    if problems:
        raise CheckpointError(f"output: {problems[0]}")
    for what, path in targets:
        if path.is_dir():
            raise CheckpointError(
                f"output: {what} {path} is a folder; set output: to a file path "
                f"(such as {path / 'out.jsonl'}), or move the folder away"
            )


def probe_targets(config: RunConfig) -> None:
    """Open the output files for appending (as the writer will), so that an unwritable
    folder is a clear refusal now, before --fresh deletes anything or a request is sent."""
    for what, path in run_targets(config.output, config.failed_output, config.filtered_output):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644))
        except OSError as exc:
            raise CheckpointError(
                f"output: {what} {path} cannot be written ({exc.strerror}); make "
                f"{path.parent} writable, or set output: to a path in a writable folder"
            ) from exc


def announce(config: RunConfig, state: Replay, *, resumed: bool) -> None:
    """Log what a run is about to do: start, or resume how far along."""
    if resumed:
        log.info(
            f"resuming {config.checkpoint_dir}: {len(state.done)} rows finished, "
            f"{len(state.partial)} in progress ({state.work_records} replies journaled)"
        )
    else:
        log.info(f"starting {config.checkpoint_dir}: {config.input} -> {config.output}")


def _refuse_foreign_output(config: RunConfig) -> None:
    for path in (config.output, config.failed_output, config.filtered_output):
        if _size(path):
            raise CheckpointError(
                f"{path} already exists but {config.checkpoint_dir} holds no run for it; "
                "move it away, or run with --fresh to overwrite it"
            )


def _size(path: Any) -> int:
    try:
        return int(path.stat().st_size)
    except FileNotFoundError:
        return 0


async def execute(
    config: RunConfig,
    task: Task,
    state: Replay,
    *,
    source: Source,
    resumed: bool,
    display: progress.Display,
    open_local: Callable[..., Any] | None = None,
    signals: bool = False,
    companion: Companion | None = None,
    snapshot_every_rows: int = SNAPSHOT_EVERY_ROWS,
    checkpoint: Checkpoint | None = None,
    ledger: dict[int, dict[str, list[float]]] | None = None,
) -> Outcome:
    """Run every row not finished in ``state`` through ``task``.

    ``source`` is the run's input, as :func:`prepare` opened it. ``signals``
    installs SIGINT/SIGTERM handlers that stop the run gracefully (the CLI's; a
    library caller keeps its own, and cancellation stops the run).
    ``companion`` runs beside the run with its clients and counters (a shard's
    lease of its share of the caps, engine.executors). ``snapshot_every_rows``:
    rows between two checkpoint snapshots (tests take them often). ``checkpoint``
    builds the run's writer (default: the config's own, engine.checkpoint; the
    bench passes one whose writer writes nothing). ``ledger``: filled with what each
    row's replies took, per model (engine.estimate; Context.ledger).

    A TurnstileError from any task (disk full, a model down) stops the run and
    is raised as itself, not wrapped in an exception group.
    """
    try:
        return await _execute(
            config,
            task,
            state,
            source=source,
            resumed=resumed,
            display=display,
            open_local=open_local,
            signals=signals,
            companion=companion,
            snapshot_every_rows=snapshot_every_rows,
            checkpoint=checkpoint or Checkpoint.of(config),
            ledger=ledger,
        )
    except BaseExceptionGroup as group:
        error = _first_error(group)
        if error is None:
            raise
        raise error from group


def _first_error(group: BaseExceptionGroup[BaseException]) -> TurnstileError | None:
    for exc in group.exceptions:
        if isinstance(exc, TurnstileError):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = _first_error(exc)
            if found is not None:
                return found
    return None


async def _execute(
    config: RunConfig,
    task: Task,
    state: Replay,
    *,
    source: Source,
    resumed: bool,
    display: progress.Display,
    open_local: Callable[..., Any] | None,
    signals: bool,
    companion: Companion | None,
    snapshot_every_rows: int,
    checkpoint: Checkpoint,
    ledger: dict[int, dict[str, list[float]]] | None = None,
) -> Outcome:
    stats = RunStats(
        rows_done=len(state.done),
        rows_failed=state.rows_failed,
        rows_filtered=state.rows_filtered,
        rows_skipped=len(state.done),
        turn_rule=config.kind.progress_note(config.section),
    )
    started = time.monotonic()
    outcome = Outcome(stats=stats, elapsed_s=0.0, resumed=resumed)
    marks = Marks()  # where reading may resume, from the source to the snapshots
    writer = checkpoint.writer(  # on the loop: the writer's events belong to it
        state,
        config.journal,
        marks=marks,
        seek_base=config.piece.first_row if config.piece else 0,
        snapshot_every_rows=snapshot_every_rows,
    )
    # This run's history sampler, counting the lines earlier runs wrote.
    history = History(run_id(), writer.history_lines)
    async with AsyncExitStack() as stack:
        local_urls: dict[str, list[str]] = {}
        for group in local_servers(config):
            opener = open_local or _local_server()
            urls = []
            for replica in range(group.server.local.replicas):
                server = opener(group.server, config.checkpoint_dir, replica=replica)
                urls.append(await stack.enter_async_context(server))
            for name in group.members:
                local_urls[name] = urls
        clients: dict[str, ModelEndpoint] = {}
        batch_run = _batch_run(config, state)
        for name in sorted(config.models_used()):
            model = config.models[name]
            model_stats = ModelStats(name=name, cap=model.max_concurrency)
            stats.models[name] = model_stats
            clients[name] = await stack.enter_async_context(
                model_endpoint(
                    model,
                    model_stats,
                    base_urls=local_urls.get(name),
                    batch_run=batch_run,
                    checkpoint_dir=config.checkpoint_dir,
                )
            )
        cache = await _open_cache(config, stack)
        stored = cache is not None and await anyio.to_thread.run_sync(cache.store.holds_replies)
        await _probe_models(clients, task.optional_models(), cached=stored)
        budget = None
        if config.budget.on:
            # What every run of the checkpoint spent, summed from its journal (a SIGKILLed
            # run's paid replies included): the snapshot's spend plus the records after it.
            prices = {name: m.price for name, m in config.models.items()}
            budget = Budget(config.budget, prices, state.spent_usd, state.spent_tokens)
        if companion is not None:
            await companion.start(clients, stats)  # before any request: a shard's share
        work = anyio.CancelScope()  # around the row workers: cancelled to stop them
        ctx = Context(
            config=config,
            kind=config.kind,
            writer=writer,
            clients=clients,
            stats=stats,
            optional=task.optional_models(),
            scope=work,
            cache=cache,
            budget=budget,
            ledger=ledger,
        )
        workers = rows_in_flight(config, task)
        if config.piece is not None:  # a shard knows its rows: no more workers than those
            workers = max(1, min(workers, config.piece.rows))
        _tune_collector(stack)

        if config.metrics.port is not None:  # prometheus-client is imported only when asked for
            from engine.metrics import serving

            stack.enter_context(serving(config.metrics, lambda: stats))
        async with anyio.create_task_group() as outer:
            outer.start_soon(writer.run)
            outer.start_soon(_sample, history, stats, writer)
            outer.start_soon(_count_rows, config, source, stats)
            outer.start_soon(display.run, stats, started)
            if companion is not None:
                outer.start_soon(companion.run)
            if signals:
                outer.start_soon(_watch_signals, ctx, outcome, work, outer)
            with work:
                async with anyio.create_task_group() as inner:
                    send, receive = anyio.create_memory_object_stream[Row](workers)
                    pool = _Workers(inner, receive, workers, state, task, ctx)
                    if batch_run is not None:
                        batch_run.gauge = _RowGauge(ctx, workers, receive)
                        ctx.rows_changed = batch_run.changed  # its batch loops wake on it
                    # A fresh run skips nothing: an empty tuple spares each row a lookup.
                    resume = Resume(state.done if len(state.done) else (), state.seek, marks)
                    inner.start_soon(_feed, source.read(config.piece, resume), ctx, send, pool)
            writer.note(history.line(stats, time.time(), event="end"))
            await writer.close()
            outer.cancel_scope.cancel()
    outcome.elapsed_s = time.monotonic() - started
    if budget is not None:
        if budget.reached and outcome.interrupted_by is None:
            raise BudgetReached(budget.message(f"turnstile run {config.config_path}"))
    return outcome


def _batch_run(config: RunConfig, state: Replay) -> BatchRun | None:
    """The run's batch identity, when a model it uses has a ``batch:`` block (the batch
    endpoint and its modules are imported only then)."""
    if all(config.models[name].batch is None for name in config.models_used()):
        return None
    from engine.batch.endpoint import BatchRun, run_fingerprint

    batch_run = BatchRun(run_fingerprint(config.fingerprint_fields(), config.checkpoint_dir))
    batch_run.finished = state.done  # results for these rows are never asked for
    return batch_run


async def _open_cache(config: RunConfig, stack: AsyncExitStack) -> ReplyCache | None:
    """The run's reply cache, None when ``cache.dir`` is not set (engine.cache.store
    and sqlite3 are imported only when it is)."""
    if config.cache.dir is None:
        return None
    from engine.cache.store import open_cache

    cache: ReplyCache | None = await stack.enter_async_context(open_cache(config.cache))
    return cache


class _RowGauge:
    """What a run's batch models learn of its rows (engine.batch.endpoint.RowGauge)."""

    def __init__(self, ctx: Context, workers: int, receive: MemoryObjectReceiveStream[Row]):
        self._ctx = ctx
        self._workers = workers
        self._receive = receive

    def rows(self) -> int:
        stream = self._receive.statistics()
        if stream.open_send_streams:  # the feeder may hand out more: every worker may ask
            return self._workers
        return self._ctx.rows_working + stream.current_buffer_used

    def requests(self) -> int:
        return self._ctx.requests_in_flight

    def stopping(self) -> bool:
        return self._ctx.stopping


@dataclass(frozen=True, slots=True)
class LocalGroup:
    """One llama-server to start: its settings, and the models it serves."""

    server: ModelConfig
    members: tuple[str, ...]


async def _probe_models(
    clients: dict[str, ModelEndpoint], optional: frozenset[str], *, cached: bool = False
) -> None:
    """Check every replica answers before any row is touched.

    A replica that does not is taken out and probed (a warning names it). A model
    none of whose replicas answers stops the run at once (ModelDown), unless it is
    optional (a preference generator) and another optional one answers: then it
    is down from the start (its requests fail at once, its rows go on with the
    others' generations) and is used again once its probe finds it answering.

    ``cached``: the reply store (``cache.dir``) holds replies, so the run may need
    no model at all (a rerun the store answers whole): a model no replica of which
    answers is then an outage from the start instead (a warning names it): the
    store's replies are used, and a request the store cannot answer waits for the
    model as in any outage, the run stopping (resumable) after ``down_after_s``.
    """
    # All at once: a run of several models waits one round trip, not one per model.
    problems: dict[str, list[str]] = {}

    async def probe(name: str, client: ModelEndpoint) -> None:
        problems[name] = await client.probe()

    async with anyio.create_task_group() as group:
        for name, client in clients.items():
            group.start_soon(probe, name, client)
    dead: list[str] = []
    for name, client in clients.items():  # reported in the models' order
        for problem in problems[name]:
            log.warning(problem)
        if client.statistics().live == 0:
            dead.append(name)
    fatal = [name for name in dead if name not in optional]
    if optional and set(optional) <= set(dead):
        fatal = dead
    if fatal and not cached:
        urls = "; ".join(
            f"models.{name}: {', '.join(r.url for r in clients[name].statistics().replicas)}"
            for name in fatal
        )
        raise ModelDown(
            f"cannot reach {urls} (no replica answers); start the server or fix base_url"
        )
    for name in fatal:  # (the store holds replies: the run may need no model)
        log.warning(
            f"models.{name}: no replica answers; the run goes on with the replies in "
            "cache.dir, and a request they cannot answer waits for the model as in an "
            "outage (down_after_s), then the run stops, resumable"
        )
    for name in dead:
        if name in fatal:
            continue
        # Never answered in this run: nothing to wait for. Its generations are
        # recorded failed until a probe finds it answering.
        clients[name].down_from_start()
        log.warning(
            f"models.{name} is unreachable; the others go on without it, its generations "
            "are recorded as failed, and it is used again for later rows once it answers"
        )


def local_servers(config: RunConfig) -> list[LocalGroup]:
    """One llama-server per distinct set of local settings, shared by its models.

    Models with the same GGUF file and server settings (two generators at
    different temperatures and a judge, say) share a server whose slots are the
    sum of their caps; each keeps its own cap. The server's settings are the
    first member's (its log is named after it).
    """
    groups: dict[tuple[Any, ...], list[ModelConfig]] = {}
    for name in sorted(config.models_used()):
        model = config.models[name]
        if model.is_local:
            local = model.local
            key = (model.model_path, local.ctx_size, local.threads, local.port, local.replicas)
            groups.setdefault(key, []).append(model)
    servers = []
    for models in groups.values():
        first = models[0]
        slots = sum(m.local.parallel or m.max_concurrency for m in models)
        server = replace(first, max_concurrency=slots, local=replace(first.local, parallel=slots))
        servers.append(LocalGroup(server=server, members=tuple(m.name for m in models)))
    return servers


def _local_server() -> Callable[..., Any]:
    from engine.local.server import local_server

    opener: Callable[..., Any] = local_server
    return opener


class _Workers:
    """The row workers, started as rows arrive, up to ``most``.

    A worker is started only for a row that no idle worker is waiting for, so the
    workers never outnumber the rows read: a cap the input cannot fill (a
    ``max_concurrency`` of 100,000 for a file of 100 rows) starts 100 of them, not
    200,000. The pool holds the stream's first receiving end until the feeder is
    done, cloning it for each worker.

    The pool also counts the rows in the stream (``queued``): a feeder that found
    it full waits (``drained``) until the workers have taken half of it, then
    fills it again, one wake for half a stream of rows. Waiting in the stream's own
    ``send`` would wake it for every row a worker takes: at a few hundred rows a
    second, a pass of the loop and a trip through the input's generators each.
    """

    __slots__ = ("_args", "_group", "_low", "_receive", "_refill", "most", "queued", "started")

    def __init__(
        self,
        group: TaskGroup,
        receive: MemoryObjectReceiveStream[Row],
        most: int,
        state: Replay,
        task: Task,
        ctx: Context,
    ) -> None:
        self._group = group
        self._receive = receive
        self._args = (self, state, task, ctx)
        self.most = most
        self.started = 0
        self.queued = 0  # rows sent and not yet taken
        self._low = most // 2  # a full stream (``most`` rows) is refilled from here
        self._refill: asyncio.Event | None = None  # set when the feeder waits for room

    async def drained(self) -> None:
        """Wait until the workers have taken the stream down to half full."""
        refill = self._refill = asyncio.Event()
        await refill.wait()

    def took(self) -> None:
        """A worker took a row from the stream."""
        self.queued -= 1
        if self._refill is not None and self.queued <= self._low:
            self._refill.set()
            self._refill = None

    def want(self, send: MemoryObjectSendStream[Row]) -> None:
        """A row is about to be sent: start a worker for it unless one is waiting."""
        if self.started < self.most and send.statistics().tasks_waiting_receive == 0:
            self._group.start_soon(_work, self._receive.clone(), *self._args)
            self.started += 1

    def close(self) -> None:
        self._receive.close()


async def _feed(
    rows: AsyncIterator[Row],
    ctx: Context,
    send: MemoryObjectSendStream[Row],
    pool: _Workers,
) -> None:
    async with send:
        try:
            await _send_rows(rows, ctx, send, pool)
        finally:
            pool.close()
    if ctx.rows_changed is not None:
        ctx.rows_changed()  # the input ran out: the rows in flight may all wait on batches


async def _send_rows(
    rows: AsyncIterator[Row],
    ctx: Context,
    send: MemoryObjectSendStream[Row],
    pool: _Workers,
) -> None:
    want, most = pool.want, pool.most
    async for item in rows:
        if ctx.stopping:
            return
        if pool.started < most:
            want(send)
        try:
            # The stream's send() always yields to the loop first, even with room
            # to spare; at thousands of rows a second those extra loop passes cost
            # more than everything else the engine does per row.
            try:
                send.send_nowait(item)
            except anyio.WouldBlock:
                await pool.drained()  # half of it taken (see _Workers)
                send.send_nowait(item)
        except anyio.BrokenResourceError:
            return
        pool.queued += 1


async def _work(
    receive: MemoryObjectReceiveStream[Row],
    pool: _Workers,
    state: Replay,
    task: Task,
    ctx: Context,
) -> None:
    partial = state.partial
    begin, end = ctx.begin, ctx.end
    took = pool.took
    async with receive:
        while True:
            try:
                try:  # as in _feed: take a ready row without a trip round the loop
                    row = receive.receive_nowait()
                except anyio.WouldBlock:
                    row = await receive.receive()
            except anyio.EndOfStream:
                return
            took()
            if ctx.stopping:
                return
            line = row.line
            records = partial.pop(line, ()) if partial else ()
            if row.error is not None:  # the source could not decode it: the row fails
                await ctx.fail(line, row.id, f"input: {row.error}")
                continue
            context = begin(line, records)
            try:
                await task.process(row.record, context)
            finally:
                end(context)


# The collector's first generation, while rows run: see _tune_collector.
GC_YOUNG_THRESHOLD = 50_000


def _tune_collector(stack: AsyncExitStack) -> None:
    """Set the cyclic garbage collector up for the rows (``stack`` puts it back after).

    Nearly everything a turn allocates dies by reference count, but with thousands
    of rows in flight each lives a whole request: at the default threshold (700 new
    objects) the young generation is collected every few turns, the in-flight
    objects survive into the older ones, and those are walked over and over (a
    third of the loop's time at cap 1024, measured in bench/RESULTS.md). So the
    objects alive now (modules, config, the replay) are frozen out of collections,
    and the first generation waits for 50,000 objects: a few MB of cycles at most.
    """
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(max(GC_YOUNG_THRESHOLD, thresholds[0]), *thresholds[1:])
    stack.callback(gc.set_threshold, *thresholds)
    stack.callback(gc.unfreeze)


async def _sample(history: History, stats: RunStats, writer: Writer) -> None:
    """A history line every ``history.step`` seconds (the first at once), until cancelled."""
    while True:
        writer.note(history.line(stats, time.time()))
        await anyio.sleep(history.step)


async def _count_rows(config: RunConfig, source: Source, stats: RunStats) -> None:
    if config.piece is not None:
        stats.rows_total = config.piece.rows
        return
    stats.rows_total = await anyio.to_thread.run_sync(source.count, abandon_on_cancel=True)


async def _watch_signals(
    ctx: Context, outcome: Outcome, work: anyio.CancelScope, group: TaskGroup
) -> None:
    grace = ctx.config.shutdown_grace_s
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            if ctx.stopping:
                work.cancel()  # a second signal: stop now
                continue
            ctx.stop()  # no new requests; the rows are cancelled once none is in flight
            outcome.interrupted_by = signum
            log.info(
                f"{signal.Signals(signum).name}: no new turns; letting requests in flight "
                f"finish for up to {grace:g}s (signal again to stop now)"
            )
            group.start_soon(_cancel_after, work, grace)


async def _cancel_after(scope: anyio.CancelScope, seconds: float) -> None:
    await anyio.sleep(seconds)
    scope.cancel()
