"""A diagnostic, not a configuration: ``turnstile run`` with a writer that writes nothing.

``python -m bench.nullwriter run.yaml`` runs the CLI with the checkpoint writer
replaced by one that encodes every record and row exactly as the real writer does
(orjson, on the loop) but never hands a batch to a thread, never writes, never
makes a caller wait. Against a normal run, the difference is what the journal
writer costs the loop: its thread hop per group write, its batch bookkeeping and
waking the waiters, and the GIL its thread holds while it works. The output file
stays empty: such a run proves nothing about rows and is never a result on its own.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import anyio.lowlevel

from engine.checkpoint import writer as checkpoint_writer
from engine.checkpoint.checkpoint import Checkpoint
from engine.checkpoint.journal import encode, writing_record


class NullWriter(checkpoint_writer.Writer):
    async def record(self, record: dict[str, Any]) -> None:
        encode(record)

    def hand_over(
        self, line: int, row: dict[str, Any], records: Sequence[dict[str, Any]] = ()
    ) -> None:
        record = writing_record(line, records)
        record["b"] = record["e"] = 0
        encode(record)
        checkpoint_writer.row_line(row)

    async def failed(self, line: int, row: dict[str, Any]) -> None:
        checkpoint_writer.row_line(row)

    async def filtered(
        self, line: int, row: dict[str, Any], records: Sequence[dict[str, Any]] = ()
    ) -> None:
        for record in records:
            encode(record)
        checkpoint_writer.row_line(row)

    async def run(self) -> None:
        await self._stopped.wait()

    async def close(self) -> None:
        self._stopped.set()
        await anyio.lowlevel.checkpoint()


class NullCheckpoint(Checkpoint):
    """The run's checkpoint, with the writer above: handed to the run, nothing patched."""

    writer_type = NullWriter


def main(argv: list[str]) -> int:
    from engine import progress
    from engine.cli import main as cli
    from engine.config import load_config
    from engine.executors.launch import run_command
    from engine.executors.local import LocalExecutor

    if len(argv) != 1:
        return cli(["run", *argv])  # its usage error
    progress.log_to_console()
    config = load_config(argv[0])
    executor = LocalExecutor(config, checkpoint=NullCheckpoint.of(config))
    return run_command(config, fresh=False, quiet=True, executor=executor)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
