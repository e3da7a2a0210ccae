"""A batch model's batches where requests in flight would be: the progress line, the
terminal panel, the summary, Prometheus and the history sample."""

from __future__ import annotations

import orjson

from engine.history import History
from engine.metrics import RunCollector
from engine.progress import status_line, summary
from engine.stats import ModelStats, Outcome, ReplicaStats, RunStats, combine, progress_of


def batch_stats() -> RunStats:
    stats = RunStats(rows_total=100)
    m = ModelStats(name="teacher", cap=8, in_flight=40, requests=90, ok=50, batch=True)
    m.replicas = [ReplicaStats(url="http://a/v1", cap=8)]
    m.batches_submitted, m.batches_attached, m.batches_running, m.batches_done = 3, 1, 2, 2
    stats.models["teacher"] = m
    stats.models["judge"] = ModelStats(name="judge", cap=4, in_flight=3)
    return stats


def test_the_progress_line_shows_batches_running_for_a_batch_model() -> None:
    line = status_line(batch_stats(), elapsed=10.0)
    assert "teacher: 2 batches running (40 requests), 0 retries, 0 failures" in line
    assert "judge: 3/4 in flight" in line  # an online model as before


def test_the_summary_names_batches_submitted_and_done() -> None:
    text = summary(Outcome(stats=batch_stats(), elapsed_s=10.0))
    [teacher] = [x for x in text.splitlines() if x.startswith("model teacher:")]
    assert teacher.endswith("0 retries, 0 failures, 3 batches submitted, 1 attached, 2 done")
    [judge] = [x for x in text.splitlines() if x.startswith("model judge:")]
    assert "batches" not in judge


def test_the_panel_shows_batches_in_the_in_flight_column() -> None:
    from rich.console import Console

    from engine.progress import _panel

    console = Console(record=True, width=120, color_system=None)
    console.print(_panel(batch_stats(), elapsed=10.0))
    row = next(x for x in console.export_text().splitlines() if x.startswith("teacher"))
    assert "2 batches" in row


def test_prometheus_has_a_batches_gauge_by_state() -> None:
    families = {f.name: f for f in RunCollector(batch_stats).collect()}
    samples = {
        (s.labels["model"], s.labels["state"]): s.value
        for s in families["turnstile_batches"].samples
    }
    assert samples == {("teacher", "running"): 2, ("teacher", "done"): 2}


def test_the_history_sample_carries_the_batch_counts() -> None:
    sample = orjson.loads(History("r").line(batch_stats(), 1.0))
    teacher = sample["models"]["teacher"]
    assert (teacher["batches_running"], teacher["batches_submitted"]) == (2, 3)
    assert teacher["batches_done"] == 2
    assert "batches_running" not in sample["models"]["judge"]


def test_a_sharded_run_adds_up_its_shards_batches() -> None:
    part = progress_of(batch_stats())
    into = RunStats()
    combine([part, part], {"teacher": (8, ["http://a/v1"]), "judge": (4, ["http://j"])}, into)
    teacher = into.models["teacher"]
    assert teacher.batch and not into.models["judge"].batch
    assert (teacher.batches_running, teacher.batches_done, teacher.batches_submitted) == (4, 4, 6)
