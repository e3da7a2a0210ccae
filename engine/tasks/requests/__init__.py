"""Batch files on any server: each line of an OpenAI batch input file, sent online.

``task: requests``. Each input line ``{custom_id, method: POST, url, body}`` has its
``body`` sent as it is (``body.model`` included) to ``url`` (``/v1/chat/completions``,
``/v1/completions`` or ``/v1/embeddings``) under the base URL of ``requests.model``,
with its caps, retries and replicas (``RowContext.send``); the reply becomes an OpenAI
batch output line, a line that fails for good an error-file line in the failed file.
The shapes live in ``engine.tasks.requests.lines``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine import jsonbytes
from engine.errors import ModelError
from engine.output.filters import Reply
from engine.tasks.base import RowContext, Task, TaskKind
from engine.tasks.requests.lines import (
    INVALID,
    URLS,
    duplicate_ids,
    error_code,
    error_line,
    output_line,
    parse_line,
)

if TYPE_CHECKING:
    from engine.config import ModelConfig, RunConfig
    from engine.problems import Problems

__all__ = ["KIND", "Requests", "RequestsConfig", "RequestsTask"]

REPLY_KEY = "request"  # the one reply of a row, as the journal names it


@dataclass(frozen=True, slots=True)
class RequestsConfig:
    model: str  # the entry under models: whose servers get every line


class Requests(TaskKind[RequestsConfig]):
    name = "requests"
    section_type = RequestsConfig
    tags = ("batch-inference",)
    model_names = False  # each line's body names its own model

    def parse_section(
        self, raw: Any, models: Mapping[str, ModelConfig], p: Problems, base: Path
    ) -> RequestsConfig | None:
        body = p.section("requests", raw, ("model",), "{model: <a name under models>}")
        model = p.model_ref("requests.model", body.get("model"), models) if body else None
        return RequestsConfig(model) if model else None

    def section_fields(self, section: RequestsConfig) -> dict[str, Any]:
        return {"model": section.model}

    def models_used(self, section: RequestsConfig) -> set[str]:
        return {section.model}

    def build(self, config: RunConfig) -> Task:
        duplicate_ids(config.input)  # before any request: results are matched by custom_id
        return RequestsTask(self.section(config))

    def card_text(self, config: RunConfig) -> str:
        return (
            "Replies to an OpenAI batch input file: each line's request body sent as it is to "
            f"its url ({', '.join(URLS)}) on the servers of `{self.section(config).model}`."
        )

    def card_usage(self, config: RunConfig, *, pairs_only: bool) -> str:
        return (
            "Each row is an OpenAI batch output line: `custom_id` (the input line's), "
            "`response.status_code`, `response.request_id` and `response.body` (the server's "
            "reply, as it sent it), `error` (null). Rows are in input order."
        )

    def replies(self, row: Mapping[str, Any]) -> Iterator[Reply]:
        """Each choice's text: a chat completion's message content, or a completion's text
        (embeddings have none)."""
        response = row.get("response")
        body = response.get("body") if isinstance(response, dict) else None
        choices = body.get("choices") if isinstance(body, dict) else None
        for i, choice in enumerate(choices if isinstance(choices, list) else ()):
            if not isinstance(choice, dict):
                continue
            message = choice.get("message")
            text = message.get("content") if isinstance(message, dict) else choice.get("text")
            if isinstance(text, str):
                yield Reply(text, f"choice {i}", None, choice.get("finish_reason") == "length")


class RequestsTask(Task):
    """One batch line per row: sent, and written as an output or an error-file line."""

    def __init__(self, section: RequestsConfig) -> None:
        self.model = section.model

    async def process(self, record: dict[str, Any], ctx: RowContext) -> None:
        request = parse_line(record)
        if isinstance(request, str):
            line = error_line(ctx.line, record.get("custom_id"), INVALID, f"input: {request}")
            await ctx.fail_line(line)
            return
        try:
            answer = await ctx.send(
                self.model, request.path, jsonbytes.dumps(request.body), key=REPLY_KEY, last=True
            )
        except ModelError as exc:
            await ctx.fail_line(error_line(ctx.line, request.custom_id, error_code(exc), str(exc)))
            return
        await ctx.finish(output_line(ctx.line, request.custom_id, answer))


KIND = Requests()
