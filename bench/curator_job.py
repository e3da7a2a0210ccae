"""The Curator (bespokelabs-curator) side of the peer benchmark; runs inside its own venv.

Like ``distilabel_job.py``, run by ``bench.peers`` with the Python of
``bench/_work/venv-curator``; standard library and Curator only.

Configuration (Curator's documented way to use an OpenAI-compatible server):

- ``curator.LLM`` subclass with ``prompt(row)`` returning the row's messages and
  ``parse`` keeping the reply; ``backend="openai"``,
  ``backend_params={"base_url": URL, "api_key": "dummy", "max_concurrent_requests": cap,
  "max_requests_per_minute": 10**7, "max_tokens_per_minute": 10**10, "max_retries": 0}``
  (the rate limits set out of the way, so the cap is the only limit);
  ``generation_params={"temperature": 0.0, "max_tokens": 128}``.
- Offline: Curator counts tokens with tiktoken, which downloads its BPE file on first
  use; the environment points ``TIKTOKEN_CACHE_DIR`` at the copy that litellm (a
  Curator dependency) ships, and sets ``TELEMETRY_ENABLED=false`` and
  ``LITELLM_LOCAL_MODEL_COST_MAP=True``. ``CURATOR_CACHE_DIR`` is a fresh folder
  per run (Curator would otherwise answer a repeated run from its cache).
- multi-turn: one ``llm(dataset)`` pass per turn index over the rows that still have
  a turn, each with its whole history; Curator has no multi-turn mode of its own.

Prints one JSON line of counters on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any


def turns_of(row: dict[str, Any]) -> list[list[dict[str, str]]]:
    if "prompt" in row:
        return [[{"role": "user", "content": row["prompt"]}]]
    turns: list[list[dict[str, str]]] = []
    pending: list[dict[str, str]] = []
    for message in row["messages"]:
        if message["role"] == "assistant":
            if pending:
                turns.append(pending)
                pending = []
            continue
        pending.append({"role": message["role"], "content": message["content"]})
    if pending:
        turns.append(pending)
    return turns


def build_llm(args: argparse.Namespace) -> Any:
    from bespokelabs import curator

    class Chat(curator.LLM):  # type: ignore[misc]
        def prompt(self, row: dict[str, Any]) -> list[dict[str, str]]:
            return list(row["messages"])

        def parse(self, row: dict[str, Any], response: str) -> dict[str, Any]:
            return {"id": row["id"], "reply": response}

    return Chat(
        model_name="mock",
        backend="openai",
        backend_params={
            "base_url": args.url,
            "api_key": "dummy",
            "max_concurrent_requests": args.cap,
            "max_requests_per_minute": 10**7,
            "max_tokens_per_minute": 10**10,
            "max_retries": 0,
        },
        generation_params={"temperature": 0.0, "max_tokens": 128},
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--cap", type=int, required=True)
    args = parser.parse_args()
    started = time.monotonic()
    from datasets import Dataset

    with open(args.input, "rb") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    llm = build_llm(args)
    turns = {r["id"]: turns_of(r) for r in rows}
    history: dict[str, list[dict[str, str]]] = {r["id"]: [] for r in rows}
    deepest = max(len(t) for t in turns.values())
    for k in range(deepest):
        batch = []
        for row_id, row_turns in turns.items():
            if k < len(row_turns):
                history[row_id].extend(row_turns[k])
                batch.append({"id": row_id, "messages": list(history[row_id])})
        response = llm(Dataset.from_list(batch))
        for r in response.dataset:
            history[r["id"]].append({"role": "assistant", "content": r["reply"]})
    done = 0
    with open(args.output, "w") as f:
        for row_id in turns:
            if len(history[row_id]) and history[row_id][-1]["role"] == "assistant":
                done += 1
            f.write(json.dumps({"id": row_id, "messages": history[row_id], "model": "mock"}))
            f.write("\n")
    result = {
        "elapsed_s": time.monotonic() - started,
        "rows": len(rows),
        "rows_complete": done,
        "turns": sum(1 for h in history.values() for m in h if m["role"] == "assistant"),
    }
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
