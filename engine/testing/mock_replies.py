"""What the mock server says: deterministic replies, usage counts and fault choice.

Pure functions only (no loop, no sockets), so tests can recompute exactly what
the mock answered for any history. ``engine.testing.mock_server`` wires them to aiohttp.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from engine.testing.mock_judges import judge_json

# Fault kinds, as they appear in ``MockStats.faults``.
HANG = "hang"
DROP = "drop"
RATE_LIMITED = "429"
SERVER_ERROR = "500"
MALFORMED = "malformed"
KV_FULL = "kv_full"  # llama.cpp's 500 when conversations outgrow a shared KV cache
INVALID_JSON = "invalid_json"  # a 200 whose reply is not the JSON the request asked for
FAIL_MODEL = "fail_model"
CONTEXT = "context"  # llama.cpp's 400 for a request longer than a slot's context
OK = "ok"
# The order of Faults.rates().
_RANDOM_FAULTS = (HANG, DROP, RATE_LIMITED, SERVER_ERROR, MALFORMED, KV_FULL, INVALID_JSON)

MAX_N = 128
# How the mock returns a reasoning trace (``turnstile mock-server --reasoning``): in a
# field, or inline in content with both tags or only the closing one.
REASONING_DIALECTS = ("reasoning_content", "reasoning", "think", "think-close")
_WORD = re.compile(r"\S+")
_TEXT_MARKER = re.compile(r"<text (\d+)>")
_SECTION = re.compile(r"^###", re.MULTILINE)
_RATING = re.compile(r"\[\[rating=([1-5])\]\]")
_NO_RATING = "[[rating=none]]"


@dataclass(slots=True)
class Faults:
    """Per-request fault probabilities (0..1), drawn from a ``random.Random(seed)``.

    Mutable on purpose: tests raise and lower rates between phases of one run.
    ``fail_models`` maps a model name to the HTTP status it always gets.
    """

    rate_429: float = 0.0
    rate_500: float = 0.0
    rate_drop: float = 0.0
    rate_malformed: float = 0.0
    rate_hang: float = 0.0
    rate_kv_full: float = 0.0
    rate_invalid_json: float = 0.0  # replies of JSON requests that are not JSON
    retry_after_s: float = 0.05
    seed: int = 0
    fail_models: dict[str, int] = field(default_factory=dict)
    context_tokens: int | None = None  # a slot's context, as llama.cpp's -c / -np
    # Error bodies (and broken 200 bodies) quote the request's Authorization header,
    # as a careless server or proxy does: the client must not store it.
    echo_authorization: bool = False
    # Simulated users (models named ``user-...``, see ``user_reply``): the share of their
    # messages that carry the end marker, and that repeat an earlier user message.
    user_end_rate: float = 0.0
    user_repeat_rate: float = 0.0

    def __post_init__(self) -> None:
        problems = [
            f"Faults.{name}: {value!r} is not a probability from 0 to 1"
            for name, value in self.rates()
            if not 0.0 <= value <= 1.0
        ]
        if sum(value for _, value in self.rates()) > 1.0 + 1e-9:
            problems.append("Faults: the fault rates add up to more than 1")
        users = (("user_end_rate", self.user_end_rate), ("user_repeat_rate", self.user_repeat_rate))
        problems += [
            f"Faults.{name}: {value!r} is not a probability from 0 to 1"
            for name, value in users
            if not 0.0 <= value <= 1.0
        ]
        if self.user_end_rate + self.user_repeat_rate > 1.0 + 1e-9:
            problems.append("Faults: user_end_rate and user_repeat_rate add up to more than 1")
        if self.retry_after_s < 0:
            problems.append(f"Faults.retry_after_s: {self.retry_after_s!r} must be >= 0")
        problems += [
            f"Faults.fail_models[{model!r}]: {status!r} is not an HTTP error status (400-599)"
            for model, status in self.fail_models.items()
            if not (isinstance(status, int) and 400 <= status <= 599)
        ]
        if problems:
            raise ValueError("\n".join(problems))

    def rates(self) -> list[tuple[str, float]]:
        """The random faults in decision order, each with its probability."""
        return [
            ("rate_hang", self.rate_hang),
            ("rate_drop", self.rate_drop),
            ("rate_429", self.rate_429),
            ("rate_500", self.rate_500),
            ("rate_malformed", self.rate_malformed),
            ("rate_kv_full", self.rate_kv_full),
            ("rate_invalid_json", self.rate_invalid_json),
        ]


def pick_fault(faults: Faults, model: str, draw: float) -> str:
    """Decide one request's fate: a fault kind or ``OK``.

    ``fail_models`` wins without looking at ``draw``; otherwise ``draw`` (uniform
    in [0, 1)) picks hang, drop, 429, 500, malformed or ok by cumulative probability.
    """
    if model in faults.fail_models:
        return FAIL_MODEL
    edge = 0.0
    for kind, (_, rate) in zip(_RANDOM_FAULTS, faults.rates(), strict=True):
        edge += rate
        if draw < edge:
            return kind
    return OK


class BadRequest(ValueError):
    """The request body is unusable; the message is sent back to the client as a 400."""


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """The fields of a chat completion request that the mock looks at."""

    model: str
    messages: list[dict[str, Any]]
    n: int = 1
    max_tokens: int | None = None
    json_schema: dict[str, Any] | None = None  # response_format: {type: json_schema, ...}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_chat_request(body: object) -> ChatRequest:
    """Validate a decoded ``/v1/chat/completions`` body; raise ``BadRequest`` naming the fix."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    if body.get("stream"):
        raise BadRequest("streaming is not supported by the mock")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' must be a non-empty string")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {role, content}")
    for i, message in enumerate(messages):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise BadRequest(f"messages[{i}] must be an object with string 'role' and 'content'")
    n = body.get("n")
    if n is None:
        n = 1
    elif not _is_int(n) or not 1 <= n <= MAX_N:
        raise BadRequest(f"'n' must be an integer from 1 to {MAX_N}")
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        # Newer OpenAI clients send this name instead.
        max_tokens = body.get("max_completion_tokens")
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise BadRequest("'max_tokens' must be a positive integer")
    return ChatRequest(
        model=model,
        messages=messages,
        n=n,
        max_tokens=max_tokens,
        json_schema=_json_schema(body.get("response_format")),
    )


