"""`turnstile run` with the real model: llama.cpp's server and the built-in SmolLM2.

Skipped, saying why, where llama-server or the weights are missing (`make setup`
installs both).
"""

from __future__ import annotations

import asyncio
import re
import resource
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web

from engine.config import ModelConfig
from engine.errors import TurnstileError
from engine.local.server import default_model_path, find_llama_server, local_server
from engine.testing.mock_replies import request_key
from tests.conftest import by_id, read_jsonl, turnstile, write_jsonl

try:
    find_llama_server()
    default_model_path()
except TurnstileError as exc:
    pytest.skip(f"needs llama-server and the built-in model: {exc}", allow_module_level=True)

pytestmark = [pytest.mark.llama, pytest.mark.timeout(300)]

CHATS = [
    {
        "id": "greet",
        "messages": [
            {"role": "system", "content": "You are brief."},
            {"role": "user", "content": "Say hello."},
            {"role": "assistant", "content": "old"},
            {"role": "user", "content": "Now say goodbye."},
        ],
    },
    {"id": "colour", "prompt": "Name one colour."},
    {
        "id": "c1",  # user messages only: each one gets its own reply
        "messages": [
            {"role": "user", "content": "Name a fruit that is yellow."},
            {"role": "user", "content": "Why is it yellow?"},
        ],
    },
    {
        "id": "count",
        "conversations": [
            {"from": "human", "value": "Count to three."},
            {"from": "gpt", "value": "old"},
            {"from": "human", "value": "And back down."},
        ],
    },
]


def local_config(folder: Path, *, cap: int = 3, base_url: str = "local", **extra: Any) -> Path:
    teacher: dict[str, Any] = {
        "base_url": base_url,
        "max_concurrency": cap,
        "timeout_s": 120,
        "params": {"temperature": 0.0, "max_tokens": 24, "seed": 1},
    }
    if base_url == "local":
        teacher["local"] = {"ctx_size": 2048, "threads": 2}
    else:
        teacher["model"] = "SmolLM2-135M-Instruct"
    config = {
        "task": "distill",
        "input": "in.jsonl",
        "output": "out/distilled.jsonl",
        "checkpoint_dir": "ck",
        "models": {"teacher": teacher},
        "distill": {"model": "teacher"},
        **extra,
    }
    path = folder / "local.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def llama_servers_on(port: int) -> list[int]:
    """Pids of llama-server processes listening on ``port`` (from /proc)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"llama-server") and str(port).encode() in argv:
            pids.append(int(proc.name))
    return pids


def started_ports(log: Path) -> list[int]:
    """Ports of every server Turnstile started, from the lines it writes into the log."""
    ports = []
    for line in log.read_text(errors="replace").splitlines():
        if "turnstile starts:" in line:
            words = line.split()
            ports.append(int(words[words.index("--port") + 1]))
    return ports


async def test_a_real_distillation_writes_every_turn_and_stops_its_server(
    tmp_path: Path,
) -> None:
    write_jsonl(tmp_path / "in.jsonl", CHATS)
    config = local_config(tmp_path)

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 0, result.stderr
    rows = by_id(read_jsonl(tmp_path / "out" / "distilled.jsonl"))
    assert set(rows) == {"greet", "colour", "c1", "count"}
    turns = {"greet": 2, "colour": 1, "c1": 2, "count": 2}
    for name, row in rows.items():
        roles = [m["role"] for m in row["messages"] if m["role"] != "system"]
        assert roles == ["user", "assistant"] * turns[name], row
        replies = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        assert len(replies) == turns[name]
        assert all(r.strip() and r != "old" for r in replies), row
        assert row["model"] == "SmolLM2-135M-Instruct"
        assert row["usage"]["completion_tokens"] > 0
    log = tmp_path / "ck" / "llama-server-teacher.log"
    (port,) = started_ports(log)
    assert llama_servers_on(port) == []  # no orphan


async def test_the_server_is_stopped_after_a_failed_run(tmp_path: Path) -> None:
    # A file-size limit makes the journal unwritable mid-run: the run fails (exit 3).
    write_jsonl(tmp_path / "in.jsonl", CHATS * 20)
    config = local_config(tmp_path)
    # The limit also reaches the server's log: past it, llama-server drops its
    # connections, an outage the run rides out only for down_after_s.
    raw = yaml.safe_load(config.read_text())
    raw["models"]["teacher"]["down_after_s"] = 2
    config.write_text(yaml.safe_dump(raw))

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1500, 1500))

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "engine",
        "run",
        str(config),
        "--quiet",
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=limit,
    )
    _, err = await proc.communicate()

    assert proc.returncode == 3, err.decode()
    (port,) = started_ports(tmp_path / "ck" / "llama-server-teacher.log")
    assert llama_servers_on(port) == []


class CountingProxy:
    """A loopback proxy in front of the real server: counts each distinct request
    and lets a test act once ``n`` replies have gone back."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.requests: Counter[str] = Counter()
        self.replies = 0
        self._watch: tuple[int, asyncio.Event] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    async def wait_for_replies(self, n: int) -> None:
        event = asyncio.Event()
        self._watch = (n, event)
        if self.replies >= n:
            event.set()
        await event.wait()

    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.read()
        data = orjson.loads(body)
        self.requests[request_key(data["model"], data["messages"])] += 1
        assert self._session is not None
        async with self._session.post(
            f"{self.upstream}/chat/completions",
            data=body,
            headers={"Content-Type": "application/json"},
        ) as upstream:
            payload = await upstream.read()
            status = upstream.status
        self.replies += 1
        if self._watch and self.replies >= self._watch[0]:
            self._watch[1].set()
        return web.Response(body=payload, status=status, content_type="application/json")

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"data": []})

    async def __aenter__(self) -> CountingProxy:
        self._session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None and self._session is not None
        await self._runner.cleanup()
        await self._session.close()


