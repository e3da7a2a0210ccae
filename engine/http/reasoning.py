"""Reasoning traces: where a server puts a model's reasoning, and taking a reply apart. Pure.

Servers return a reasoning model's trace in one of two dialects:

- a field of the message: ``reasoning_content`` (vLLM and SGLang with
  ``--reasoning-parser``, llama.cpp's ``--reasoning-format``, DeepSeek's API) or
  ``reasoning`` (newer vLLM, OpenRouter);
- tags inside ``content``: ``<think>TRACE</think>ANSWER`` from a server with no
  parser, or ``TRACE</think>ANSWER`` from chat templates that pre-fill the opening
  tag (DeepSeek-R1's). The tags are the model's (Magistral: ``[THINK]``/``[/THINK]``).

``models.X.reasoning`` picks which to read: ``auto`` (a field, else tags),
``field``, ``tags`` or ``off`` (content as it comes). :func:`split_reply` applies
one to a message; it returns the answer and the trace (None when the reply had
none), and never looks at anything but its arguments.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

AUTO: Final = "auto"
FIELD: Final = "field"
TAGS: Final = "tags"
OFF: Final = "off"
MODES: Final = (AUTO, FIELD, TAGS, OFF)
DEFAULT_TAGS: Final = ("<think>", "</think>")
# What a trace is written back as (the key Qwen3's and DeepSeek-R1's chat templates read).
TRACE_KEY: Final = "reasoning_content"
_BLOCK_GAP = "\n\n"  # between the blocks of a trace written as several leading blocks


@dataclass(frozen=True, slots=True)
class Dialect:
    """How one model's replies carry their trace: ``models.X.reasoning`` and its tags."""

    mode: str = AUTO
    open_tag: str = DEFAULT_TAGS[0]
    close_tag: str = DEFAULT_TAGS[1]


DEFAULT_DIALECT: Final = Dialect()


def split_reply(
    message: Mapping[str, Any], dialect: Dialect = DEFAULT_DIALECT
) -> tuple[str, str | None]:
    """``(answer, trace)`` of one reply message; the trace is None when it had none.

    A ``content`` that is null or not a string reads as empty text.
    """
    content = message.get("content")
    if not isinstance(content, str):
        content = ""
    mode = dialect.mode
    if mode == OFF:
        return content, None
    if mode != TAGS:
        trace = field_trace(message)
        if trace is not None:
            # Servers leave the blank line that followed the closing tag.
            return _lstrip(content), trace
        if mode == FIELD:
            return content, None
    open_tag, close_tag = dialect.open_tag, dialect.close_tag
    if close_tag not in content and open_tag not in content:
        return content, None  # the common case, found by two searches in C
    return split_tags(content, open_tag, close_tag)


def field_trace(message: Mapping[str, Any]) -> str | None:
    """The trace a server's reasoning parser put in a field, or None (absent, null, empty)."""
    # The fields a trace comes in, in the order they are read (written out: this runs
    # for every reply).
    value = message.get("reasoning_content")
    if value and isinstance(value, str) and not value.isspace():
        return value
    value = message.get("reasoning")
    if value and isinstance(value, str) and not value.isspace():
        return value
    return None


