"""``executor: local`` (the default): every row in this process, on one event loop.

The single-process engine (engine._runner) as an executor: ``open`` locks the
checkpoint and the output, checks or writes the manifest and replays the journal
(``_runner.prepare``); ``run`` runs the rows on a new event loop, ``arun`` on the
caller's. It has no keys of its own in ``executor:``.
"""

from __future__ import annotations

import functools

from engine import progress
from engine._runner import announce, execute, prepare, run_loop
from engine.errors import CheckpointError
from engine.executors.base import Executor, RunResult, Session, is_sharded
from engine.executors.registry import register


@register
class LocalExecutor(Executor):
    """The run in this process."""

    kind = "local"

    def open(self, fresh: bool) -> Session:
        config = self.config
        if is_sharded(config.checkpoint_dir):
            raise CheckpointError(
                f"{config.checkpoint_dir} holds a sharded run (executor: ray or processes); "
                "resume it with that executor (or --executor), or run with --fresh to start over"
            )
        task = config.kind.build(config)
        lock, state, resumed, source = prepare(config, fresh=fresh)
        return Session(self, config, self.checkpoint, lock, resumed, state, source, task)

    def announce(self, session: Session) -> None:
        announce(self.config, session.state, resumed=session.resumed)

    def run(self, session: Session, *, display: progress.Display, signals: bool) -> RunResult:
        main = functools.partial(self._execute, session, display=display, signals=signals)
        return run_loop(main, uvloop=self.config.uvloop)

    async def arun(self, session: Session, *, display: progress.Display) -> RunResult:
        return await self._execute(session, display=display, signals=False)

    async def _execute(
        self, session: Session, *, display: progress.Display, signals: bool
    ) -> RunResult:
        outcome = await execute(
            self.config,
            session.task,
            session.state,
            source=session.source,
            resumed=session.resumed,
            display=display,
            signals=signals,
            snapshot_every_rows=self.snapshot_every_rows,
            checkpoint=self.checkpoint,
        )
        return RunResult(outcome=outcome)
