"""The progress line: counts, the estimate of total turns and the rule it counts by, and
no limit of 0 before a sharded run's first lease."""

from __future__ import annotations

import time
from typing import Any

from engine.progress import status_line, summary
from engine.stats import (
    ModelStats,
    Outage,
    Outcome,
    ReplicaStats,
    RunStats,
    combine,
    progress_of,
)


def test_the_turn_estimate_names_the_turn_rule() -> None:
    stats = RunStats(rows_total=100, rows_done=20, turns_done=60, turn_rule="every_user")
    line = status_line(stats, elapsed=10.0)
    # 3 turns a row so far, 80 rows to go: 60 + 240.
    assert "turns 60/~300 every_user (6/s)" in line


def test_no_estimate_before_ten_rows_and_no_rule_outside_distillation() -> None:
    stats = RunStats(rows_total=100, rows_done=5, turns_done=15)
    assert "turns 15 (" in status_line(stats, elapsed=1.0)


def replicated_stats() -> RunStats:
    model = ModelStats(name="teacher", cap=8, in_flight=3, requests=10, ok=9)
    model.replicas = [
        ReplicaStats(url="http://a/v1", cap=4, in_flight=3, requests=7, ok=7),
        ReplicaStats(url="http://b/v1", cap=4, requests=3, ok=2, failures=3, live=False),
    ]
    model.outages = [
        Outage(replica=1, url="http://b/v1", started=10.0, ended=22.5),
        Outage(replica=1, url="http://b/v1", started=time.monotonic()),
    ]
    return RunStats(models={"teacher": model})


def test_the_progress_line_shows_each_replica_and_which_is_out() -> None:
    line = status_line(replicated_stats(), elapsed=1.0)
    assert "teacher: 3/8 in flight" in line and "[r0 3/4, r1 out]" in line


def test_the_summary_names_every_outage() -> None:
    text = summary(Outcome(stats=replicated_stats(), elapsed_s=30.0))
    assert "  http://a/v1: 7/7 ok, 0 server failures" in text
    assert "  http://b/v1: 2/3 ok, 3 server failures" in text
    assert "  outage: teacher http://b/v1 out for 12.5s\n" in text + "\n"
    assert "(still out at the end)" in text


def test_the_terminal_panel_has_a_bar_an_eta_and_each_replica() -> None:
    from rich.console import Console

    from engine.progress import _panel, eta_s

    stats = replicated_stats()
    stats.rows_total, stats.rows_done, stats.rows_skipped = 100, 40, 20
    stats.turns_done, stats.turn_rule = 50, "every_user"
    # 20 rows finished in this run's 10 s: 60 to go at 2 a second.
    assert eta_s(stats, elapsed=10.0) == 30.0
    console = Console(record=True, width=120, color_system=None)
    console.print(_panel(stats, elapsed=10.0))
    screen = console.export_text()
    assert "rows 40/100 (40%)" in screen and "ETA 0:30" in screen and "elapsed 0:10" in screen
    assert "━" in screen  # the bar itself
    assert "turns 50/~" in screen and "every_user" in screen
    assert "http://a/v1" in screen and "http://b/v1" in screen and "out" in screen


# Before the first lease (a sharded run) no limit of 0 is shown: none is known yet.

MODELS = {"teacher": (8, ["http://a/v1", "http://b/v1"])}


def test_a_sharded_run_shows_no_limit_before_any_shard_reports() -> None:
    stats = RunStats(rows_total=100)
    combine([], MODELS, into=stats)
    teacher = stats.models["teacher"]
    assert teacher.limit is None and [r.limit for r in teacher.replicas] == [None, None]
    line = status_line(stats, elapsed=1.0)
    assert "teacher: 0/16 in flight," in line and "limit" not in line


async def test_a_shard_waiting_for_its_first_lease_reports_no_limit() -> None:
    from engine.executors.shard import Lease
    from engine.http.client import HttpEndpoint
    from engine.http.settings import HttpSettings

    teacher = ModelStats(name="teacher", cap=8)
    urls = ("http://a/v1", "http://b/v1")
    settings = HttpSettings(name="teacher", base_urls=urls, model="x", max_concurrency=8)
    endpoint = HttpEndpoint(settings, teacher)  # never entered: a lease sends no request
    sent: list[dict[str, Any]] = []

    def lease(shard: int, claims: dict[str, int], progress: dict[str, Any]) -> Any:
        sent.append(progress)
        return {"teacher": 3}, 1.0

    shard_stats = RunStats(models={"teacher": teacher})
    await Lease(0, lease).start({"teacher": endpoint}, shard_stats)

    first = sent[0]["models"]["teacher"]  # sent with the first lease, before its grant
    assert first["limit"] is None and [r["limit"] for r in first["replicas"]] == [None, None]
    driver = RunStats()
    combine([sent[0]], MODELS, into=driver)
    assert "limit" not in status_line(driver, elapsed=1.0)
    # The grant applied: 3 per replica, and the next report says so.
    assert teacher.limit == 6 and [r.limit for r in teacher.replicas] == [3, 3]
    combine([progress_of(shard_stats)], MODELS, into=driver)
    assert "teacher: 0/16 in flight limit 6," in status_line(driver, elapsed=1.0)
    # Two shards, one with its share and one still waiting: the share is the limit.
    combine([progress_of(shard_stats), sent[0]], MODELS, into=driver)
    assert driver.models["teacher"].limit == 6
    assert [r.limit for r in driver.models["teacher"].replicas] == [3, 3]
