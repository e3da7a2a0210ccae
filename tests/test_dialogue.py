"""The distillation state machine: turns, history, replies and the output row."""

from __future__ import annotations

from typing import Any

import pytest

from engine.errors import InputError
from engine.input.rows import InputRow, Message
from engine.tasks.asking import Answer
from engine.tasks.distill.dialogue import Dialogue, new_dialogue, output_row, split_turns


def sys_(text: str) -> Message:
    return {"role": "system", "content": text}


def user(text: str) -> Message:
    return {"role": "user", "content": text}


def bot(text: str) -> Message:
    return {"role": "assistant", "content": text}


def tool(text: str) -> Message:
    return {"role": "tool", "content": text}


def dialogue(messages: list[Message], system_prompt: str | None = None, **extra: Any) -> Dialogue:
    return new_dialogue(InputRow(line=0, id="d", messages=messages, extra=extra), system_prompt)


# --- split_turns -------------------------------------------------------------------------


def test_user_assistant_user_is_two_turns() -> None:
    turns, tail = split_turns([user("a"), bot("old"), user("b")])
    assert turns == [[user("a")], [user("b")]]
    assert tail == []


def test_every_user_message_is_a_turn_by_default() -> None:
    turns, tail = split_turns([user("a"), user("b"), bot("old")])
    assert turns == [[user("a")], [user("b")]]
    assert tail == []


def test_every_user_the_issue_example() -> None:
    # [system, u1, u2, a, u3] -> [system, u1, A1, u2, A2, u3, A3]
    turns, tail = split_turns([sys_("s"), user("u1"), user("u2"), bot("a"), user("u3")])
    assert turns == [[sys_("s"), user("u1")], [user("u2")], [user("u3")]]
    assert tail == []


@pytest.mark.parametrize("n", range(1, 7))
def test_a_user_only_list_of_n_messages_is_n_turns(n: int) -> None:
    turns, _ = split_turns([user(f"u{i}") for i in range(n)])
    assert turns == [[user(f"u{i}")] for i in range(n)]


def test_every_user_keeps_a_system_message_in_the_middle_before_the_next_turn() -> None:
    turns, tail = split_turns([user("a"), sys_("mid"), user("b"), sys_("late")])
    assert turns == [[user("a")], [sys_("mid"), user("b")]]
    assert tail == [sys_("late")]


def test_as_in_input_consecutive_users_share_one_turn() -> None:
    turns, tail = split_turns([user("a"), user("b"), bot("old")], rule="as_in_input")
    assert turns == [[user("a"), user("b")]]
    assert tail == []


def test_as_in_input_splits_where_the_input_has_assistant_turns() -> None:
    messages = [sys_("s"), user("u1"), user("u2"), bot("a"), user("u3")]
    turns, _ = split_turns(messages, rule="as_in_input")
    assert turns == [[sys_("s"), user("u1"), user("u2")], [user("u3")]]


def test_as_in_input_keeps_a_system_message_in_the_middle_of_a_turn() -> None:
    turns, _ = split_turns([user("a"), sys_("mid"), user("b")], rule="as_in_input")
    assert turns == [[user("a"), sys_("mid"), user("b")]]


def test_input_assistant_turns_are_dropped() -> None:
    turns, _ = split_turns([bot("greeting"), user("a"), bot("old 1"), user("b"), bot("old 2")])
    flat = [m for turn in turns for m in turn]
    assert all(m["role"] != "assistant" for m in flat)
    assert turns == [[user("a")], [user("b")]]


def test_system_messages_stay_where_they_are() -> None:
    turns, _ = split_turns([sys_("s1"), user("a"), bot("old"), sys_("s2"), user("b")])
    assert turns == [[sys_("s1"), user("a")], [sys_("s2"), user("b")]]


def test_tool_messages_are_dropped() -> None:
    turns, _ = split_turns([user("a"), bot("call"), tool("result"), bot("answer"), user("b")])
    assert turns == [[user("a")], [user("b")]]


def test_trailing_system_message_is_the_tail() -> None:
    turns, tail = split_turns([user("a"), bot("old"), sys_("late")])
    assert turns == [[user("a")]]
    assert tail == [sys_("late")]


def test_system_prompt_is_inserted_first_when_there_is_no_system_message() -> None:
    turns, _ = split_turns([user("a"), bot("old"), user("b")], system_prompt="Be brief.")
    assert turns == [[sys_("Be brief."), user("a")], [user("b")]]


def test_system_prompt_is_not_inserted_over_an_existing_one() -> None:
    messages = [user("a"), bot("old"), sys_("own"), user("b")]
    turns, _ = split_turns(messages, system_prompt="Be brief.")
    assert turns == [[user("a")], [sys_("own"), user("b")]]


