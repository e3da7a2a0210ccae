"""The simulated user's rules: role swap, end marker, the similarity rule, the turn order."""

from __future__ import annotations

import pytest

from engine.input.rows import InputRow, Message
from engine.tasks.asking import Answer
from engine.tasks.distill.dialogue import new_dialogue
from engine.tasks.distill.simulator import (
    END_MARKER,
    REPETITION,
    RETRIES,
    TURNS,
    Simulation,
    Step,
    UserRules,
    Verdict,
    again,
    judge,
    similarity,
    swapped,
    words,
)
from engine.testing.mock_replies import END_MARKER as MOCK_END
from engine.testing.mock_replies import reply_for, user_reply


def user(text: str) -> Message:
    return {"role": "user", "content": text}


def bot(text: str) -> Message:
    return {"role": "assistant", "content": text}


def simulation(messages: list[Message], rules: UserRules | None) -> Simulation:
    row = InputRow(line=0, id="r", messages=messages, extra={})
    return Simulation(new_dialogue(row), rules, "Ask.")


# --- similarity ----------------------------------------------------------------------------


def test_words_ignore_case_punctuation_and_order() -> None:
    assert words("What is a Hash-Table?") == words("table hash A is what")
    assert words("  ...  ") == frozenset()


def test_similarity_is_the_jaccard_index_of_the_token_sets() -> None:
    assert similarity("a b c d", "a b c d") == 1.0
    assert similarity("a b", "c d") == 0.0
    assert similarity("a b c", "b c d") == 2 / 4
    assert similarity("", "  ") == 1.0  # nothing is like nothing
    assert similarity("a", "") == 0.0


def test_a_message_exactly_at_max_similar_is_asked_again_and_just_below_is_kept() -> None:
    rules = UserRules(turns=5, max_similar=0.9)
    earlier = ["w0 w1 w2 w3 w4 w5 w6 w7 w8"]
    at = "w0 w1 w2 w3 w4 w5 w6 w7 w8 extra"  # 9 shared of 10: 0.9
    below = "w0 w1 w2 w3 w4 w5 w6 w7 new1 new2"  # 8 of 11
    assert similarity(at, earlier[0]) == 0.9
    assert judge(at, earlier, rules) is Verdict.AGAIN
    assert similarity(below, earlier[0]) < 0.9
    assert judge(below, earlier, rules) is Verdict.KEEP


def test_max_similar_one_asks_again_only_for_the_same_words() -> None:
    rules = UserRules(turns=5, max_similar=1.0)
    assert judge("Is it fast?", ["is IT fast"], rules) is Verdict.AGAIN
    assert judge("Is it fast now?", ["is it fast"], rules) is Verdict.KEEP


def test_every_earlier_user_message_counts_and_an_empty_one_is_asked_again() -> None:
    rules = UserRules(turns=5)
    assert judge("first question here", ["other", "First question here!"], rules) is Verdict.AGAIN
    assert judge("  ", ["anything"], rules) is Verdict.AGAIN
    assert judge("  ", ["anything"], UserRules(turns=5, max_similar=None)) is Verdict.AGAIN
    same = UserRules(turns=5, max_similar=None)
    assert judge("repeat", ["repeat"], same) is Verdict.KEEP


def test_the_end_marker_ends_whatever_else_the_message_says() -> None:
    rules = UserRules(turns=5, end_marker="[END]")
    assert judge("Thanks, that is all. [END]", [], rules) is Verdict.END
    assert judge("[END]", ["[END]"], rules) is Verdict.END
    assert judge("Thanks [END]", [], UserRules(turns=5, end_marker=None)) is Verdict.KEEP


# --- role swap -----------------------------------------------------------------------------


def test_the_simulator_sees_the_dialogue_with_roles_swapped_and_no_system_message() -> None:
    conversation: list[Message] = [
        {"role": "system", "content": "the teacher's system prompt"},
        user("q1"),
        {"role": "assistant", "content": "a1", "reasoning_content": "a trace"},
    ]
    assert swapped("Be a student.", conversation) == [
        {"role": "system", "content": "Be a student."},
        {"role": "assistant", "content": "q1"},
        {"role": "user", "content": "a1"},
    ]
    retry = swapped("Be a student.", conversation, attempt=1)
    assert retry[0] == {"role": "system", "content": f"Be a student.\n\n{again(1)}"}
    assert retry[1:] == swapped("Be a student.", conversation)[1:]
    assert swapped("Be a student.", conversation, attempt=2) != retry  # never the same twice


# --- the turn order ------------------------------------------------------------------------


def reply(text: str) -> Answer:
    return Answer(text, 1, 1, "stop")


