"""Multi-turn distillation: a teacher answers every user message of each conversation.

``task: distill``. The section, the fingerprint, the filters' view and the card
live here; the runner is ``engine.tasks.distill.task``, the turn state machine
``engine.tasks.distill.dialogue``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.output.filters import Reply, ints_of, messages_of, text_of
from engine.tasks.base import Task, TaskKind
from engine.tasks.distill.dialogue import EVERY_USER, TURN_RULES, TurnRule, describe_rule

DROP, KEEP = "drop", "keep"
HISTORY_RULES = (DROP, KEEP)

if TYPE_CHECKING:
    from engine.config import ModelConfig, RunConfig
    from engine.problems import Problems


@dataclass(frozen=True, slots=True)
class DistillConfig:
    model: str
    system_prompt: str | None = None
    turns: TurnRule = EVERY_USER  # which user messages get a reply of their own
    reasoning_history: str = DROP  # keep: earlier replies go back with their trace


class Distill(TaskKind[DistillConfig]):
    name = "distill"
    section_type = DistillConfig
    tags = ("distillation",)
    column_keys = ("messages", "conversations", "prompt")

    def parse_section(
        self, raw: Any, models: Mapping[str, ModelConfig], p: Problems, base: Path
    ) -> DistillConfig | None:
        allowed = ("model", "system_prompt", "turns", "reasoning_history")
        body = p.section("distill", raw, allowed, "{model: <a name under models>}")
        if body is None:
            return None
        model = p.model_ref("distill.model", body.get("model"), models)
        system_prompt = body.get("system_prompt")
        if system_prompt is not None and not isinstance(system_prompt, str):
            p.add("distill.system_prompt", "must be a string or null")
            system_prompt = None
        turns = body.get("turns", EVERY_USER)
        if turns not in TURN_RULES:
            p.add(
                "distill.turns",
                f"must be one of {', '.join(TURN_RULES)}, got {turns!r} (every_user: each user "
                "message gets its own reply; as_in_input: the input's assistant messages mark "
                "where a turn ends)",
            )
            turns = EVERY_USER
        history = body.get("reasoning_history", DROP)
        if history not in HISTORY_RULES:
            p.add(
                "distill.reasoning_history",
                f"must be drop or keep, got {history!r} (drop: later turns' requests carry "
                "earlier answers only; keep: each earlier answer goes back with its trace as "
                "reasoning_content, for models that want their reasoning across turns)",
            )
            history = DROP
        if not model:
            return None
        return DistillConfig(
            model=model, system_prompt=system_prompt, turns=turns, reasoning_history=history
        )

    def section_fields(self, section: DistillConfig) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "model": section.model,
            "system_prompt": section.system_prompt,
            "turns": section.turns,
        }
        # Only when not the default, so checkpoints made before the key existed resume.
        if section.reasoning_history != DROP:
            fields["reasoning_history"] = section.reasoning_history
        return fields

    def models_used(self, section: DistillConfig) -> set[str]:
        return {section.model}

    def build(self, config: RunConfig) -> Task:
        from engine.tasks.distill.task import DistillTask

        return DistillTask(config)

    def card_text(self, config: RunConfig) -> str:
        section = self.section(config)
        teacher = config.models[section.model].model
        return (
            "Multi-turn distillation: each conversation keeps its system and user turns, and "
            f"`{teacher}` wrote every assistant turn, one at a time, each request carrying the "
            f"full history so far. Turns: {describe_rule(section.turns)}."
        )

    def card_usage(self, config: RunConfig, *, pairs_only: bool) -> str:
        return (
            "`messages` is the conversation in OpenAI chat format (a list of `{role, content}`), "
            "ready for TRL's `SFTTrainer`. A reasoning teacher's assistant messages carry its "
            "trace in `reasoning_content` (the key Qwen3's and DeepSeek-R1's chat templates "
            "read), unless exported with `--reasoning inline` or `drop`. Rows are in input order."
        )

    def replies(self, row: Mapping[str, Any]) -> Iterator[Reply]:
        truncated = ints_of(row.get("truncated_turns"))
        previous: str | None = None
        turn = 0
        for message in messages_of(row.get("messages")):
            if message.get("role") != "assistant":
                continue
            text = text_of(message)
            yield Reply(text, f"turn {turn}", previous, turn in truncated)
            previous = text
            turn += 1

    def describe(self, section: DistillConfig) -> str:
        return describe_rule(section.turns)

    def progress_note(self, section: DistillConfig) -> str:
        return section.turns

    def resume_problem(self, recorded: Mapping[str, Any] | None, config: RunConfig) -> str | None:
        """Replies made under one turn rule never mix with the other's in one output."""
        section = self.section(config)
        rule = recorded.get("turns") if isinstance(recorded, Mapping) else None
        if rule == section.turns:
            return None
        made = (
            f"under distill.turns: {rule}"
            if isinstance(rule, str)
            else "before distill.turns existed (consecutive user messages were one turn then)"
        )
        back = f"set distill.turns: {rule} to resume, or " if isinstance(rule, str) else ""
        return (
            f"the checkpoint in {config.checkpoint_dir} was made {made}, the config says "
            f"distill.turns: {section.turns}; the two rules never mix in one output: {back}"
        )


KIND = Distill()