def test_split_turns_does_not_change_its_input() -> None:
    messages = [user("a"), bot("old"), user("b")]
    split_turns(messages, system_prompt="Be brief.")
    assert messages == [user("a"), bot("old"), user("b")]


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [sys_("s")],
        [bot("only")],
        [sys_("s"), bot("x"), tool("y")],
    ],
)
def test_no_user_turn_is_an_input_error(messages: list[Message]) -> None:
    with pytest.raises(InputError, match="no user turn to answer"):
        split_turns(messages)


@pytest.mark.parametrize(
    ("messages", "turn"),
    [
        ([user("")], 0),
        ([user("a"), bot("old"), user("  \n")], 1),
        ([user("a"), user(" "), bot("old")], 1),
    ],
)
def test_empty_user_content_is_an_input_error(messages: list[Message], turn: int) -> None:
    with pytest.raises(InputError, match=f"user turn {turn} is empty"):
        split_turns(messages)


def test_empty_user_content_as_in_input_names_the_turn_it_is_in() -> None:
    with pytest.raises(InputError, match="user turn 0 is empty"):
        split_turns([user("a"), user(" "), bot("old")], rule="as_in_input")


# --- Dialogue -------------------------------------------------------------------------------


def three_turns() -> Dialogue:
    return dialogue([sys_("s"), user("u0"), bot("old"), user("u1"), bot("old"), user("u2")])


def test_history_of_each_turn_holds_exactly_the_earlier_turns_and_replies() -> None:
    d = three_turns()
    assert d.next_turn == 0
    assert d.history() == [sys_("s"), user("u0")]
    d.apply(Answer("r0"))
    assert d.next_turn == 1
    assert d.history() == [sys_("s"), user("u0"), bot("r0"), user("u1")]
    d.apply(Answer("r1"))
    assert d.history() == [sys_("s"), user("u0"), bot("r0"), user("u1"), bot("r1"), user("u2")]


def test_history_is_a_fresh_list_each_time() -> None:
    d = three_turns()
    first = d.history()
    first.append(bot("mutated"))
    assert d.history() == [sys_("s"), user("u0")]


def test_done_after_every_turn_is_answered() -> None:
    d = three_turns()
    for i in range(3):
        assert d.next_turn < len(d.turns)
        d.apply(Answer(f"r{i}"))
    assert d.next_turn == len(d.turns)
    with pytest.raises(ValueError, match="no turn left to request"):
        d.history()
    with pytest.raises(ValueError, match="no turn left to answer"):
        d.apply(Answer("extra"))
    assert len(d.replies) == 3


def test_messages_so_far_then_tail_once_done() -> None:
    d = dialogue([user("u0"), bot("old"), user("u1"), bot("old"), sys_("tail")])
    assert d.messages() == []
    d.apply(Answer("r0"))
    assert d.messages() == [user("u0"), bot("r0")]
    d.apply(Answer("r1"))
    assert d.messages() == [user("u0"), bot("r0"), user("u1"), bot("r1"), sys_("tail")]


def test_usage_sums_the_replies() -> None:
    d = three_turns()
    assert d.usage() == {"prompt_tokens": 0, "completion_tokens": 0, "reasoning_tokens": 0}
    d.apply(Answer("r0", prompt_tokens=10, completion_tokens=3))
    d.apply(Answer("r1", prompt_tokens=25, completion_tokens=7, finish_reason="stop"))
    assert d.usage() == {"prompt_tokens": 35, "completion_tokens": 10, "reasoning_tokens": 0}


def test_new_dialogue_applies_the_system_prompt() -> None:
    d = dialogue([user("u0")], system_prompt="Be brief.")
    assert d.history() == [sys_("Be brief."), user("u0")]


# --- output_row -----------------------------------------------------------------------------


def test_output_row_key_order_and_content() -> None:
    d = dialogue([user("u0"), bot("old"), user("u1")], topic="t", source="s")
    d.apply(Answer("r0", prompt_tokens=4, completion_tokens=2))
    d.apply(Answer("r1", prompt_tokens=9, completion_tokens=1))
    row = output_row(d, "teacher-model")
    assert list(row) == ["topic", "source", "id", "messages", "model", "usage"]
    assert row == {
        "topic": "t",
        "source": "s",
        "id": "d",
        "messages": [user("u0"), bot("r0"), user("u1"), bot("r1")],
        "model": "teacher-model",
        "usage": {"prompt_tokens": 13, "completion_tokens": 3, "reasoning_tokens": 0},
    }


def test_output_row_without_extra_fields() -> None:
    d = dialogue([user("u0")])
    d.apply(Answer("r0"))
    assert list(output_row(d, "m")) == ["id", "messages", "model", "usage"]
