"""``executor: processes``: a sharded run's shards as local processes, no Ray.

The job-array backend of engine.executors.sharded in its smallest form, and what
uses every core of one machine: each shard is ``python -c "...processes import
main; main()"``, a child process running engine.executors.shard.run_shard on its
slice, at most ``max_concurrent_shards`` at a time (default: one per CPU). The
plan, done markers, resume, merge and counts are the sharded executor's, so a run
resumes exactly as a Ray run does, and either executor can resume the other's.

Caps: the driver holds the run's ``QuotaServer`` (engine.executors.quota) itself.
A shard's lease is one request down its stdout pipe and one answer up its stdin
(pickled, one line each), so running shards share each cap by the same rule as on
Ray. Its last lease's counters are what the driver shows.

A shard whose process dies (SIGKILL, out of memory) or fails is recorded failed in
its ``error.txt``; the others go on, the run exits 3, and a rerun resumes it from
its journal (no retry within the run: a crash that repeats would repeat at once).
A shard process is in a session of its own (a Ctrl-C reaches only the driver,
which stops the shards) and dies with the driver (Linux's parent-death signal),
so a SIGKILLed driver leaves no shard writing.
"""

from __future__ import annotations

import base64
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import IO, Any

import anyio
from anyio.abc import Process, TaskGroup

from engine.errors import TurnstileError
from engine.executors.quota import QuotaServer
from engine.executors.registry import register
from engine.executors.sharded import ShardBackend, ShardedExecutor, ShardEnd, ShardJob
from engine.executors.shards import Plan

_CHILD = "from engine.executors.processes import main; raise SystemExit(main())"


def _line(value: Any) -> bytes:
    return base64.b64encode(pickle.dumps(value)) + b"\n"


def _value(line: bytes) -> Any:
    return pickle.loads(base64.b64decode(line))


@dataclass(slots=True, eq=False)  # a handle: compared and hashed by identity
class _Shard:
    """One shard's process and what it said."""

    index: int
    process: Process
    ended: anyio.Event = field(default_factory=anyio.Event)
    result: dict[str, Any] | None = None
    error: str | None = None
    cancelled: bool = False


class ProcessBackend(ShardBackend):
    """Shards as child processes of the driver; the quota in the driver."""

    def __init__(self, caps: dict[str, int]) -> None:
        self.quota = QuotaServer(caps, time.time())
        self.group: TaskGroup | None = None
        self.changed = anyio.Event()  # set when a shard ends

    async def start(self, group: TaskGroup) -> None:
        self.group = group

    async def submit(self, job: ShardJob) -> _Shard:
        assert self.group is not None
        process = await anyio.open_process(
            [sys.executable, "-c", _CHILD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,  # the shard's warnings go where the driver's go
            start_new_session=True,
        )
        shard = _Shard(job.piece.index, process)
        assert process.stdin is not None
        await process.stdin.send(_line(job))
        self.group.start_soon(self._serve, shard)
        return shard

    async def _serve(self, shard: _Shard) -> None:
        """Answer the shard's leases until its pipe closes, then wait for its end."""
        process = shard.process
        assert process.stdout is not None and process.stdin is not None
        buffer = b""
        try:
            async for chunk in process.stdout:
                buffer += chunk
                while b"\n" in buffer:
                    raw, buffer = buffer.split(b"\n", 1)
                    await self._answer(shard, _value(raw))
        except BaseException:  # the driver stops (cancelled, or an error): so does the shard
            if process.returncode is None:
                process.kill()
            raise
        finally:
            with anyio.CancelScope(shield=True):
                code = await process.wait()
                if shard.result is None and shard.error is None and not shard.cancelled:
                    shard.error = _died(code)
                shard.ended.set()
                self.changed.set()

    async def _answer(self, shard: _Shard, message: tuple[str, Any]) -> None:
        kind, body = message
        if kind == "lease":
            answer = self.quota.lease(*body)
            assert shard.process.stdin is not None
            try:
                await shard.process.stdin.send(_line(answer))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass  # it died meanwhile: its end is read from its exit
        elif kind == "done":
            shard.result = body
        elif kind == "error":
            shard.error = body

    async def wait(self, handles: list[Any], timeout_s: float) -> list[Any]:
        ended = [h for h in handles if h.ended.is_set()]
        if not ended:
            with anyio.move_on_after(timeout_s):
                await self.changed.wait()
            self.changed = anyio.Event()
            ended = [h for h in handles if h.ended.is_set()]
        return ended

    async def result(self, handle: Any) -> ShardEnd:
        shard: _Shard = handle
        if shard.cancelled:
            return ShardEnd(cancelled=True)
        if shard.error is not None:
            return ShardEnd(error=shard.error)
        assert shard.result is not None
        return ShardEnd(progress=shard.result["progress"])

    def cancel(self, handle: Any) -> None:
        shard: _Shard = handle
        shard.cancelled = True
        if shard.process.returncode is None:
            shard.process.kill()  # as Ray's forced cancel: the journal keeps every turn

    async def counters(self) -> dict[int, dict[str, Any]] | None:
        return self.quota.snapshot()

    async def release(self, index: int) -> None:
        self.quota.release(index)


def _died(code: int) -> str:
    if code < 0:
        return f"its process was killed by {signal.Signals(-code).name}"
    return f"its process exited with {code} before it finished"


@register
class ProcessesExecutor(ShardedExecutor):
    """``executor: {kind: processes}``: the shards as processes on this machine."""

    kind = "processes"
    default_concurrency = os.cpu_count() or 1

    def backend(self, plan: Plan) -> ShardBackend:
        return ProcessBackend({n: m.max_concurrency for n, m in self.config.models.items()})

    def where(self) -> str:
        most = self.options.max_concurrent_shards or self.default_concurrency
        return f"as local processes, {most} at a time"


# -- the shard's side ------------------------------------------------------------------


def main() -> int:
    """A shard process: its job from stdin, leases down stdout, its end last."""
    from engine.executors.shard import run_shard

    _die_with_parent()
    answers = sys.stdin.buffer
    # stdout carries the messages alone: anything else the shard prints goes to stderr.
    talk = os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    job: ShardJob = _value(answers.readline())
    channel = threading.Lock()  # one lease at a time (the lease runs in a worker thread)

    def lease(shard: int, claims: dict[str, int], counters: dict[str, Any]) -> Any:
        with channel:
            _send(talk, "lease", (shard, claims, counters))
            raw = answers.readline()
            if not raw:
                raise ConnectionError("the driver is gone")
            return _value(raw)

    try:
        result = run_shard(
            job.config,
            job.piece,
            token=job.token,
            known_input=job.known_input,
            lease=lease,
            snapshot_every_rows=job.snapshot_every_rows,
        )
    except TurnstileError as exc:
        _send(talk, "error", f"{type(exc).__name__}: {exc}")
        return 3
    except Exception as exc:  # a bug: the driver records it, the traceback goes to stderr
        traceback.print_exc()
        _send(talk, "error", f"{type(exc).__name__}: {exc}")
        return 70
    _send(talk, "done", result)
    return 0


def _send(talk: IO[bytes], kind: str, body: Any) -> None:
    talk.write(_line((kind, body)))


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the driver dies (it cannot then be left writing)."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the signal was set up
        os._exit(1)