def _json_schema(response_format: object) -> dict[str, Any] | None:
    """The schema of an OpenAI ``response_format: {type: json_schema, json_schema: {schema}}``."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict) or response_format.get("type") != "json_schema":
        raise BadRequest("'response_format' must be {type: json_schema, json_schema: {...}}")
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise BadRequest("'response_format.json_schema.schema' must be a JSON Schema object")
    return schema


def json_reply(schema: dict[str, Any], seed: str) -> Any:
    """A value that fits ``schema`` (its common keywords), the same for the same seed text.

    What a server with structured output answers: strings are ``seed``, numbers
    its length, and every property of an object is filled in.
    """
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if schema.get("enum"):
        return schema["enum"][len(seed) % len(schema["enum"])]
    if kind == "object" or "properties" in schema:
        props = schema.get("properties")
        props = props if isinstance(props, dict) else {}
        return {name: json_reply(sub, f"{seed} {name}") for name, sub in props.items()}
    if kind == "array":
        items = schema.get("items")
        count = max(1, int(schema.get("minItems", 1)))
        return [json_reply(items if isinstance(items, dict) else {}, seed) for _ in range(count)]
    if kind == "integer":
        return max(len(seed), int(schema.get("minimum", 0)))
    if kind == "number":
        return float(max(len(seed), schema.get("minimum", 0)))
    if kind == "boolean":
        return len(seed) % 2 == 0
    if kind == "null":
        return None
    return seed


def request_key(model: str, messages: list[dict[str, Any]]) -> str:
    """A stable id for one distinct request: sha256 hex of orjson ``[model, messages]``."""
    return hashlib.sha256(orjson.dumps([model, messages])).hexdigest()


def count_words(text: str) -> int:
    """Whitespace-separated words: the mock's notion of a token."""
    return len(text.split())


def truncate_words(text: str, limit: int) -> tuple[str, bool]:
    """Cut ``text`` after ``limit`` words, keeping its whitespace; say whether it was cut."""
    ends = [m.end() for m in itertools.islice(_WORD.finditer(text), limit + 1)]
    if len(ends) <= limit:
        return text, False
    return text[: ends[limit - 1]] if limit > 0 else "", True


def _last_user_content(messages: list[dict[str, Any]]) -> str | None:
    for message in reversed(messages):
        if message.get("role") == "user":
            return str(message.get("content", ""))
    return None


