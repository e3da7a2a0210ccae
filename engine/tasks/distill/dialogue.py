"""The distillation state machine for one conversation. Pure: no I/O, no clock.

A conversation is split into *turns*: each turn is the system and user messages
that the teacher must answer with one assistant message. The input's own
assistant messages are always dropped (the teacher writes them anew). Where one
turn ends is the rule's to say:

- ``every_user`` (the default): every user message is a turn of its own and gets
  its own reply, so ``user, user, assistant, user`` is three turns;
- ``as_in_input``: the input's assistant messages mark where a turn ends, so
  ``user, user, assistant`` is one turn answered after the second user message
  (for datasets where a user really sent two messages in a row).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal

from engine.errors import InputError
from engine.input.rows import InputRow, Message
from engine.tasks.base import usage_of

TurnRule = Literal["every_user", "as_in_input"]
EVERY_USER: Final = "every_user"
AS_IN_INPUT: Final = "as_in_input"
TURN_RULES: Final = (EVERY_USER, AS_IN_INPUT)


def describe_rule(rule: str) -> str:
    """The rule in words, for the progress display, ``turnstile status`` and the card."""
    if rule == AS_IN_INPUT:
        return (
            f"{AS_IN_INPUT}: the input's assistant messages mark where a turn ends "
            "(consecutive user messages are one turn)"
        )
    return f"{EVERY_USER}: every user message gets its own reply"


@dataclass(frozen=True, slots=True)
class Reply:
    """One generated assistant turn, as journaled."""

    content: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None


@dataclass(slots=True)
class Dialogue:
    """Where one conversation stands: its turns and the replies written so far."""

    row: InputRow
    turns: list[list[Message]]
    tail: list[Message] = field(default_factory=list)
    replies: list[Reply] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return len(self.replies) == len(self.turns)

    @property
    def next_turn(self) -> int:
        return len(self.replies)

    def history(self) -> list[Message]:
        """The request for the next turn: every earlier turn with its reply, then this turn."""
        if self.done:
            raise ValueError("the conversation has no turn left to request")
        messages: list[Message] = []
        for turn, reply in zip(self.turns, self.replies, strict=False):
            messages.extend(turn)
            messages.append({"role": "assistant", "content": reply.content})
        messages.extend(self.turns[len(self.replies)])
        return messages

    def apply(self, reply: Reply) -> None:
        """Record the reply to the next turn."""
        if self.done:
            raise ValueError("the conversation has no turn left to answer")
        self.replies.append(reply)

    def messages(self) -> list[Message]:
        """The whole conversation with the replies written so far."""
        out: list[Message] = []
        for turn, reply in zip(self.turns, self.replies, strict=False):
            out.extend(turn)
            out.append({"role": "assistant", "content": reply.content})
        if self.done:
            out.extend(self.tail)
        return out

    def usage(self) -> dict[str, int]:
        return usage_of((r.prompt_tokens, r.completion_tokens) for r in self.replies)


def split_turns(
    messages: list[Message], system_prompt: str | None = None, rule: TurnRule = EVERY_USER
) -> tuple[list[list[Message]], list[Message]]:
    """Split a conversation into turns and a tail of messages after the last user turn.

    Raises InputError when there is no user turn to answer.
    """
    turns: list[list[Message]] = []
    pending: list[Message] = []
    has_user = False
    every_user = rule == EVERY_USER
    for message in messages:
        role = message["role"]
        if role == "assistant":
            if has_user:
                turns.append(pending)
                pending, has_user = [], False
            continue
        if role == "tool":
            continue  # tool results belong to assistant turns the teacher rewrites
        if every_user and has_user:
            # Each user message is answered before whatever follows it (the next
            # user message, or a system message that belongs before the next turn).
            turns.append(pending)
            pending, has_user = [], False
        pending.append(message)
        has_user = has_user or role == "user"
    if has_user:
        turns.append(pending)
        pending = []
    if not turns:
        raise InputError("has no user turn to answer; add at least one user message")
    for i, turn in enumerate(turns):
        for message in turn:
            if message["role"] == "user" and not message["content"].strip():
                raise InputError(f"user turn {i} is empty; give it some text or drop the row")
    if system_prompt is not None and not any(m["role"] == "system" for m in messages):
        turns[0] = [{"role": "system", "content": system_prompt}, *turns[0]]
    return turns, pending


def new_dialogue(
    row: InputRow, system_prompt: str | None = None, rule: TurnRule = EVERY_USER
) -> Dialogue:
    turns, tail = split_turns(row.messages, system_prompt, rule)
    return Dialogue(row=row, turns=turns, tail=tail)


# The row's own keys: an input field of the same name gives way to ours.
_OWN_KEYS = frozenset({"id", "messages", "model", "usage", "truncated_turns"})


def output_row(dialogue: Dialogue, model: str) -> dict[str, object]:
    """The finished row: the input's other fields, then id, messages, model, usage.

    ``truncated_turns`` (the 0-based turns cut off by max_tokens) is added only
    when there are any.
    """
    extra = dialogue.row.extra
    row: dict[str, object] = {
        **{k: v for k, v in extra.items() if k not in _OWN_KEYS},
        "id": dialogue.row.id,
        "messages": dialogue.messages(),
        "model": model,
        "usage": dialogue.usage(),
    }
    truncated = [i for i, r in enumerate(dialogue.replies) if r.finish_reason == "length"]
    if truncated:
        row["truncated_turns"] = truncated
    return row