@pytest.fixture
async def real_server(tmp_path: Path) -> AsyncIterator[str]:
    from engine.config import LocalServerConfig

    model = ModelConfig(
        name="teacher",
        base_urls=("local",),
        model="SmolLM2-135M-Instruct",
        max_concurrency=3,
        local=LocalServerConfig(ctx_size=2048, threads=2),
    )
    async with local_server(model, tmp_path / "server-logs") as url:
        yield url


async def test_sigkill_mid_run_then_resume_against_the_real_server(
    tmp_path: Path, real_server: str
) -> None:
    source = [
        {
            "id": f"c{i}",
            "messages": [
                {"role": "user", "content": f"Give me a word that starts with {letter}."},
                {"role": "assistant", "content": "old"},
                {"role": "user", "content": "Another one, please."},
            ],
        }
        for i, letter in enumerate("ABCDEF")
    ]
    write_jsonl(tmp_path / "in.jsonl", source)
    async with CountingProxy(real_server) as proxy:
        config = local_config(tmp_path, cap=2, base_url=proxy.base_url)
        from tests.conftest import start_turnstile

        proc = await start_turnstile("run", str(config), "--quiet")
        await proxy.wait_for_replies(4)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        journal = (tmp_path / "ck" / "journal.jsonl").read_bytes()
        journaled = [orjson.loads(line) for line in journal.splitlines()]
        assert any(r["k"] == "t" for r in journaled)

        rerun = await turnstile("run", str(config), "--quiet")

        assert rerun.returncode == 0, rerun.stderr
        rows = by_id(read_jsonl(tmp_path / "out" / "distilled.jsonl"))
        assert set(rows) == {s["id"] for s in source}
        for row in rows.values():
            replies = [m for m in row["messages"] if m["role"] == "assistant"]
            assert len(replies) == 2 and all(m["content"].strip() for m in replies)
        # Journaled turns were kept as they were, not asked again.
        for record in journaled:
            if record["k"] == "t":
                row = rows[source[record["l"]]["id"]]
                replies = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
                assert replies[record["i"]] == record["c"]
        repeated = sum(c - 1 for c in proxy.requests.values() if c > 1)
        assert repeated <= 2 * 2  # at most the turns in flight at the kill