def judge_candidates(prompt: str) -> list[tuple[int, str]]:
    """The ``(i, text)`` candidates of an UltraFeedback-style rating prompt.

    A candidate runs from its ``<text i>`` marker to the next marker, a line
    starting with ``###`` or the end. Templates often show the format first
    with placeholder markers, so only the last run starting at ``<text 1>`` counts.
    """
    markers = list(_TEXT_MARKER.finditer(prompt))
    firsts = [i for i, m in enumerate(markers) if m.group(1) == "1"]
    if firsts:
        markers = markers[firsts[-1] :]
    candidates = []
    for i, marker in enumerate(markers):
        end = markers[i + 1].start() if i + 1 < len(markers) else len(prompt)
        section = _SECTION.search(prompt, marker.end(), end)
        if section is not None:
            end = section.start()
        candidates.append((int(marker.group(1)), prompt[marker.end() : end].strip()))
    return candidates


def judge_rating(candidate: str) -> int | None:
    """The mock judge's rating of one candidate text; ``None`` means "N/A"."""
    forced = _RATING.search(candidate)
    if forced is not None:
        return int(forced.group(1))
    if _NO_RATING in candidate:
        return None
    return 1 + int(hashlib.sha256(candidate.strip().encode()).hexdigest(), 16) % 5


def judge_reply(prompt: str) -> str:
    """One ``#### Output for Text i`` block per candidate, separated by blank lines."""
    blocks = []
    for i, text in judge_candidates(prompt):
        rating = judge_rating(text)
        if rating is None:
            blocks.append(
                f"#### Output for Text {i}\nRating: N/A\n"
                f"Rationale: The mock judge declines to rate text {i}."
            )
        else:
            blocks.append(
                f"#### Output for Text {i}\nRating: {rating}\n"
                f"Rationale: The mock judge gives text {i} a {rating} out of 5."
            )
    return "\n\n".join(blocks)


# A simulated user: a model whose name starts with USER_PREFIX asks questions.
USER_PREFIX = "user-"
END_MARKER = "[END]"
_TOPICS = (
    "memory", "speed", "cost", "safety", "history", "scale", "errors", "testing",
    "design", "limits", "examples", "tradeoffs", "precision", "security", "caching", "data",
)  # fmt: skip


def user_reply(
    model: str,
    messages: list[dict[str, Any]],
    choice: int = 0,
    *,
    end_rate: float = 0.0,
    repeat_rate: float = 0.0,
) -> str:
    """A simulated user's next message: a function of the request alone.

    The request is the conversation seen from the user's side (the teacher's replies
    as ``user``, the user's messages as ``assistant``). The message is
    ``[{model}] question {k}: how do {a} and {b} bear on {snippet}? #{digest}``, k the
    user message's 1-based number, a and b two topic words and digest 12 hex chars of
    the request's sha256, snippet the last message (the teacher's last reply) as in
    ``reply_for``. A draw from the same digest makes ``end_rate`` of them end with
    ``END_MARKER`` and ``repeat_rate`` of them an exact copy of the conversation's
    first user message.
    """
    digest = hashlib.sha256(orjson.dumps([model, messages, choice, "user"])).hexdigest()
    draw = int(digest[12:25], 16) / 16**13
    earlier = [str(m.get("content", "")) for m in messages if m.get("role") == "assistant"]
    if draw < end_rate + repeat_rate and draw >= end_rate and earlier:
        return earlier[0]
    last = str(messages[-1].get("content", "")) if messages else ""
    snippet = " ".join(last.split())[:40]
    a = _TOPICS[int(digest[0], 16)]
    b = _TOPICS[int(digest[1], 16)]
    text = f"[{model}] question {len(earlier) + 1}: how do {a} and {b} bear on {snippet}? "
    text += f"#{digest[:12]}"
    return f"{text} {END_MARKER}" if draw < end_rate else text


def reply_for(
    model: str,
    messages: list[dict[str, Any]],
    choice: int = 0,
    *,
    end_rate: float = 0.0,
    repeat_rate: float = 0.0,
) -> str:
    """The mock's answer to ``messages``: a function of the request alone.

    ``[{model}] answer {k}: {snippet} #{digest}`` where k counts the user
    messages, snippet is the last user message (whitespace collapsed, 40 chars)
    and digest is 12 hex chars of sha256(orjson([model, messages, choice])).
    A last user message holding ``<text 1>`` is a judge prompt: see ``judge_reply``.
    A model named ``user-...`` is a simulated user: see ``user_reply`` (with
    ``end_rate`` and ``repeat_rate``).
    """
    if model.startswith(USER_PREFIX):
        return user_reply(model, messages, choice, end_rate=end_rate, repeat_rate=repeat_rate)
    last = _last_user_content(messages)
    if last is not None and "<text 1>" in last:
        return judge_reply(last)
    k = sum(1 for message in messages if message.get("role") == "user")
    snippet = " ".join((last or "").split())[:40]
    digest = hashlib.sha256(orjson.dumps([model, messages, choice])).hexdigest()[:12]
    return f"[{model}] answer {k}: {snippet} #{digest}"


