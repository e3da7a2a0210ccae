"""A simulated user on the built-in model: SmolLM2 plays both sides of 8 dialogues.

Skipped, saying why, where llama-server or the weights are missing (`make setup`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from engine.errors import TurnstileError
from engine.local.server import default_model_path, find_llama_server
from engine.tasks.distill.simulator import END_REASONS
from tests.conftest import by_id, read_jsonl, turnstile, write_jsonl

try:
    find_llama_server()
    default_model_path()
except TurnstileError as exc:
    pytest.skip(f"needs llama-server and the built-in model: {exc}", allow_module_level=True)

pytestmark = [pytest.mark.llama, pytest.mark.timeout(600)]

QUESTIONS = [
    "What is a prime number?",
    "Why is the sky blue?",
    "How do plants make food?",
    "What is a noun?",
    "Why do we sleep?",
    "What is gravity?",
    "How does rain form?",
    "What is a fraction?",
]


async def test_smollm2_plays_both_sides_of_eight_dialogues(tmp_path: Path) -> None:
    rows = [
        {"id": f"d{i}", "messages": [{"role": "user", "content": q}]}
        for i, q in enumerate(QUESTIONS)
    ]
    write_jsonl(tmp_path / "in.jsonl", rows)
    config = {
        "task": "distill",
        "input": "in.jsonl",
        "output": "out/distilled.jsonl",
        "checkpoint_dir": "ck",
        "models": {
            "smol": {
                "base_url": "local",
                "max_concurrency": 4,
                "timeout_s": 120,
                "params": {"temperature": 0.7, "max_tokens": 32, "seed": 3},
                "local": {"ctx_size": 4096, "threads": 2},
            }
        },
        "distill": {
            "model": "smol",
            "user": {
                "model": "smol",
                "turns": 3,
                "system_prompt": "You are a curious student. Ask one short follow-up question.",
            },
        },
    }
    path = tmp_path / "simulate.yaml"
    path.write_text(yaml.safe_dump(config))

    result = await turnstile("run", str(path), "--quiet")

    assert result.returncode == 0, result.stderr
    out = by_id(read_jsonl(tmp_path / "out" / "distilled.jsonl"))
    assert set(out) == {r["id"] for r in rows}
    for row in out.values():
        roles = [m["role"] for m in row["messages"]]
        assert row["end_reason"] in END_REASONS, row
        users = roles.count("user")
        assert roles == ["user", "assistant"] * users, row
        if row["end_reason"] == "turns":
            assert users == 3 and row["simulated_turns"] == [1, 2], row
        else:
            assert users < 3 and row["simulated_turns"] == list(range(1, users)), row
        assert all(m["content"].strip() for m in row["messages"]), row
