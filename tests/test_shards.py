"""A sharded run's folder without Ray: the plan file, shared-storage check, shard states."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.errors import CheckpointError
from engine.executors.shards import (
    Plan,
    check_plan,
    check_storage,
    mark_done,
    mark_failed,
    read_plan,
    shard_dir,
    shard_state,
    write_plan,
    write_storage_token,
)
from engine.input.sources import Slice

PIECES = (Slice(0, 0, 5, 0, 100), Slice(1, 5, 4, 100, 180))


def test_the_plan_round_trips_and_is_refused_for_another_shard_count_or_input(
    tmp_path: Path,
) -> None:
    plan = Plan(shards=PIECES, input_digest="abc")
    write_plan(tmp_path, plan)
    assert read_plan(tmp_path) == plan
    check_plan(plan, 2, "abc", tmp_path)
    with pytest.raises(CheckpointError, match=r"executor.shards: 2 \(or --shards 2\)"):
        check_plan(plan, 3, "abc", tmp_path)
    with pytest.raises(CheckpointError, match="input changed"):
        check_plan(plan, 2, "other", tmp_path)
    (tmp_path / "plan.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="unreadable shard plan"):
        read_plan(tmp_path)


def test_a_node_that_does_not_see_the_drivers_token_is_refused(tmp_path: Path) -> None:
    token = write_storage_token(tmp_path)
    check_storage(tmp_path, token, "node-a")  # the same storage: fine
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with pytest.raises(CheckpointError, match="not shared storage: node node-b") as exc:
        check_storage(elsewhere, token, "node-b")
    assert "NFS" in str(exc.value)
    with pytest.raises(CheckpointError, match="not shared storage"):
        check_storage(tmp_path, "another run's token", "node-a")


def test_shard_states_follow_their_markers(tmp_path: Path) -> None:
    piece = PIECES[1]
    assert shard_state(tmp_path, piece).state == "pending"
    folder = shard_dir(tmp_path, 1)
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text("{}")
    started = shard_state(tmp_path, piece)
    assert (started.state, started.started) == ("pending", True)  # resumes from its journal
    mark_failed(tmp_path, 1, "ModelDown: teacher down")
    assert shard_state(tmp_path, piece).error == "ModelDown: teacher down"
    mark_done(tmp_path, 1, {"ok": 3, "failed": 1, "filtered": 0, "rows": 4})
    done = shard_state(tmp_path, piece)
    assert (done.state, done.counts["ok"], done.error) == ("done", 3, None)