@functools.cache
def _filler(size: int) -> str:
    """Words to pad a trace to ``size`` characters (made once per size: the mock stays cheap)."""
    words = []
    length = 0
    i = 0
    while length < size:
        word = f" step{i % 97}"
        words.append(word)
        length += len(word)
        i += 1
    return "".join(words)


def trace_for(model: str, messages: list[dict[str, Any]], choice: int = 0, size: int = 0) -> str:
    """The mock's reasoning trace for ``messages``: a function of the request alone.

    ``Thinking about {snippet} #{digest}`` (digest of the request and choice, unlike
    the answer's), then filler words up to ``size`` characters when it is larger.
    """
    last = _last_user_content(messages)
    snippet = " ".join((last or "").split())[:40]
    digest = hashlib.sha256(orjson.dumps([model, messages, choice, "trace"])).hexdigest()[:12]
    head = f"Thinking about {snippet} #{digest}"
    if size <= len(head):
        return head
    return head + _filler(size)[: size - len(head)].rstrip()


def reasoning_message(dialect: str, trace: str, answer: str, cut: bool) -> dict[str, Any]:
    """The reply message carrying ``trace`` in ``dialect``; ``cut``: the trace was cut off
    (no closing tag, and the answer is empty)."""
    if dialect in ("reasoning_content", "reasoning"):
        return {"role": "assistant", "content": answer or None, dialect: trace}
    if dialect == "think":
        content = f"<think>\n{trace}" + ("" if cut else f"\n</think>\n\n{answer}")
    else:  # think-close: the chat template pre-filled the opening tag
        content = trace + ("" if cut else f"\n</think>\n\n{answer}")
    return {"role": "assistant", "content": content}


def prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """Words over all message contents plus 3 per message."""
    return sum(count_words(str(m.get("content", ""))) + 3 for m in messages)


def completion_body(
    request: ChatRequest,
    *,
    completion_id: str,
    created: int,
    reasoning: str | None = None,
    trace_chars: int = 0,
    user_rates: tuple[float, float] = (0.0, 0.0),
    position_bias: float = 0.0,
) -> dict[str, Any]:
    """The OpenAI-shaped ``chat.completion`` object answering ``request``.

    A structured judge request (pairwise, or scoring a dialogue) gets its JSON verdict
    (engine.testing.mock_judges; ``position_bias``: the share of pairwise verdicts
    that name the answer shown first).

    ``user_rates``: a simulated user's ``(end_rate, repeat_rate)`` (``user_reply``).

    With ``reasoning`` (one of REASONING_DIALECTS) each choice thinks first: a trace
    (``trace_for``, ``trace_chars`` long) in that dialect, then the answer. ``max_tokens``
    counts the trace's words first: a trace longer than it is cut off with no answer.
    """
    choices = []
    completion_tokens = reasoning_tokens = 0
    judged = judge_json(request.messages, position_bias)
    for choice in range(request.n):
        content = reply_for(
            request.model,
            request.messages,
            choice,
            end_rate=user_rates[0],
            repeat_rate=user_rates[1],
        )
        if judged is not None:
            content = judged
        elif request.json_schema is not None:
            content = orjson.dumps(json_reply(request.json_schema, content)).decode()
        finish_reason = "stop"
        left = request.max_tokens
        trace = None
        if reasoning is not None:
            trace = trace_for(request.model, request.messages, choice, trace_chars)
            if left is not None:
                trace, cut = truncate_words(trace, left)
                left -= count_words(trace)
                if cut:
                    finish_reason, content = "length", ""
            reasoning_tokens += count_words(trace)
        if left is not None and content:
            content, cut = truncate_words(content, left)
            if cut:
                finish_reason = "length"
        completion_tokens += count_words(content)
        if reasoning is None or trace is None:
            message: dict[str, Any] = {"role": "assistant", "content": content}
        else:
            message = reasoning_message(reasoning, trace, content, cut=not content)
        choices.append({"index": choice, "message": message, "finish_reason": finish_reason})
    prompt = prompt_tokens(request.messages)
    completion_tokens += reasoning_tokens
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
    }
    if reasoning is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": request.model,
        "choices": choices,
        "usage": usage,
    }