async def test_two_local_replicas_share_a_real_distillation(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", CHATS)
    config = local_config(tmp_path, cap=2)
    raw = yaml.safe_load(config.read_text())
    raw["models"]["teacher"]["local"] = {"ctx_size": 2048, "threads": 2, "replicas": 2}
    config.write_text(yaml.safe_dump(raw))

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 0, result.stderr
    rows = by_id(read_jsonl(tmp_path / "out" / "distilled.jsonl"))
    assert set(rows) == {"greet", "colour", "c1", "count"}
    served = re.findall(r"^  http://127\.0\.0\.1:(\d+)/v1: (\d+)/(\d+) ok", result.stderr, re.M)
    assert len(served) == 2, result.stderr
    assert all(int(ok) > 0 for _, ok, _ in served), "a replica served nothing"
    for log in ("llama-server-teacher.log", "llama-server-teacher-1.log"):
        (port,) = started_ports(tmp_path / "ck" / log)
        assert llama_servers_on(port) == []  # each stopped


async def test_eight_long_conversations_at_once_never_overflow_the_context(
    tmp_path: Path,
) -> None:
    # Each slot holds a whole conversation of ctx_size tokens: eight long ones
    # generating at once on the default settings get no context error.
    long_chats = [
        {
            "id": f"long{i}",
            "messages": [
                {"role": "user", "content": f"Tell me a fact about the number {i * 7 + t}."}
                for t in range(6)
            ],
        }
        for i in range(8)
    ]
    write_jsonl(tmp_path / "in.jsonl", long_chats)
    config = local_config(tmp_path, cap=8)
    raw = yaml.safe_load(config.read_text())
    teacher = raw["models"]["teacher"]
    teacher["params"]["max_tokens"] = 64
    teacher["max_retries"] = 0  # any context error would fail its row
    del teacher["local"]  # the defaults: ctx_size 4096 for each of the 8 slots
    config.write_text(yaml.safe_dump(raw))

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 0, result.stderr
    assert "Context size has been exceeded" not in result.stderr
    assert "re-sent" not in result.stderr  # no request had to be sent twice
    rows = read_jsonl(tmp_path / "out" / "distilled.jsonl")
    assert len(rows) == 8
    for row in rows:
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"] * 6


async def test_a_generate_run_with_a_schema_on_the_built_in_model(tmp_path: Path) -> None:
    topics = [{"id": f"t{i}", "topic": topic} for i, topic in enumerate(["rain", "bread", "cats"])]
    write_jsonl(tmp_path / "in.jsonl", topics)
    # Bounded strings: the server's grammar then closes the JSON within max_tokens (at
    # temperature 0 a 135M model may otherwise repeat itself inside a string until cut off).
    schema = {
        "type": "object",
        "properties": {
            "question": {"type": "string", "maxLength": 100},
            "answer": {"type": "string", "maxLength": 60},
        },
        "required": ["question", "answer"],
    }
    config = {
        "task": "generate",
        "input": "in.jsonl",
        "output": "out/questions.jsonl",
        "checkpoint_dir": "ck",
        "models": {
            "writer": {
                "base_url": "local",
                "max_concurrency": 3,
                "params": {"temperature": 0.0, "max_tokens": 128, "seed": 1},
                "local": {"ctx_size": 2048, "threads": 2},
            }
        },
        "generate": {
            "model": "writer",
            "template": "Write one short quiz question about {{ topic }}, with its answer.",
            "json_schema": schema,
            "max_invalid": 2,
        },
    }
    path = tmp_path / "generate.yaml"
    path.write_text(yaml.safe_dump(config))

    result = await turnstile("run", str(path), "--quiet")

    assert result.returncode == 0, result.stderr
    rows = by_id(read_jsonl(tmp_path / "out" / "questions.jsonl"))
    assert set(rows) == {"t0", "t1", "t2"}
    for row in rows.values():
        [generation] = row["generations"]
        assert isinstance(generation, dict), row
        assert isinstance(generation["question"], str) and generation["question"].strip()
        assert isinstance(generation["answer"], str)
        assert row["model"] == "SmolLM2-135M-Instruct"


async def test_the_judge_filter_scores_real_dialogues_with_the_built_in_model(
    tmp_path: Path,
) -> None:
    write_jsonl(tmp_path / "in.jsonl", CHATS)
    judge = {
        "base_url": "local",
        "max_concurrency": 3,
        "timeout_s": 120,
        "params": {"temperature": 0.0, "max_tokens": 96, "seed": 1},
        "local": {"ctx_size": 2048, "threads": 2},
    }
    config = local_config(tmp_path, filters={"judge": {"model": "judge", "min_score": 5}})
    raw = yaml.safe_load(config.read_text())
    raw["models"]["judge"] = judge
    config.write_text(yaml.safe_dump(raw))

    result = await turnstile("run", str(config), "--quiet")

    assert result.returncode == 0, result.stderr
    kept = read_jsonl(tmp_path / "out" / "distilled.jsonl")
    filtered = read_jsonl(tmp_path / "out" / "distilled.filtered.jsonl")
    assert len(kept) + len(filtered) == len(CHATS)
    for row in kept:
        score = row["quality"]["score"]
        # A 135M judge may miss the format twice: the row is kept, with why.
        assert score is None or 5 <= score <= 10, row["quality"]
        assert isinstance(row["quality"]["reason"], str)
    for row in filtered:
        assert 1 <= row["quality"]["score"] < 5 and row["filter"].startswith("judge: scored")
    # Its cost: one or two requests a row (a reply that does not fit is asked again once).
    sent = re.search(r"filters\.judge: (\d+) requests", result.stderr)
    assert sent is not None, result.stderr
    assert len(CHATS) <= int(sent.group(1)) <= 2 * len(CHATS)
