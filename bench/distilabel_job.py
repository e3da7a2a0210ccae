"""The Distilabel 1.5.3 side of the peer benchmark; runs inside its own venv.

Not part of the ``bench`` package's imports: ``bench.peers`` runs this file with the
Python of ``bench/_work/venv-distilabel``, so it may import only the standard library,
distilabel and its dependencies.

Configured the way Distilabel's documentation does it, with the concurrency knobs
matched to the cap under test:

- ``OpenAILLM(model="mock", base_url=URL, api_key="dummy")``: Distilabel's async
  client (``openai.AsyncOpenAI`` underneath). An async LLM sends every row of an
  input batch at once (``asyncio.gather``), so ``input_batch_size = cap`` is what
  caps the requests in flight; the generator's ``batch_size`` is the same.
- single-turn: ``TextGeneration`` over the ``prompt`` column (``input_mappings``);
- multi-turn: one ``ChatGeneration`` pipeline per turn, each fed the rows that still
  have a turn to answer with their whole history so far; the reply is appended
  before the next pass. (``ChatGeneration`` writes only the next turn.)
- ``generation_kwargs``: ``max_new_tokens=128, temperature=0.0``; the run uses
  ``use_cache=False`` and a cache folder under ``bench/_work``; other settings are
  Distilabel's defaults (one replica per step, raw input/output kept in metadata).

Prints one JSON line of counters on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
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
    from distilabel.models import OpenAILLM

    return OpenAILLM(
        model="mock",
        base_url=args.url,
        api_key="dummy",  # type: ignore[arg-type]
        timeout=120,
        max_retries=0,
        generation_kwargs={"max_new_tokens": 128, "temperature": 0.0},
    )


def run_single(args: argparse.Namespace, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from distilabel.pipeline import Pipeline
    from distilabel.steps import LoadDataFromDicts
    from distilabel.steps.tasks import TextGeneration

    with Pipeline(name="bench-single", cache_dir=args.cache_dir) as pipeline:
        load = LoadDataFromDicts(
            data=[{"id": r["id"], "prompt": r["prompt"]} for r in rows], batch_size=args.cap
        )
        generate = TextGeneration(
            llm=build_llm(args),
            input_batch_size=args.cap,
            input_mappings={"instruction": "prompt"},
        )
        load >> generate
    distiset = pipeline.run(use_cache=False)
    out = []
    for r in distiset["default"]["train"]:
        messages = [
            {"role": "user", "content": r["prompt"]},
            {"role": "assistant", "content": r["generation"]},
        ]
        out.append({"id": r["id"], "messages": messages, "model": "mock"})
    return out


def run_multi(args: argparse.Namespace, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from distilabel.pipeline import Pipeline
    from distilabel.steps import LoadDataFromDicts
    from distilabel.steps.tasks import ChatGeneration

    turns = {r["id"]: turns_of(r) for r in rows}
    history: dict[str, list[dict[str, str]]] = {r["id"]: [] for r in rows}
    deepest = max(len(t) for t in turns.values())
    for k in range(deepest):
        batch = []
        for row_id, row_turns in turns.items():
            if k < len(row_turns):
                history[row_id].extend(row_turns[k])
                batch.append({"id": row_id, "messages": list(history[row_id])})
        with Pipeline(name=f"bench-multi-turn{k}", cache_dir=args.cache_dir) as pipeline:
            load = LoadDataFromDicts(data=batch, batch_size=args.cap)
            chat = ChatGeneration(llm=build_llm(args), input_batch_size=args.cap)
            load >> chat
        distiset = pipeline.run(use_cache=False)
        for r in distiset["default"]["train"]:
            history[r["id"]].append({"role": "assistant", "content": r["generation"]})
    return [{"id": i, "messages": history[i], "model": "mock"} for i in turns]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--cap", type=int, required=True)
    parser.add_argument("--mode", choices=("single", "multi"), required=True)
    parser.add_argument("--cache-dir", required=True)
    args = parser.parse_args()
    os.environ.setdefault("DISTILABEL_LOG_LEVEL", "WARNING")
    logging.getLogger("distilabel").setLevel(logging.WARNING)
    started = time.monotonic()
    with open(args.input, "rb") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    out = run_single(args, rows) if args.mode == "single" else run_multi(args, rows)
    with open(args.output, "w") as f:
        for r in out:
            f.write(json.dumps(r) + "\n")
    turns = sum(1 for r in out for m in r["messages"] if m["role"] == "assistant")
    missing = sum(
        1 for r in out for m in r["messages"] if m["role"] == "assistant" and not m["content"]
    )
    result = {
        "elapsed_s": time.monotonic() - started,
        "rows": len(out),
        "turns": turns,
        "empty_replies": missing,
    }
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
