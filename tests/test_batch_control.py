"""``engine.batch.control``'s pure parts: a run's batches as ``turnstile status`` lists them."""

from __future__ import annotations

from engine.batch.control import age, status_lines, view
from engine.batch.log import LoggedBatch

RUNNING = LoggedBatch(0, "f0", "b0", status="in_progress", total=30, created_at=1000.0)
DONE = LoggedBatch(
    1,
    "f1",
    "b1",
    done=True,
    status="completed",
    completed=29,
    failed=1,
    total=30,
    created_at=1100.0,
)


def test_ages_read_at_a_glance() -> None:
    assert [age(s) for s in (-3, 42, 420, 3 * 3600 + 300, 2 * 86400 + 4 * 3600)] == [
        "0s",
        "42s",
        "7m",
        "3h05m",
        "2d04h",
    ]


def test_the_providers_state_wins_over_the_records() -> None:
    live = {
        "status": "finalizing",
        "request_counts": {"total": 30, "completed": 20, "failed": 2},
        "created_at": 1000,
    }
    got = view("teacher", RUNNING, live)
    assert (got.status, got.completed, got.failed, got.total, got.live) == (
        "finalizing",
        20,
        2,
        30,
        True,
    )
    last = view("teacher", RUNNING, None)
    assert (last.status, last.completed, last.total, last.live) == ("in_progress", 0, 30, False)


def test_status_lists_each_batch_with_its_counts_and_age() -> None:
    live = {
        "status": "in_progress",
        "request_counts": {"total": 30, "completed": 5, "failed": 0},
        "created_at": 1000,
    }
    found = [
        view("teacher", RUNNING, live),
        view("teacher", DONE, None),
        view("judge", LoggedBatch(2, "f2", "", status="uploaded"), None),
    ]
    assert status_lines(found, now=1130.0) == [
        "batches:    3 (2 running, 1 finished)",
        "  teacher b0: in_progress, 5 done / 0 failed / 30 total, age 2m",
        "  teacher b1: completed (last known), 29 done / 1 failed / 30 total, age 30s",
        "  judge (file f2, no batch journaled): uploaded (last known), 0 done / 0 failed / 0 total",
    ]
    assert status_lines([], now=0.0) == []
