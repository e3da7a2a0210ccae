"""``engine.batch.endpoint``'s decisions, as values: when the queue goes as a batch."""

from __future__ import annotations

from engine.batch.endpoint import BatchRun, _line_of, should_submit
from engine.batch.settings import BatchSettings

SETTINGS = BatchSettings(max_requests=100, max_bytes=10_000, max_batches=2, flush_s=60)


def _submit(
    queued: int = 10,
    queued_bytes: int = 500,
    waited_s: float = 0.0,
    running: int = 0,
    *,
    stalled: bool = False,
) -> bool:
    return should_submit(queued, queued_bytes, waited_s, running, SETTINGS, stalled=stalled)


def test_an_empty_queue_never_goes() -> None:
    assert not _submit(queued=0, queued_bytes=0, waited_s=1e9, stalled=True)


def test_a_full_queue_goes_by_lines_or_by_bytes() -> None:
    assert _submit(queued=100)
    assert _submit(queued=1, queued_bytes=10_000)
    assert not _submit(queued=99, queued_bytes=9_999)


def test_a_partial_queue_goes_when_every_row_waits_or_after_flush_s() -> None:
    assert not _submit(waited_s=59.9)
    assert _submit(waited_s=60.0)
    assert _submit(stalled=True)


def test_nothing_goes_while_max_batches_run() -> None:
    assert not _submit(queued=100, running=2)
    assert not _submit(stalled=True, waited_s=600, running=2)
    assert _submit(queued=100, running=1)


class _Gauge:
    def __init__(self, rows: int, requests: int) -> None:
        self._rows, self._requests = rows, requests

    def rows(self) -> int:
        return self._rows

    def requests(self) -> int:
        return self._requests

    def stopping(self) -> bool:
        return False


def test_a_run_is_stalled_when_every_row_and_request_waits_on_a_batch() -> None:
    run = BatchRun("fp")
    assert not run.stalled()  # no gauge: only size and flush_s submit
    run.gauge = _Gauge(rows=2, requests=3)
    run.waiting = 3
    run.lines.update({4: 2, 9: 1})
    assert run.stalled()
    run.gauge = _Gauge(rows=3, requests=3)  # a third row may still ask
    assert not run.stalled()
    run.gauge = _Gauge(rows=2, requests=4)  # a request waits on an online model
    assert not run.stalled()


def test_a_custom_id_names_its_row() -> None:
    assert _line_of("12._turn3") == 12
    assert _line_of("7.a:gen-a") == 7
    assert _line_of("q3") is None  # asked outside a row