def split_tags(content: str, open_tag: str, close_tag: str) -> tuple[str, str | None]:
    """``(answer, trace)`` of a reply that may hold its trace between tags.

    - Starting (after whitespace) with ``open_tag``: the trace runs to the closing tag
      that balances it (tag pairs nested inside stay in the trace; with more opening
      tags than closing ones, the last closing tag ends it). Further blocks that
      follow with only whitespace between are the trace too (joined by a blank
      line). No closing tag at all: everything after the opening tag is trace and
      there is no answer (a reply cut off while thinking).
    - Holding ``close_tag`` with no ``open_tag`` before it: everything before it is
      the trace (templates that pre-fill the opening tag).
    - Otherwise there is no trace and the content is the answer, tags and all.

    The answer is what follows the trace, leading whitespace stripped; tags later
    in the answer are its own text. The trace is stripped of the whitespace around
    it (the newlines of ``<think>\nTRACE\n</think>``), as chat templates write it back.
    """
    start = _block_start(content, open_tag)
    if start < 0:
        close = content.find(close_tag)
        if close < 0 or content.find(open_tag, 0, close) >= 0:
            return content, None
        return _lstrip(content[close + len(close_tag) :]), content[:close].strip() or None
    blocks: list[str] = []
    rest = content
    while start >= 0:
        end = _balanced_close(rest, start, open_tag, close_tag)
        if end < 0:
            blocks.append(rest[start:].strip())
            return "", _joined(blocks)
        blocks.append(rest[start:end].strip())
        rest = rest[end + len(close_tag) :]
        start = _block_start(rest, open_tag)
    return _lstrip(rest), _joined(blocks)


def _joined(blocks: list[str]) -> str | None:
    """The trace of its blocks; None when they are empty (Qwen3 with thinking off sends
    an empty ``<think></think>``)."""
    if len(blocks) == 1:
        return blocks[0] or None
    return _BLOCK_GAP.join(block for block in blocks if block) or None


def _block_start(text: str, open_tag: str) -> int:
    """Where the trace starts when ``text`` opens (after whitespace) with ``open_tag``, else -1."""
    if text.startswith(open_tag):  # the common case, without copying the text
        return len(open_tag)
    if not text or not text[0].isspace():
        return -1
    skipped = len(text) - len(text.lstrip())
    return skipped + len(open_tag) if text.startswith(open_tag, skipped) else -1


def _balanced_close(text: str, start: int, open_tag: str, close_tag: str) -> int:
    """The closing tag that balances an opening one ending at ``start``; -1 when none."""
    depth = 1
    at = start
    last = -1
    while True:
        close = text.find(close_tag, at)
        if close < 0:
            return last  # more opening tags than closing ones: the last closing one
        inner = text.find(open_tag, at, close)
        if inner >= 0:
            depth += 1
            at = inner + len(open_tag)
            continue
        depth -= 1
        last = close
        if depth == 0:
            return close
        at = close + len(close_tag)


def _lstrip(text: str) -> str:
    return text.lstrip() if text and text[0].isspace() else text


def max_tokens_of(params: Mapping[str, Any]) -> Any:
    """The request's output limit as the config sets it (either name), or None."""
    value = params.get("max_tokens")
    return params.get("max_completion_tokens") if value is None else value


def cut_off_error(model: str, params: Mapping[str, Any], trace: str, where: str) -> str:
    """Why a row (or a generation) ends when its reply ran out of tokens while reasoning.

    ``where`` names the turn or generation, e.g. ``turn 2``.
    """
    limit = max_tokens_of(params)
    said = f"max_tokens ({limit})" if limit is not None else "the server's default max_tokens"
    return (
        f"{where}: the reply was cut off by {said} while reasoning: a {len(trace)}-character "
        "trace and no answer (finish_reason: length); not requested again, as it would cost "
        f"the trace again: raise models.{model}.params.max_tokens, or lower the model's "
        "reasoning effort"
    )


def with_trace(answer: str, trace: str | None) -> dict[str, str]:
    """The assistant message of a reply: its answer, and its trace when it had one."""
    if trace is None:
        return {"role": "assistant", "content": answer}
    return {"role": "assistant", "content": answer, TRACE_KEY: trace}


def tags_problem(raw: Any) -> str | None:
    """Why ``reasoning_tags`` is not two distinct non-empty strings, or None when it is."""
    if (
        not isinstance(raw, Sequence)
        or isinstance(raw, str)
        or len(raw) != 2
        or not all(isinstance(tag, str) and tag and not tag.isspace() for tag in raw)
    ):
        return f'must be two tags, opening and closing, e.g. ["<think>", "</think>"]; got {raw!r}'
    if raw[0] == raw[1]:
        return f"the opening and closing tags must differ; got {raw!r}"
    return None
