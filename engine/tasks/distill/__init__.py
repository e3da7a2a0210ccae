"""Multi-turn distillation: a teacher answers every user message of each conversation.

``task: distill``. The section, the fingerprint, the filters' view and the card
live here; the runner is ``engine.tasks.distill.task``, the turn state machine
``engine.tasks.distill.dialogue``, and the simulated user (``distill.user``: a
second model writes user turns once the input's run out)
``engine.tasks.distill.simulator``.
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
class UserConfig:
    """``distill.user``: a model that writes user turns once the input's run out."""

    model: str
    turns: int  # user messages per conversation in all, the input's first
    system_prompt: str | None = None  # the simulator's system prompt, or...
    template: str | None = None  # ...a Jinja2 template over the row's columns rendering it
    end_marker: str | None = "[END]"  # a simulated message holding it ends the conversation
    max_similar: float | None = 0.9  # this alike to an earlier user message: asked again


@dataclass(frozen=True, slots=True)
class DistillConfig:
    model: str
    system_prompt: str | None = None
    turns: TurnRule = EVERY_USER  # which user messages get a reply of their own
    reasoning_history: str = DROP  # keep: earlier replies go back with their trace
    user: UserConfig | None = None  # a simulated user, when set


class Distill(TaskKind[DistillConfig]):
    name = "distill"
    section_type = DistillConfig
    tags = ("distillation",)
    column_keys = ("messages", "conversations", "prompt")

    def parse_section(
        self, raw: Any, models: Mapping[str, ModelConfig], p: Problems, base: Path
    ) -> DistillConfig | None:
        allowed = ("model", "system_prompt", "turns", "reasoning_history", "user")
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
        user = _user(body.get("user"), models, p)
        if not model:
            return None
        return DistillConfig(
            model=model,
            system_prompt=system_prompt,
            turns=turns,
            reasoning_history=history,
            user=user,
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
        if section.user is not None:
            u = section.user
            fields["user"] = {
                "model": u.model,
                "turns": u.turns,
                "system_prompt": u.system_prompt,
                "template": u.template,
                "end_marker": u.end_marker,
                "max_similar": u.max_similar,
            }
        return fields

    def models_used(self, section: DistillConfig) -> set[str]:
        return {section.model} | ({section.user.model} if section.user is not None else set())

    def build(self, config: RunConfig) -> Task:
        from engine.tasks.distill.task import DistillTask

        return DistillTask(config)

    def card_text(self, config: RunConfig) -> str:
        section = self.section(config)
        teacher = config.models[section.model].model
        text = (
            "Multi-turn distillation: each conversation keeps its system and user turns, and "
            f"`{teacher}` wrote every assistant turn, one at a time, each request carrying the "
            f"full history so far. Turns: {describe_rule(section.turns)}."
        )
        user = section.user
        if user is not None:
            asker = config.models[user.model].model
            text += (
                f" Once the input's user messages ran out, `{asker}` played the user (it saw "
                f"the dialogue with the roles swapped) up to {user.turns} user messages a "
                "conversation; `simulated_turns` lists the user messages it wrote and "
                "`end_reason` why each conversation ended (turns, end_marker, repetition)."
            )
        return text

    def card_usage(self, config: RunConfig, *, pairs_only: bool) -> str:
        text = (
            "`messages` is the conversation in OpenAI chat format (a list of `{role, content}`), "
            "ready for TRL's `SFTTrainer`. A reasoning teacher's assistant messages carry its "
            "trace in `reasoning_content` (the key Qwen3's and DeepSeek-R1's chat templates "
            "read), unless exported with `--reasoning inline` or `drop`. Rows are in input order."
        )
        if self.section(config).user is not None:
            text += (
                " `simulated_turns` holds the 0-based indices (among the user messages) of the "
                "messages the simulated user wrote, `end_reason` why the conversation ended "
                "(`turns`, `end_marker` or `repetition`), `user_usage` the simulator's tokens "
                "(`usage` is the teacher's)."
            )
        return text

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
        text = describe_rule(section.turns)
        if section.user is not None:
            text += (
                f"; then a simulated user (model {section.user.model}) writes user messages up "
                f"to {section.user.turns} a conversation"
            )
        return text

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


_USER_KEYS = ("model", "turns", "system_prompt", "template", "end_marker", "max_similar")
_PROMPT_FIX = (
    "set distill.user.system_prompt to the simulator's instructions (e.g. 'You are a curious "
    "student. Ask one short follow-up question.'), or distill.user.template to a Jinja2 "
    "template over the row's columns that renders them"
)


def _user(raw: Any, models: Mapping[str, ModelConfig], p: Problems) -> UserConfig | None:
    """``distill.user``, when set: the simulated user's model and rules."""
    if raw is None:
        return None
    body = p.mapping("distill.user", raw)
    if body is None:
        return None
    p.unknown("distill.user", body, _USER_KEYS)
    model = p.model_ref("distill.user.model", body.get("model"), models)
    turns = body.get("turns")
    if turns is None:
        p.add("distill.user.turns", "missing; set how many user messages a conversation has in all")
    else:
        turns = p.positive_int("distill.user.turns", turns, None, most=1_000)
    system_prompt, template = body.get("system_prompt"), body.get("template")
    if system_prompt is not None and template is not None:
        p.add("distill.user.system_prompt", "and distill.user.template are both set; keep one")
    elif system_prompt is None and template is None:
        p.add("distill.user.system_prompt", f"missing; {_PROMPT_FIX}")
    elif system_prompt is not None:
        system_prompt = p.string(
            "distill.user.system_prompt", system_prompt, required=True, fix=_PROMPT_FIX
        )
    else:
        template = p.string("distill.user.template", template, required=True, fix=_PROMPT_FIX)
        if template is not None:
            from engine.tasks.templates import BadTemplate, compile_template

            try:
                compile_template(template)
            except BadTemplate as exc:
                p.add("distill.user.template", f"the template does not compile: {exc}")
                template = None
    end_marker = body.get("end_marker", "[END]")
    if end_marker is not None and (not isinstance(end_marker, str) or not end_marker.strip()):
        p.add(
            "distill.user.end_marker",
            f"must be a non-empty string or null (no early end), got {end_marker!r}",
        )
        end_marker = None
    max_similar = body.get("max_similar", 0.9)
    if max_similar is not None and (
        isinstance(max_similar, bool)
        or not isinstance(max_similar, int | float)
        or not 0 < max_similar <= 1
    ):
        p.add(
            "distill.user.max_similar",
            f"must be a number above 0 and at most 1, or null (never asked again), got "
            f"{max_similar!r} (1: only a message with the same words as an earlier one is "
            "asked again)",
        )
        max_similar = None
    if model is None or turns is None or (system_prompt is None and template is None):
        return None
    return UserConfig(
        model=model,
        turns=turns,
        system_prompt=system_prompt,
        template=template,
        end_marker=end_marker,
        max_similar=None if max_similar is None else float(max_similar),
    )


KIND = Distill()
