"""The batch loop runs on events, not on a timer: it sleeps until the next poll, the
queue's flush deadline or a wake-up (a request queued, the run stalled by a row that
asked or ended), against the mock's Batch API."""

from __future__ import annotations

from pathlib import Path

import anyio
import yaml

from engine.batch.endpoint import BatchEndpoint, BatchRun, next_wake
from engine.batch.log import MemoryLog
from engine.batch.settings import BatchSettings
from engine.http.endpoint import asker
from engine.http.settings import HttpSettings
from engine.testing.mock_server import MockServer
from tests.conftest import by_id, conversations, read_jsonl, turnstile, write_config, write_jsonl
from tests.test_distill_run import assert_each_turn_answers_its_history

HOUR = 3600.0
SETTINGS = BatchSettings(max_requests=100, max_batches=2, poll_s=HOUR, flush_s=HOUR)


class _Gauge:
    """The runner's side, set by the test: rows that may still ask, all requests waiting."""

    def __init__(self, run: BatchRun, rows: int) -> None:
        self.run = run
        self.rows_left = rows

    def rows(self) -> int:
        return self.rows_left

    def requests(self) -> int:
        return self.run.waiting

    def stopping(self) -> bool:
        return False


def _wake(
    now: float = 100.0,
    queued: int = 1,
    oldest: float = 90.0,
    running: int = 0,
    polls: tuple[float, ...] = (),
    retry_at: float = 0.0,
    *,
    ready: bool = False,
) -> float | None:
    return next_wake(now, queued, oldest, running, list(polls), retry_at, SETTINGS, ready=ready)


def test_the_loop_sleeps_until_a_poll_or_the_flush_deadline_or_forever() -> None:
    assert _wake(queued=0) is None  # nothing queued, nothing running: only a wake-up
    assert _wake() == 90.0 + HOUR  # the oldest request's flush deadline
    assert _wake(polls=(130.0, 120.0)) == 120.0  # the next poll first
    assert _wake(queued=0, polls=(130.0,)) == 130.0
    assert _wake(running=2, polls=(130.0,)) == 130.0  # full of batches: no flush to keep


def test_a_queue_held_back_by_a_failed_upload_goes_when_it_may_again() -> None:
    assert _wake(ready=True, retry_at=105.0) == 105.0  # full or stalled: at retry_at
    assert _wake(retry_at=105.0) == 90.0 + HOUR  # neither: at its flush deadline


async def _ask(endpoint: BatchEndpoint, line: int, texts: list[str]) -> None:
    asker.set((line, "t"))
    completion = await endpoint.complete([{"role": "user", "content": f"question {line}"}])
    texts.append(completion.texts[0])


async def test_the_loop_wakes_for_a_stall_and_a_poll_not_on_a_timer(mock: MockServer) -> None:
    run = BatchRun("fp")
    gauge = _Gauge(run, rows=3)
    run.gauge = gauge
    settings = HttpSettings(name="teacher", base_urls=(mock.base_url,), model="mock")
    batch = BatchSettings(max_requests=100, max_batches=2, poll_s=0.5, flush_s=HOUR)
    texts: list[str] = []
    async with BatchEndpoint(settings, batch, None, log=MemoryLog(), run=run) as endpoint:
        async with anyio.create_task_group() as group:
            group.start_soon(_ask, endpoint, 0, texts)
            group.start_soon(_ask, endpoint, 1, texts)
            while run.waiting < 2:
                await anyio.lowlevel.checkpoint()
            assert mock.batch.events["upload"] == 0  # a third row may still ask
            gauge.rows_left = 2  # it ended without asking: the runner says so
            run.changed()
        # Polled once, 0.5 s after the batch went (its delay is 0): the two rows answered.
        assert len(texts) == 2
        assert mock.batch.events["create"] == 1
        assert mock.batch.events["get"] == 1
        # Passes: start, the first request queued, the stall, after the submit, the
        # poll, after the poll (at most: wake-ups may fold into one). A loop on a
        # 50 ms tick passes ten times more while the batch runs.
        assert endpoint.passes <= 6, endpoint.passes


async def test_a_k_turn_run_needs_no_flush_deadline_to_take_k_rounds(
    tmp_path: Path, mock: MockServer
) -> None:
    # Every round goes when the rows stall: the last to ask, the last to end, or the
    # input running out wakes the loop. Were one of them missed, the round would wait
    # for flush_s (an hour) and the test's timeout fail it.
    source = conversations(40, max_turns=4)
    write_jsonl(tmp_path / "in.jsonl", source)
    config = write_config(tmp_path, mock.base_url)
    raw = yaml.safe_load(config.read_text())
    raw["models"]["teacher"]["batch"] = {
        "max_requests": 1000,
        "max_batches": 2,
        "poll_s": 0.05,
        "flush_s": HOUR,
    }
    config.write_text(yaml.safe_dump(raw))

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 0, result.stderr
    rows = by_id(read_jsonl(tmp_path / "out" / "distilled.jsonl"))
    assert set(rows) == {s["id"] for s in source}
    for row in rows.values():
        assert_each_turn_answers_its_history(row)
    assert mock.batch.events["create"] == 4