def test_teacher_then_user_then_teacher_until_turns() -> None:
    sim = simulation([user("q0")], UserRules(turns=3))
    assert sim.next_step() is Step.TEACHER and sim.turn == 0
    assert not sim.is_last()  # a simulated turn may follow
    sim.dialogue.apply(reply("a0"))
    assert sim.next_step() is Step.USER and sim.user_key == "user:1:0"
    assert sim.user_request() == [
        {"role": "system", "content": "Ask."},
        {"role": "assistant", "content": "q0"},
        {"role": "user", "content": "a0"},
    ]
    assert sim.apply_user("  q1 about a0 ") is Verdict.KEEP
    assert sim.next_step() is Step.TEACHER and sim.turn == 1
    assert sim.dialogue.history()[-1] == user("q1 about a0")
    sim.dialogue.apply(reply("a1"))
    assert sim.apply_user("q2 something else") is Verdict.KEEP
    assert sim.end_reason == TURNS
    assert sim.is_last()  # the third user message is the last: its reply ends the row
    sim.dialogue.apply(reply("a2"))
    assert sim.next_step() is Step.DONE
    assert sim.simulated == [1, 2]
    assert [m["role"] for m in sim.dialogue.messages()] == ["user", "assistant"] * 3


def test_a_row_with_turns_user_messages_already_gets_no_simulated_turn() -> None:
    sim = simulation([user("a"), bot("x"), user("b"), user("c")], UserRules(turns=2))
    assert sim.end_reason == TURNS
    for turn in range(3):
        assert sim.next_step() is Step.TEACHER
        assert sim.is_last() == (turn == 2)
        sim.dialogue.apply(reply(f"a{turn}"))
    assert sim.next_step() is Step.DONE
    assert sim.simulated == []


def test_the_end_marker_ends_the_conversation_and_its_message_is_not_kept() -> None:
    sim = simulation([user("q0")], UserRules(turns=4))
    sim.dialogue.apply(reply("a0"))
    assert sim.apply_user("bye [END]") is Verdict.END
    assert sim.next_step() is Step.DONE and sim.end_reason == END_MARKER
    assert sim.dialogue.messages() == [user("q0"), bot("a0")]


def test_a_repeat_is_asked_again_twice_then_ends_the_conversation() -> None:
    sim = simulation([user("what is a heap")], UserRules(turns=4))
    sim.dialogue.apply(reply("a0"))
    keys = []
    for _ in range(RETRIES + 1):
        assert sim.next_step() is Step.USER
        keys.append(sim.user_key)
        assert sim.apply_user("What is a heap?") is Verdict.AGAIN
    assert keys == ["user:1:0", "user:1:1", "user:1:2"]
    assert sim.next_step() is Step.DONE and sim.end_reason == REPETITION
    assert sim.simulated == []


def test_a_retry_that_is_new_is_kept_and_the_next_turn_starts_at_attempt_zero() -> None:
    sim = simulation([user("what is a heap")], UserRules(turns=4))
    sim.dialogue.apply(reply("a0"))
    sim.apply_user("what is a heap")
    assert again(1) in sim.user_request()[0]["content"]
    assert sim.apply_user("how fast is insertion") is Verdict.KEEP
    sim.dialogue.apply(reply("a1"))
    assert sim.user_key == "user:2:0"
    assert sim.user_request()[0]["content"] == "Ask."


def test_without_rules_it_is_plain_distillation() -> None:
    sim = simulation([user("a"), user("b")], None)
    sim.dialogue.apply(reply("x"))
    assert sim.is_last()
    sim.dialogue.apply(reply("y"))
    assert sim.next_step() is Step.DONE and sim.end_reason is None


# --- the mock's simulated user -------------------------------------------------------------


def test_the_mock_user_asks_about_the_last_teacher_message_deterministically() -> None:
    request = swapped("Ask.", [user("what is a heap"), bot("a heap is a tree")])
    text = reply_for("user-asker", request)
    assert text == user_reply("user-asker", request)
    assert text.startswith("[user-asker] question 2: ") and "a heap is a tree" in text
    assert MOCK_END not in text
    assert reply_for("user-asker", swapped("Ask again.", request[1:])) != text


@pytest.mark.parametrize("seed", range(3))
def test_the_mock_user_ends_or_repeats_at_its_rates(seed: int) -> None:
    ends = repeats = 0
    for i in range(2000):
        request = swapped(f"Ask {seed}.", [user(f"question {i}"), bot(f"answer {i}")])
        text = user_reply("user-x", request, end_rate=0.1, repeat_rate=0.05)
        ends += MOCK_END in text
        repeats += text == f"question {i}"
    assert 150 <= ends <= 250 and 60 <= repeats <= 140
