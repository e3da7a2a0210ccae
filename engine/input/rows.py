"""Input rows: detect the format of one JSON row and turn it into messages.

Pure functions. Three formats are detected per row:

- OpenAI ``messages``: a list of ``{role, content}``;
- ShareGPT ``conversations``: a list of ``{from: system|human|gpt, value}``;
- a plain ``prompt`` string: one user turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.errors import InputError
from engine.input.base import row_id

Message = dict[str, str]

_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
}
_OPENAI_ROLES = ("system", "developer", "user", "assistant", "tool")
# The keys a format consumes; every other key of the row is carried to the output.
FORMAT_KEYS = ("messages", "conversations", "prompt")


@dataclass(slots=True)  # not frozen: one is made per row, and frozen costs 4x to make
class InputRow:
    """One usable input row: its messages in order and the fields to carry through."""

    line: int
    id: Any
    messages: list[Message]
    extra: dict[str, Any]


def parse_row(obj: Any, line: int) -> InputRow:
    """Detect the row's format and return its messages; raises InputError naming the fix."""
    if not isinstance(obj, dict):
        raise InputError(f"must be a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = _openai(obj["messages"])
    elif "conversations" in obj:
        messages = _sharegpt(obj["conversations"])
    elif "prompt" in obj:
        prompt = obj["prompt"]
        if not isinstance(prompt, str):
            raise InputError(f"'prompt' must be a string, got {type(prompt).__name__}")
        if not prompt or prompt.isspace():  # (strip()'s test without the copy)
            raise InputError("'prompt' is empty")
        messages = [{"role": "user", "content": prompt}]
    else:
        raise InputError(
            "no 'messages', 'conversations' or 'prompt' key; "
            "give the conversation as messages: [{role, content}, ...]"
        )
    # A row of its conversation alone, or with its id: nothing else to carry (and no
    # comprehension to run, the common case).
    if len(obj) == 1 or (len(obj) == 2 and "id" in obj):
        extra = {}
    else:
        extra = {k: v for k, v in obj.items() if k not in FORMAT_KEYS and k != "id"}
    return InputRow(line, row_id(obj, line), messages, extra)


def _openai(value: Any) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise InputError("'messages' must be a non-empty list of {role, content}")
    out: list[Message] = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise InputError(f"'messages[{i}]' must be an object {{role, content}}")
        role = item.get("role")
        content = item.get("content")
        if role not in _OPENAI_ROLES:
            raise InputError(
                f"'messages[{i}].role' is {role!r}; use one of system, user, assistant"
            )
        if content is None and role in ("assistant", "tool"):
            content = ""  # an assistant tool call, or an empty tool result
        if not isinstance(content, str):
            raise InputError(
                f"'messages[{i}].content' must be a string, got {type(content).__name__}"
            )
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def _sharegpt(value: Any) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise InputError("'conversations' must be a non-empty list of {from, value}")
    out: list[Message] = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise InputError(f"'conversations[{i}]' must be an object {{from, value}}")
        speaker = item.get("from")
        text = item.get("value")
        role = _SHAREGPT_ROLES.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            raise InputError(
                f"'conversations[{i}].from' is {speaker!r}; use one of system, human, gpt"
            )
        if not isinstance(text, str):
            raise InputError(
                f"'conversations[{i}].value' must be a string, got {type(text).__name__}"
            )
        out.append({"role": role, "content": text})
    return out
