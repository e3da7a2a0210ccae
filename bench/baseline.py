"""The reference: the plainest correct aiohttp loop that does the same job as a run.

One ``ClientSession``, an ``asyncio.Semaphore`` holding the same cap as the run's
``max_concurrency``, orjson, and the same multi-turn logic (each request resends the
whole history so far; the input's assistant messages are dropped and rewritten).
It writes the same output rows, but keeps no journal, makes no retries and cannot
resume: what Turnstile costs on top of this loop is the price of its guarantees.
With ``--retry-429`` it retries one thing, the plain way: a 429 is sent again after
its Retry-After (seconds; 1 s when absent), the slot released meanwhile.

Run it as ``python -m bench.baseline --url URL --input IN --output OUT --cap N``; it
prints one JSON line of counters on stdout when it is done. ``--uvloop`` runs the same
loop on uvloop instead of asyncio's own event loop (the reference for Turnstile's
default, which uses uvloop where it is installed).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Iterator
from typing import IO, Any

import aiohttp
import orjson

FORMAT_KEYS = ("messages", "conversations", "prompt")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant"}


def split_turns(row: dict[str, Any]) -> list[list[dict[str, str]]]:
    """The row's turns under Turnstile's default rule: every user message gets a reply.

    A turn is the system messages before a user message, then that message; the
    input's assistant messages are dropped.
    """
    if "prompt" in row:
        return [[{"role": "user", "content": row["prompt"]}]]
    if "conversations" in row:
        messages = [
            {"role": SHAREGPT_ROLES[m["from"]], "content": m["value"]} for m in row["conversations"]
        ]
    else:
        messages = row["messages"]
    turns: list[list[dict[str, str]]] = []
    pending: list[dict[str, str]] = []
    for message in messages:
        if message["role"] == "assistant":
            continue
        pending.append({"role": message["role"], "content": message["content"]})
        if message["role"] == "user":
            turns.append(pending)
            pending = []
    return turns


class Loop:
    """Shared state of one bare run: the input iterator, the output file, counters."""

    def __init__(
        self, url: str, model: str, cap: int, rows: Iterator[bytes], out: IO[bytes]
    ) -> None:
        self.url = f"{url}/chat/completions"
        self.model = model
        self.cap = cap
        self.rows = rows
        self.out = out
        self.params: dict[str, Any] = {}
        self.retry_429 = False
        self.reasoning = False  # read reasoning_content and write it into the rows, as a run does
        self.requests = 0
        self.retries = 0
        self.turns = 0
        self.errors = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0

    async def worker(self, session: aiohttp.ClientSession, slots: asyncio.Semaphore) -> None:
        for raw in self.rows:
            if not raw.strip():
                continue
            row = orjson.loads(raw)
            history: list[dict[str, str]] = []
            usage = {"prompt_tokens": 0, "completion_tokens": 0}
            traces: list[tuple[int, str | None]] = []
            if self.reasoning:
                usage["reasoning_tokens"] = 0
            failed = False
            for turn in split_turns(row):
                history.extend(turn)
                body = orjson.dumps({**self.params, "model": self.model, "messages": history})
                while True:
                    async with slots:
                        self.requests += 1
                        async with session.post(self.url, data=body) as response:
                            data = await response.read()
                            status = response.status
                            retry_after = response.headers.get("Retry-After")
                    if status != 429 or not self.retry_429:
                        break
                    self.retries += 1
                    await asyncio.sleep(_seconds(retry_after))
                if status != 200:
                    self.errors += 1
                    failed = True
                    break
                reply = orjson.loads(data)
                message = reply["choices"][0]["message"]
                history.append({"role": "assistant", "content": message["content"]})
                tokens = reply.get("usage") or {}
                usage["prompt_tokens"] += tokens.get("prompt_tokens", 0)
                usage["completion_tokens"] += tokens.get("completion_tokens", 0)
                if self.reasoning:
                    # The trace goes into the row, never into the next request.
                    traces.append((len(history) - 1, message.get("reasoning_content")))
                    details = tokens.get("completion_tokens_details") or {}
                    usage["reasoning_tokens"] += details.get("reasoning_tokens", 0)
                self.turns += 1
            if failed:
                continue
            self.prompt_tokens += usage["prompt_tokens"]
            self.completion_tokens += usage["completion_tokens"]
            for at, trace in traces:
                if trace is not None:
                    history[at] = {**history[at], "reasoning_content": trace}
            extra = {k: v for k, v in row.items() if k not in FORMAT_KEYS and k != "id"}
            out = {**extra, "id": row.get("id"), "messages": history, "model": self.model}
            out["usage"] = usage
            self.out.write(orjson.dumps(out) + b"\n")


def _seconds(retry_after: str | None) -> float:
    try:
        return max(0.0, float(retry_after)) if retry_after is not None else 1.0
    except ValueError:
        return 1.0  # an HTTP date: not sent by the servers this loop is measured against


async def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    # Rows in flight: twice the cap, as Turnstile's default, so that conversations
    # between two turns do not leave slots idle.
    workers = args.workers or 2 * args.cap
    slots = asyncio.Semaphore(args.cap)
    connector = aiohttp.TCPConnector(limit=args.cap, limit_per_host=args.cap)
    with open(args.input, "rb") as rows, open(args.output, "wb") as out:
        loop = Loop(args.url, args.model, args.cap, iter(rows), out)
        loop.params = orjson.loads(args.params)
        loop.retry_429 = args.retry_429
        loop.reasoning = args.reasoning
        async with aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=args.timeout_s),
            headers={"Content-Type": "application/json"},
        ) as session:
            async with asyncio.TaskGroup() as group:
                for _ in range(workers):
                    group.create_task(loop.worker(session, slots))
    return {
        "elapsed_s": time.monotonic() - started,
        "requests": loop.requests,
        "retries": loop.retries,
        "turns": loop.turns,
        "errors": loop.errors,
        "prompt_tokens": loop.prompt_tokens,
        "completion_tokens": loop.completion_tokens,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__)
    parser.add_argument("--url", required=True, help="base URL ending in /v1")
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--cap", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="rows in flight (2 x cap)")
    parser.add_argument("--model", default="mock")
    parser.add_argument("--params", default="{}", help="extra request fields as JSON")
    parser.add_argument("--timeout-s", type=float, default=120.0)
    parser.add_argument(
        "--retry-429", action="store_true", help="send a 429 again after its Retry-After"
    )
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop, not asyncio's loop")
    parser.add_argument(
        "--reasoning",
        action="store_true",
        help="keep each reply's reasoning_content in its row (not in the next request)",
    )
    args = parser.parse_args(argv)
    loop_factory = None
    if args.uvloop:
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        result = runner.run(run(args))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
