"""``task: echo`` (tests only), written against the public task interface alone: each
row's ``text`` is asked ``echo.steps`` times, each request with the replies so far."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config import ModelConfig, RunConfig
from engine.errors import ModelError
from engine.output.filters import Reply
from engine.problems import Problems
from engine.tasks import register
from engine.tasks.base import RowContext, Task, TaskKind


@dataclass(frozen=True, slots=True)
class EchoConfig:
    model: str
    steps: int = 2


class Echo(TaskKind[EchoConfig]):
    name = "echo"
    section_type = EchoConfig

    def parse_section(
        self, raw: Any, models: Mapping[str, ModelConfig], p: Problems, base: Path
    ) -> EchoConfig | None:
        body = p.section("echo", raw, ("model", "steps"), "{model: <a name under models>}")
        model = p.model_ref("echo.model", body.get("model"), models) if body else None
        steps = p.positive_int("echo.steps", body.get("steps") if body else None, 2) or 2
        return EchoConfig(model, steps) if model else None

    def section_fields(self, section: EchoConfig) -> dict[str, Any]:
        return {"model": section.model, "steps": section.steps}

    def models_used(self, section: EchoConfig) -> set[str]:
        return {section.model}

    def build(self, config: RunConfig) -> Task:
        return EchoTask(self.section(config))

    def card_text(self, config: RunConfig) -> str:
        return "Echoes: each row's text sent a few times, each reply kept."

    def replies(self, row: Mapping[str, Any]) -> Iterator[Reply]:
        for i, text in enumerate(row.get("replies", [])):
            yield Reply(text, f"step {i}", None, False)


class EchoTask(Task):
    def __init__(self, section: EchoConfig) -> None:
        self.section = section

    async def process(self, record: dict[str, Any], ctx: RowContext) -> None:
        messages = [{"role": "user", "content": str(record.get("text", ""))}]
        replies: list[str] = []
        for step in range(self.section.steps):
            try:
                answer = await ctx.ask(self.section.model, messages, key=f"step {step}")
            except ModelError as exc:
                await ctx.fail(record.get("id"), str(exc), turn=step)
                return
            replies.append(answer.text)
            messages += [
                {"role": "assistant", "content": answer.text},
                {"role": "user", "content": f"again ({step + 1})"},
            ]
        await ctx.finish({"id": record.get("id"), "replies": replies})


KIND = Echo()


def register_echo() -> None:
    register(KIND)
