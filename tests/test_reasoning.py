"""Reasoning traces, pure: splitting replies per dialect, the completion, the mock's
dialects, the dialogue's history, and what export does with traces."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from engine.errors import ModelError
from engine.http.client import parse_completion
from engine.http.reasoning import (
    Dialect,
    cut_off_error,
    field_trace,
    split_reply,
    split_tags,
    tags_problem,
)
from engine.input.rows import InputRow
from engine.output.traces import Reshaper, inline
from engine.tasks.asking import Answer, Turn, answer_of, reply_record
from engine.tasks.distill.dialogue import new_dialogue, output_row
from engine.tasks.preference.pairs import REASONING_KEY, preference_row
from engine.testing.mock_replies import (
    REASONING_DIALECTS,
    ChatRequest,
    completion_body,
    count_words,
    reply_for,
    trace_for,
)

OPEN, CLOSE = "<think>", "</think>"


# --- split_tags: every shape ------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "answer", "trace"),
    [
        ("<think>T</think>A", "A", "T"),
        ("<think>\nT\n</think>\n\nA", "A", "T"),  # the usual newlines
        ("  \n<think>T</think>  A b ", "A b ", "T"),  # whitespace before the tag; answer's end kept
        ("T</think>A", "A", "T"),  # the opening tag pre-filled by the chat template
        ("\nT\n</think>\n\nA", "A", "T"),
        ("<think>T", "", "T"),  # no closing tag: cut off while thinking, no answer
        ("<think>T</think>", "", "T"),  # a trace with no answer
        ("T</think>", "", "T"),
        ("<think>\n\n</think>\n\nA", "A", None),  # Qwen3 with thinking off: an empty block
        ("A", "A", None),
        ("", "", None),
        ("   ", "   ", None),
        # Tags inside the answer are its own text.
        ("<think>T</think>A uses <think> and </think>.", "A uses <think> and </think>.", "T"),
        ("A <think>x</think> B", "A <think>x</think> B", None),  # not at the start: no trace
        ("T</think>A</think>B", "A</think>B", "T"),  # the first closing tag ends the trace
        ("x <think>y</think>z", "x <think>y</think>z", None),  # an opening tag before the close
        # Nested: the balanced closing tag ends the trace.
        ("<think>a<think>b</think>c</think>A", "A", "a<think>b</think>c"),
        ("<think>a<think>b</think>c", "c", "a<think>b"),  # unbalanced: the last closing tag
        # Repeated leading blocks are one trace; a block after the answer is the answer's.
        ("<think>a</think>\n<think>b</think>\nA", "A", "a\n\nb"),
        ("<think>a</think>A<think>b</think>", "A<think>b</think>", "a"),
        ("<think>a</think><think>b", "", "a\n\nb"),
    ],
)
def test_split_tags(content: str, answer: str, trace: str | None) -> None:
    assert split_tags(content, OPEN, CLOSE) == (answer, trace)


def test_other_tags() -> None:
    assert split_tags("[THINK]T[/THINK]A", "[THINK]", "[/THINK]") == ("A", "T")
    assert split_tags("<think>T</think>A", "[THINK]", "[/THINK]") == ("<think>T</think>A", None)


# --- split_reply: the four modes ------------------------------------------------------------


def test_auto_reads_a_field_first_then_tags() -> None:
    assert split_reply({"content": "\n\nA", "reasoning_content": "T"}) == ("A", "T")
    assert split_reply({"content": "A", "reasoning": "T"}) == ("A", "T")
    assert split_reply({"content": None, "reasoning_content": "T"}) == ("", "T")
    # A field wins; content is then the answer as it is (no tag parsing).
    assert split_reply({"content": "<think>x</think>A", "reasoning_content": "T"}) == (
        "<think>x</think>A",
        "T",
    )
    # An empty or null field is no trace: the tags are read.
    for empty in ("", "  ", None):
        message = {"content": "<think>T</think>A", "reasoning_content": empty}
        assert split_reply(message) == ("A", "T")


def test_field_tags_and_off() -> None:
    inline_reply = {"content": "<think>T</think>A"}
    fielded = {"content": "<think>x</think>A", "reasoning": "T"}
    assert split_reply(inline_reply, Dialect("field")) == ("<think>T</think>A", None)
    assert split_reply(fielded, Dialect("field")) == ("<think>x</think>A", "T")
    assert split_reply(fielded, Dialect("tags")) == ("A", "x")
    assert split_reply(inline_reply, Dialect("off")) == ("<think>T</think>A", None)
    assert split_reply(fielded, Dialect("off")) == ("<think>x</think>A", None)
    magistral = Dialect("auto", "[THINK]", "[/THINK]")
    assert split_reply({"content": "[THINK]T[/THINK]A"}, magistral) == ("A", "T")


def test_field_trace_order() -> None:
    assert field_trace({"reasoning_content": "a", "reasoning": "b"}) == "a"
    assert field_trace({"reasoning_content": None, "reasoning": "b"}) == "b"
    assert field_trace({"reasoning": 3}) is None


def test_tags_are_checked() -> None:
    assert tags_problem(["[THINK]", "[/THINK]"]) is None
    for bad in ("<think>", ["<think>"], ["<think>", ""], ["x", "x"], ["a", 1]):
        assert tags_problem(bad) is not None


def test_the_cut_off_message_names_where_and_max_tokens() -> None:
    message = cut_off_error("teacher", {"max_tokens": 256}, "x" * 10, "turn 2")
    assert message.startswith("turn 2: ")
    assert "max_tokens (256)" in message and "models.teacher.params.max_tokens" in message
    assert "default max_tokens" in cut_off_error("t", {}, "x", "turn 0")


# --- parse_completion -----------------------------------------------------------------------


def body(message: dict[str, Any], finish: str = "stop", **usage: Any) -> bytes:
    payload: dict[str, Any] = {"choices": [{"message": message, "finish_reason": finish}]}
    if usage:
        payload["usage"] = usage
    return orjson.dumps(payload)


def test_a_completion_carries_answer_trace_and_reasoning_tokens() -> None:
    raw = body(
        {"content": "A", "reasoning_content": "T"},
        prompt_tokens=5,
        completion_tokens=9,
        completion_tokens_details={"reasoning_tokens": 7},
    )
    completion = parse_completion(raw)
    assert completion.texts == ["A"] and completion.trace() == "T"
    assert (completion.prompt_tokens, completion.completion_tokens) == (5, 9)
    assert completion.reasoning_tokens == 7
    assert not completion.cut_off()
    plain = parse_completion(body({"content": "A"}, completion_tokens=3))
    assert plain.trace() is None and plain.traces is None and plain.reasoning_tokens == 0


def test_a_reply_cut_off_while_reasoning_is_returned_not_retried() -> None:
    for message in (
        {"content": None, "reasoning_content": "T"},
        {"content": "", "reasoning": "T"},
        {"content": "<think>T"},
        {"content": "<think>T</think>  "},
    ):
        completion = parse_completion(body(message, "length"))
        assert completion.cut_off(), message
        assert completion.texts == [""] and completion.trace() == "T"


def test_an_empty_reply_is_retryable_unless_cut_off_while_reasoning() -> None:
    for message, finish in (
        ({"content": ""}, "length"),  # no trace: retryable, as before
        ({"content": None}, "stop"),
        ({"content": "<think></think>"}, "length"),  # an empty trace is no trace
        ({"content": None, "reasoning_content": "T"}, "stop"),  # not cut off: try again
    ):
        with pytest.raises(ModelError) as caught:
            parse_completion(body(message, finish))
        assert caught.value.retryable, message


def test_negative_or_odd_usage_counts_as_zero() -> None:
    raw = body(
        {"content": "A"},
        prompt_tokens=-5,
        completion_tokens=-1,
        completion_tokens_details={"reasoning_tokens": -3},
    )
    completion = parse_completion(raw)
    assert (completion.prompt_tokens, completion.completion_tokens) == (0, 0)
    assert completion.reasoning_tokens == 0
    odd = parse_completion(
        body({"content": "A"}, prompt_tokens=True, completion_tokens_details=[1])
    )
    assert (odd.prompt_tokens, odd.reasoning_tokens) == (0, 0)


def test_each_choice_has_its_own_trace() -> None:
    raw = orjson.dumps(
        {
            "choices": [
                {"message": {"content": "A0"}, "finish_reason": "stop"},
                {"message": {"content": "<think>T1</think>A1"}, "finish_reason": "stop"},
            ]
        }
    )
    completion = parse_completion(raw)
    assert completion.texts == ["A0", "A1"]
    assert completion.traces == [None, "T1"]


def test_off_leaves_the_content_as_it_comes() -> None:
    raw = body({"content": "<think>T</think>A", "reasoning_content": "R"})
    assert parse_completion(raw, dialect=Dialect("off")).texts == ["<think>T</think>A"]


# --- the mock's dialects ------------------------------------------------------------------


MESSAGES = [{"role": "user", "content": "why is the sky blue?"}]


@pytest.mark.parametrize("dialect", REASONING_DIALECTS)
def test_the_mock_answers_in_each_dialect(dialect: str) -> None:
    request = ChatRequest(model="m", messages=MESSAGES)
    reply = completion_body(
        request, completion_id="x", created=0, reasoning=dialect, trace_chars=500
    )
    completion = parse_completion(orjson.dumps(reply))
    trace = trace_for("m", MESSAGES, 0, 500)
    assert completion.texts == [reply_for("m", MESSAGES)]
    assert completion.trace() == trace
    assert len(trace) <= 500 and len(trace) > 450
    assert completion.reasoning_tokens == count_words(trace)
    assert completion.completion_tokens == count_words(trace) + count_words(completion.texts[0])


@pytest.mark.parametrize("dialect", ["reasoning_content", "reasoning", "think"])
def test_the_mock_cuts_a_long_trace_off_with_no_answer(dialect: str) -> None:
    request = ChatRequest(model="m", messages=MESSAGES, max_tokens=5)
    reply = completion_body(
        request, completion_id="x", created=0, reasoning=dialect, trace_chars=500
    )
    completion = parse_completion(orjson.dumps(reply))
    assert completion.cut_off()
    assert count_words(completion.trace() or "") == 5


def test_the_mock_without_reasoning_is_unchanged() -> None:
    reply = completion_body(ChatRequest(model="m", messages=MESSAGES), completion_id="x", created=0)
    assert reply["choices"][0]["message"] == {
        "role": "assistant",
        "content": reply_for("m", MESSAGES),
    }
    assert "completion_tokens_details" not in reply["usage"]


# --- the dialogue: history and the output row --------------------------------------------


def two_turns(keep: bool) -> Any:
    row = InputRow(
        line=0,
        id="r",
        messages=[{"role": "user", "content": "u0"}, {"role": "user", "content": "u1"}],
        extra={},
    )
    return new_dialogue(row, keep_reasoning=keep)


def test_history_drops_traces_and_the_row_keeps_them() -> None:
    d = two_turns(keep=False)
    d.apply(Answer("a0", 1, 2, "stop", trace="t0", reasoning_tokens=1))
    assert d.history() == [
        {"role": "user", "content": "u0"},
        {"role": "assistant", "content": "a0"},
        {"role": "user", "content": "u1"},
    ]
    d.apply(Answer("a1", 1, 2, "stop"))
    row = output_row(d, "m")
    assert row["messages"] == [
        {"role": "user", "content": "u0"},
        {"role": "assistant", "content": "a0", "reasoning_content": "t0"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},  # no trace: no key
    ]
    assert row["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "reasoning_tokens": 1}


def test_history_keep_sends_each_trace_back() -> None:
    d = two_turns(keep=True)
    d.apply(Answer("a0", trace="t0"))
    assert d.history()[1] == {"role": "assistant", "content": "a0", "reasoning_content": "t0"}
    d.apply(Answer("a1", trace="t1"))
    assert [m.get("reasoning_content") for m in output_row(d, "m")["messages"]] == [
        None,
        "t0",
        None,
        "t1",
    ]


def test_a_turn_record_keeps_its_trace() -> None:
    reply = Answer("a", 3, 4, "stop", trace="t" * 100, reasoning_tokens=2)
    record = reply_record(5, Turn(0), reply)
    assert record["k"] == "t" and record["i"] == 0
    assert record["r"] == "t" * 100 and record["n"] == 2
    assert answer_of(orjson.loads(orjson.dumps(record))) == reply
    plain = reply_record(5, Turn(0), Answer("a"))
    assert "r" not in plain and "n" not in plain
    assert Answer("", finish_reason="length", trace="t").cut_off
    assert not Answer("", finish_reason="length").cut_off


# --- preference rows ---------------------------------------------------------------------


def test_chosen_and_rejected_carry_their_traces() -> None:
    row = preference_row(
        extra={},
        row_id=1,
        prompt=MESSAGES,
        generations=["x", "y"],
        generation_models=["a", "b"],
        generation_errors=[],
        usage={},
        judged=True,
        ratings=[5, 1],
        rationales=[None, None],
        reasoning=["tx", None],
    )
    assert row[REASONING_KEY] == ["tx", None]
    assert list(row)[:3] == ["id", "prompt", "generations"] and list(row)[3] == REASONING_KEY
    assert row["chosen"] == [{"role": "assistant", "content": "x", "reasoning_content": "tx"}]
    assert row["rejected"] == [{"role": "assistant", "content": "y"}]


# --- export ------------------------------------------------------------------------------


def distilled() -> dict[str, Any]:
    return {
        "id": 1,
        "reasoning": "an input column",
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "A", "reasoning_content": "T"},
        ],
    }


def test_export_keep_inline_drop() -> None:
    assert Reshaper("keep", "distill")(distilled()) == distilled()
    inlined = Reshaper("inline", "distill")(distilled())
    assert inlined["messages"][1] == {"role": "assistant", "content": inline("T", "A")}
    assert inline("T", "A") == "<think>\nT\n</think>\n\nA"
    assert inlined["reasoning"] == "an input column"  # not distillation's: left alone
    dropped = Reshaper("drop", "distill")(distilled())
    assert dropped["messages"][1] == {"role": "assistant", "content": "A"}


def test_export_of_parallel_lists() -> None:
    row = {"generations": ["a", "b"], "reasoning": ["ta", None]}
    assert Reshaper("inline", "generate")(dict(row)) == {"generations": [inline("ta", "a"), "b"]}
    assert Reshaper("drop", "generate")(dict(row)) == {"generations": ["a", "b"]}
    parsed = {"generations": [{"k": 1}], "reasoning": ["t"]}
    assert Reshaper("inline", "generate")(dict(parsed)) == parsed  # no text to inline into
    prefs = {"generations": ["a"], "generation_reasoning": ["t"], "chosen": None}
    assert Reshaper("drop", "preference")(dict(prefs)) == {"generations": ["a"], "chosen": None}
    reshaper = Reshaper("drop", "preference")
    assert reshaper.touches(orjson.dumps(prefs))
    assert not reshaper.touches(b'{"usage": {"reasoning_tokens": 0}}')
    assert not Reshaper("keep", "preference").touches(orjson.dumps(prefs))
