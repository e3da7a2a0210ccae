"""A simulated user: a second model writes user turns once the input's run out. Pure.

``distill.user`` names the simulator. After the teacher has answered every turn
of the input, and while the conversation has fewer than ``turns`` user messages,
the simulator is asked for the next user message. It sees the conversation from
the other side (``swapped``): its own system prompt, then the dialogue with the
roles swapped (the teacher's replies as ``user``, the user's messages as
``assistant``; the input's system messages are the teacher's, so they are left
out), and answers with the next user message.

What happens to its message (``judge``):

- one containing ``end_marker`` ends the conversation (``end_reason: end_marker``;
  the message is not kept);
- one at least ``max_similar`` alike (``similarity``) to an earlier user message of
  the same conversation, or with no words at all, is asked again, up to
  ``RETRIES`` times, each time with a note (``again``) added to the simulator's system
  prompt (so a deterministic model answers differently); then the conversation ends
  (``end_reason: repetition``);
- any other becomes the next user turn.

A conversation that reaches ``turns`` user messages ends with ``end_reason: turns``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Final

from engine.input.rows import Message
from engine.tasks.distill.dialogue import Dialogue

TURNS: Final = "turns"
END_MARKER: Final = "end_marker"
REPETITION: Final = "repetition"
END_REASONS: Final = (TURNS, END_MARKER, REPETITION)

RETRIES: Final = 2  # a too-similar message is asked again this many times
AGAIN: Final = (
    "Your last {n} messages repeated earlier ones. Write a new message that asks something "
    "you have not asked yet."
)


def again(attempt: int) -> str:
    """The note added to the simulator's system prompt when it is asked again: it says how
    many times, so no two attempts send the same request."""
    return AGAIN.format(n=attempt)


_WORD = re.compile(r"\w+")


def words(text: str) -> frozenset[str]:
    """The normalised token set of ``text``: its runs of letters and digits, lowercased
    (so case, punctuation and word order never count)."""
    return frozenset(_WORD.findall(text.lower()))


def similarity(a: str, b: str) -> float:
    """How alike two messages are: the Jaccard index of their token sets (``words``),
    shared tokens over all tokens, from 0.0 (no token shared) to 1.0 (the same set).

    Cheap (linear in the text) and blind to meaning on purpose: it catches a
    simulator that asks the same question again, not one that rephrases it. Two
    texts with no words at all are alike (1.0).
    """
    return _jaccard(words(a), words(b))


def _jaccard(x: frozenset[str], y: frozenset[str]) -> float:
    if not x and not y:
        return 1.0
    return len(x & y) / len(x | y)


class Verdict(Enum):
    KEEP = "keep"  # the next user turn
    END = "end"  # holds the end marker: the conversation ends here
    AGAIN = "again"  # too like an earlier user message: ask again


@dataclass(frozen=True, slots=True)
class UserRules:
    """``distill.user``'s rules, as the state machine needs them."""

    turns: int  # user messages per conversation in all, the input's first
    end_marker: str | None = "[END]"
    max_similar: float | None = 0.9  # None: never asked again


def judge(text: str, earlier: list[str], rules: UserRules) -> Verdict:
    """What becomes of a simulated message, given the conversation's earlier user messages."""
    if rules.end_marker and rules.end_marker in text:
        return Verdict.END
    if rules.max_similar is None:
        return Verdict.KEEP if text.strip() else Verdict.AGAIN
    mine = words(text)
    if not mine:
        return Verdict.AGAIN  # nothing to say is no new message
    for other in earlier:
        if _jaccard(mine, words(other)) >= rules.max_similar:
            return Verdict.AGAIN
    return Verdict.KEEP


def swapped(system_prompt: str, conversation: list[Message], attempt: int = 0) -> list[Message]:
    """The simulator's request: its system prompt (with ``again`` after a repeat), then
    ``conversation`` seen from the other side (user and assistant swapped, system
    messages and reasoning traces left out)."""
    system = system_prompt if attempt == 0 else f"{system_prompt}\n\n{again(attempt)}"
    out: list[Message] = [{"role": "system", "content": system}]
    for message in conversation:
        role = message["role"]
        if role == "user":
            out.append({"role": "assistant", "content": message["content"]})
        elif role == "assistant":
            out.append({"role": "user", "content": message["content"]})
    return out


class Step(Enum):
    TEACHER = "teacher"  # ask the teacher for turn ``Simulation.turn``
    USER = "user"  # ask the simulator for the message that opens that turn
    DONE = "done"  # the row is finished (``Simulation.end_reason`` says why, with a simulator)


# Each turn asks for the next step: module names skip the enum's class attribute lookup.
_TEACHER, _USER, _DONE = Step.TEACHER, Step.USER, Step.DONE


@dataclass(slots=True)
class Simulation:
    """One conversation's turns, with the user side written by a simulator when the
    input's run out: which request comes next, and what each reply does to it.

    Without ``rules`` it is plain distillation: the teacher answers the input's
    turns, then the row is done.
    """

    dialogue: Dialogue
    rules: UserRules | None = None
    system_prompt: str = ""  # the simulator's, rendered for this row
    attempt: int = 0  # of the simulator's message for the next turn: 0, then each retry
    end_reason: str | None = None
    simulated: list[int] = field(default_factory=list)  # user-message indices it wrote
    _users: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.rules is None:
            return  # plain distillation: no user message to compare with
        self._users = [
            m["content"] for turn in self.dialogue.turns for m in turn if m["role"] == "user"
        ]
        if len(self._users) >= self.rules.turns:
            self.end_reason = TURNS  # the input has its turns already: no simulated one

    @property
    def turn(self) -> int:
        """The turn the next request is for: the teacher's reply to it, or the simulated
        user message that opens it."""
        return self.dialogue.next_turn

    @property
    def user_key(self) -> str:
        """The journal key of the simulator's next message (stable across runs)."""
        return f"user:{self.turn}:{self.attempt}"

    def next_step(self) -> Step:
        dialogue = self.dialogue
        if len(dialogue.replies) < len(dialogue.turns):
            return _TEACHER
        if self.rules is None or self.end_reason is not None:
            return _DONE
        return _USER

    def is_last(self) -> bool:
        """Whether the teacher's reply to the next turn is the row's last request."""
        dialogue = self.dialogue
        if len(dialogue.replies) != len(dialogue.turns) - 1:
            return False
        return self.rules is None or self.end_reason is not None

    def user_request(self) -> list[Message]:
        """The simulator's request for the next user message."""
        return swapped(self.system_prompt, self.dialogue.messages(), self.attempt)

    def apply_user(self, text: str) -> Verdict:
        """Take the simulator's message: a new turn, the end, or a retry (see ``judge``)."""
        assert self.rules is not None, "no simulated user in this conversation"
        text = text.strip()
        verdict = judge(text, self._users, self.rules)
        if verdict is Verdict.END:
            self.end_reason = END_MARKER
        elif verdict is Verdict.AGAIN:
            if self.attempt < RETRIES:
                self.attempt += 1
            else:
                self.end_reason = REPETITION
        else:
            self.simulated.append(len(self._users))
            self._users.append(text)
            self.dialogue.turns.append([{"role": "user", "content": text}])
            self.attempt = 0
            if len(self._users) >= self.rules.turns:
                self.end_reason = TURNS
        return verdict
