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
from engine.http.reasoning import TRACE_KEY
from engine.input.rows import InputRow, Message
from engine.tasks.asking import Answer

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


@dataclass(slots=True, init=False)
class Dialogue:
    """Where one conversation stands: its turns and the replies written so far."""

    row: InputRow
    turns: list[list[Message]]
    tail: list[Message]
    replies: list[Answer]  # each turn's, as asked for
    # distill.reasoning_history: keep: each earlier reply goes back with its trace
    # (reasoning_content); drop: later requests carry earlier answers only.
    keep_reasoning: bool
    # The turns answered so far, each followed by its reply: the start of every later
    # request and of the finished row, extended by apply() instead of rebuilt each turn.
    _answered: list[Message] = field(repr=False)
    # Where each reply is in _answered (to add its trace to the row when dropped above).
    _reply_at: list[int] = field(repr=False)
    _traced: bool = field(repr=False)  # some reply had a trace

    # Written out (one is made per row): the generated one tests a sentinel per field.
    def __init__(
        self,
        row: InputRow,
        turns: list[list[Message]],
        tail: list[Message] | None = None,
        *,
        keep_reasoning: bool = False,
    ) -> None:
        self.row = row
        self.turns = turns
        self.tail = [] if tail is None else tail
        self.replies = []
        self.keep_reasoning = keep_reasoning
        self._answered = []
        self._reply_at = []
        self._traced = False

    @property
    def next_turn(self) -> int:
        return len(self.replies)

    def history(self) -> list[Message]:
        """The request for the next turn: every earlier turn with its reply, then this turn."""
        n = len(self.replies)
        if n == len(self.turns):
            raise ValueError("the conversation has no turn left to request")
        return self._answered + self.turns[n]

    def apply(self, reply: Answer) -> None:
        """Record the reply to the next turn."""
        n = len(self.replies)
        if n == len(self.turns):
            raise ValueError("the conversation has no turn left to answer")
        self.replies.append(reply)
        self._answered += self.turns[n]
        self._reply_at.append(len(self._answered))
        message = {"role": "assistant", "content": reply.text}
        if reply.trace is not None:
            self._traced = True
            if self.keep_reasoning:
                message[TRACE_KEY] = reply.trace
        self._answered.append(message)

    def messages(self) -> list[Message]:
        """The whole conversation with the replies written so far, each with its trace
        (``reasoning_content``) when it had one."""
        done = len(self.replies) == len(self.turns)
        out = self._answered + self.tail if done else self._answered.copy()
        if self._traced and not self.keep_reasoning:
            for at, reply in zip(self._reply_at, self.replies, strict=True):
                if reply.trace is not None:
                    out[at] = {**out[at], TRACE_KEY: reply.trace}
        return out

    def usage(self) -> dict[str, int]:
        prompt = completion = reasoning = 0
        for reply in self.replies:
            prompt += reply.prompt_tokens
            completion += reply.completion_tokens
            reasoning += reply.reasoning_tokens
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "reasoning_tokens": reasoning,
        }


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
            content = message["content"]
            # isspace() is strip()'s test without the copy of the text.
            if message["role"] == "user" and (not content or content.isspace()):
                raise InputError(f"user turn {i} is empty; give it some text or drop the row")
    if system_prompt is not None and not any(m["role"] == "system" for m in messages):
        turns[0] = [{"role": "system", "content": system_prompt}, *turns[0]]
    return turns, pending


def new_dialogue(
    row: InputRow,
    system_prompt: str | None = None,
    rule: TurnRule = EVERY_USER,
    *,
    keep_reasoning: bool = False,
) -> Dialogue:
    turns, tail = split_turns(row.messages, system_prompt, rule)
    return Dialogue(row, turns, tail, keep_reasoning=keep_reasoning)


# The row's own keys: an input field of the same name gives way to ours.
_OWN_KEYS = frozenset({"id", "messages", "model", "usage", "truncated_turns"})


def output_row(dialogue: Dialogue, model: str) -> dict[str, object]:
    """The finished row: the input's other fields, then id, messages, model, usage.

    ``truncated_turns`` (the 0-based turns cut off by max_tokens) is added only
    when there are any.
    """
    extra = dialogue.row.extra
    row: dict[str, object] = {k: v for k, v in extra.items() if k not in _OWN_KEYS} if extra else {}
    row["id"] = dialogue.row.id
    row["messages"] = dialogue.messages()
    row["model"] = model
    row["usage"] = dialogue.usage()
    truncated = [i for i, r in enumerate(dialogue.replies) if r.finish_reason == "length"]
    if truncated:
        row["truncated_turns"] = truncated
    return row