def context_overflow(request: ChatRequest, context_tokens: int | None) -> str | None:
    """llama.cpp's message for a request that does not fit a slot's context, or None."""
    if context_tokens is None:
        return None
    needed = prompt_tokens(request.messages) + (request.max_tokens or 0)
    if needed <= context_tokens:
        return None
    return (
        f"request ({needed} tokens) exceeds the available context size "
        f"({context_tokens} tokens), try increasing it"
    )


def error_body(message: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    """An OpenAI-style error object."""
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


# -- /v1/completions and /v1/embeddings (a batch file's other urls) ---------------------

EMBEDDING_DIMS = 8  # the mock's embeddings, unless the request asks for `dimensions`


def _model_of(body: object) -> str:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' must be a non-empty string")
    return model


def _texts(body: dict[str, Any], key: str) -> list[str]:
    """``body[key]`` as a list of strings: one string, or a non-empty list of them."""
    value = body.get(key)
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise BadRequest(f"'{key}' must be a string or a non-empty list of strings")


def raw_request_key(path: str, body: object) -> str:
    """``requests_by_key``'s key for a request to ``path`` other than chat completions."""
    return f"{path} {hashlib.sha256(orjson.dumps(body)).hexdigest()[:16]}"


def text_for(model: str, prompt: str, choice: int = 0) -> str:
    """The mock's completion of ``prompt``: ``[{model}] completes: {snippet} #{digest}``."""
    snippet = " ".join(prompt.split())[:40]
    digest = hashlib.sha256(orjson.dumps([model, prompt, choice, "text"])).hexdigest()[:12]
    return f"[{model}] completes: {snippet} #{digest}"


def text_completion_body(body: object, *, completion_id: str, created: int) -> dict[str, Any]:
    """The ``text_completion`` object answering a ``/v1/completions`` request (``n``
    choices per prompt, ``max_tokens`` cutting words); BadRequest for an unusable body."""
    model = _model_of(body)
    assert isinstance(body, dict)
    prompts = _texts(body, "prompt")
    n, max_tokens = body.get("n", 1), body.get("max_tokens")
    if not _is_int(n) or not 1 <= n <= MAX_N:
        raise BadRequest(f"'n' must be an integer from 1 to {MAX_N}")
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise BadRequest("'max_tokens' must be a positive integer")
    choices = []
    completion_tokens = 0
    for p, prompt in enumerate(prompts):
        for c in range(n):
            text, reason = text_for(model, prompt, c), "stop"
            if max_tokens is not None:
                text, cut = truncate_words(text, max_tokens)
                reason = "length" if cut else reason
            completion_tokens += count_words(text)
            choices.append(
                {"index": p * n + c, "text": text, "logprobs": None, "finish_reason": reason}
            )
    prompt_count = sum(count_words(prompt) for prompt in prompts)
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_count,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_count + completion_tokens,
        },
    }


def embedding_for(model: str, text: str, dims: int = EMBEDDING_DIMS) -> list[float]:
    """The mock's embedding of ``text``: ``dims`` numbers in [-1, 1) from its digest."""
    values: list[float] = []
    block = 0
    while len(values) < dims:
        digest = hashlib.sha256(orjson.dumps([model, text, block])).digest()
        values += [(b - 128) / 128 for b in digest]
        block += 1
    return values[:dims]


def embeddings_body(body: object) -> dict[str, Any]:
    """The ``list`` of embeddings answering a ``/v1/embeddings`` request (``dimensions``
    long, else ``EMBEDDING_DIMS``); BadRequest for an unusable body."""
    model = _model_of(body)
    assert isinstance(body, dict)
    texts = _texts(body, "input")
    dims = body.get("dimensions", EMBEDDING_DIMS)
    if not _is_int(dims) or not 1 <= dims <= 4096:
        raise BadRequest("'dimensions' must be an integer from 1 to 4096")
    tokens = sum(count_words(text) for text in texts)
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": embedding_for(model, text, dims)}
            for i, text in enumerate(texts)
        ],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
