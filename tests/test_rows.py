"""Input rows: format detection, carried fields, and the error for every bad shape."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from engine.errors import InputError
from engine.input.reader import decode_line, raw_id
from engine.input.rows import InputRow, parse_row

# --- the three formats ------------------------------------------------------------------


def test_openai_messages() -> None:
    row = parse_row(
        {
            "id": "c1",
            "messages": [
                {"role": "system", "content": "Be kind."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Bye"},
            ],
        },
        line=3,
    )
    assert row == InputRow(
        line=3,
        id="c1",
        messages=[
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye"},
        ],
        extra={},
    )


def test_openai_developer_role_becomes_system_and_tool_is_kept() -> None:
    row = parse_row(
        {
            "messages": [
                {"role": "developer", "content": "Rules."},
                {"role": "user", "content": "Q"},
                {"role": "tool", "content": "42", "tool_call_id": "t1"},
            ]
        },
        line=0,
    )
    assert row.messages == [
        {"role": "system", "content": "Rules."},
        {"role": "user", "content": "Q"},
        {"role": "tool", "content": "42"},  # only role and content are kept
    ]


def test_sharegpt_conversations_map_speakers_to_roles() -> None:
    row = parse_row(
        {
            "conversations": [
                {"from": "system", "value": "S"},
                {"from": "human", "value": "H1"},
                {"from": "gpt", "value": "G1"},
                {"from": "human", "value": "H2"},
            ]
        },
        line=1,
    )
    assert row.messages == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "H1"},
        {"role": "assistant", "content": "G1"},
        {"role": "user", "content": "H2"},
    ]


@pytest.mark.parametrize(
    ("speaker", "role"),
    [("user", "user"), ("assistant", "assistant"), ("chatgpt", "assistant"), ("bard", "assistant")],
)
def test_sharegpt_speaker_aliases(speaker: str, role: str) -> None:
    row = parse_row({"conversations": [{"from": speaker, "value": "x"}]}, line=0)
    assert row.messages == [{"role": role, "content": "x"}]


def test_plain_prompt_is_one_user_turn() -> None:
    row = parse_row({"prompt": "Tell me a joke."}, line=9)
    assert row.messages == [{"role": "user", "content": "Tell me a joke."}]
    assert row.id == 9


def test_messages_win_over_other_format_keys_and_none_are_carried() -> None:
    row = parse_row(
        {
            "prompt": "ignored",
            "conversations": [{"from": "human", "value": "ignored"}],
            "messages": [{"role": "user", "content": "used"}],
        },
        line=0,
    )
    assert row.messages == [{"role": "user", "content": "used"}]
    assert row.extra == {}


# --- id and extra fields ---------------------------------------------------------------


def test_extra_fields_are_carried_in_order_without_id_or_format_keys() -> None:
    row = parse_row(
        {
            "topic": "cooking",
            "id": 17,
            "messages": [{"role": "user", "content": "Hi"}],
            "meta": {"source": "x", "tags": [1, 2]},
            "score": None,
        },
        line=4,
    )
    assert row.id == 17
    assert row.extra == {"topic": "cooking", "meta": {"source": "x", "tags": [1, 2]}, "score": None}
    assert list(row.extra) == ["topic", "meta", "score"]


@pytest.mark.parametrize("line", [0, 1, 12345678])
def test_id_defaults_to_the_line_number(line: int) -> None:
    assert parse_row({"prompt": "p"}, line=line).id == line


# --- bad shapes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "fragment"),
    [
        ([{"role": "user", "content": "x"}], "must be a JSON object, got list"),
        ("hello", "must be a JSON object, got str"),
        (None, "must be a JSON object, got NoneType"),
        ({"id": 1, "text": "x"}, "no 'messages', 'conversations' or 'prompt' key"),
        ({"messages": []}, "'messages' must be a non-empty list of {role, content}"),
        ({"messages": "hi"}, "'messages' must be a non-empty list"),
        ({"messages": ["hi"]}, "'messages[0]' must be an object {role, content}"),
        ({"messages": [{"content": "x"}]}, "'messages[0].role' is None"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "'messages[0].role' is 'bot'"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "user"}]},
            "'messages[1].content' must be a string, got NoneType",
        ),
        (
            {"messages": [{"role": "user", "content": 5}]},
            "'messages[0].content' must be a string, got int",
        ),
        ({"conversations": []}, "'conversations' must be a non-empty list of {from, value}"),
        ({"conversations": {"from": "human"}}, "'conversations' must be a non-empty list"),
        ({"conversations": [7]}, "'conversations[0]' must be an object {from, value}"),
        (
            {"conversations": [{"from": "robot", "value": "x"}]},
            "'conversations[0].from' is 'robot'; use one of system, human, gpt",
        ),
        ({"conversations": [{"from": 1, "value": "x"}]}, "'conversations[0].from' is 1"),
        (
            {"conversations": [{"from": "human", "value": ["x"]}]},
            "'conversations[0].value' must be a string, got list",
        ),
        ({"prompt": 3}, "'prompt' must be a string, got int"),
        ({"prompt": ""}, "'prompt' is empty"),
        ({"prompt": " \n\t"}, "'prompt' is empty"),
    ],
)
def test_bad_shapes_name_the_field(obj: Any, fragment: str) -> None:
    with pytest.raises(InputError) as info:
        parse_row(obj, line=0)
    assert fragment in str(info.value)


def test_assistant_tool_call_with_null_content_is_accepted() -> None:
    row = parse_row(
        {
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "t1"}]},
                {"role": "tool", "content": "18C", "tool_call_id": "t1"},
                {"role": "user", "content": "And tomorrow?"},
            ]
        },
        line=0,
    )
    assert [m for m in row.messages if m["role"] == "user"] == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "user", "content": "And tomorrow?"},
    ]


# --- decode_line and raw_id -------------------------------------------------------------


def decode_row(line: int, raw: bytes) -> InputRow:
    return parse_row(decode_line(raw), line)


def test_decode_row_parses_one_line() -> None:
    raw = orjson.dumps({"id": "a", "prompt": "héllo", "lang": "fr"})
    row = decode_row(5, raw)
    assert row == InputRow(
        line=5, id="a", messages=[{"role": "user", "content": "héllo"}], extra={"lang": "fr"}
    )


def test_decode_row_accepts_crlf_leftovers() -> None:
    row = decode_row(0, b'{"prompt": "p"}\r')
    assert row.messages == [{"role": "user", "content": "p"}]


@pytest.mark.parametrize("raw", [b'{"prompt": "p"', b"not json", b'{"prompt": "p"} {}'])
def test_decode_row_invalid_json(raw: bytes) -> None:
    with pytest.raises(InputError) as info:
        decode_row(0, raw)
    message = str(info.value)
    assert message.startswith("is not valid JSON (")
    assert "each line must be one JSON object" in message


def test_decode_row_invalid_utf8_says_so() -> None:
    with pytest.raises(InputError) as info:
        decode_row(0, b'{"prompt": "caf\xe9"}')
    assert str(info.value) == "is not valid UTF-8; re-encode the file as UTF-8"


def test_decode_row_reports_the_shape_problem() -> None:
    with pytest.raises(InputError, match=r"'messages\[0\]\.role' is 'bot'"):
        decode_row(0, b'{"messages": [{"role": "bot", "content": "x"}]}')


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"id": "conv-1", "messages": 5}', "conv-1"),
        (b'{"id": 42}', 42),
        (b'{"id": 1.5}', 1.5),
        (b'{"id": null, "prompt": "p"}', 7),
        (b'{"id": {"nested": 1}}', 7),
        (b'{"prompt": "p"}', 7),
        (b"[1, 2]", 7),
        (b"{broken", 7),
        (b'{"id": "caf\xe9"}', 7),
    ],
)
def test_raw_id_uses_the_id_when_there_is_one(raw: bytes, expected: object) -> None:
    assert raw_id(7, raw) == expected
