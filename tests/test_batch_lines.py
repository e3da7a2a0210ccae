"""``engine.batch.lines``: custom ids, input lines and result lines, as values."""

from __future__ import annotations

import orjson

from engine.batch.lines import (
    CHAT,
    Result,
    custom_id,
    input_line,
    left_over,
    read_result,
    request_base,
    split_id,
)


class _Turn:
    __slots__ = ("index", "where")

    def __init__(self, index: int) -> None:
        self.index = index
        self.where = "ignored"


def test_a_custom_id_names_the_line_the_reply_and_the_attempt() -> None:
    assert request_base(7, "gen-a") == "7.a:gen-a"
    base = request_base(12, _Turn(3))
    assert base == "12._turn3"  # slots but "where": the same in every process
    assert custom_id(base, 0) == "12._turn3.0"
    assert split_id(custom_id(base, 4)) == (base, 4)
    assert split_id("7.a:gen.with.dots.2") == ("7.a:gen.with.dots", 2)


def test_an_input_line_is_one_post_to_chat_completions() -> None:
    raw = input_line("3.a:x.0", {"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1
    assert orjson.loads(raw) == {
        "custom_id": "3.a:x.0",
        "method": "POST",
        "url": CHAT,
        "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    }


def _line(**fields: object) -> bytes:
    return orjson.dumps({"id": "batch_req_1", "custom_id": "1.a:x.0", **fields})


def test_an_answered_line_carries_its_completion() -> None:
    body = {"object": "chat.completion", "choices": []}
    got = read_result(_line(response={"status_code": 200, "body": body}, error=None))
    assert got == Result("1.a:x.0", orjson.dumps(body))


def test_a_5xx_line_is_retried_and_a_4xx_line_is_permanent() -> None:
    err = {"error": {"message": "busy"}}
    five = read_result(_line(response={"status_code": 500, "body": err}, error=None))
    assert five is not None and five.body is None
    assert five.retryable and five.charged and five.error == "HTTP 500: busy"
    four = read_result(_line(response={"status_code": 400, "body": {}}, error=None))
    assert four is not None and not four.retryable and four.error == "HTTP 400: HTTP 400"


def test_an_expired_line_is_asked_again_uncharged() -> None:
    got = read_result(_line(response=None, error={"code": "batch_expired", "message": "late"}))
    assert got == Result("1.a:x.0", None, "batch_expired: late", retryable=True, charged=False)
    other = read_result(_line(response=None, error={"code": "server_error", "message": "x"}))
    assert other is not None and other.charged


def test_torn_and_foreign_lines_are_not_results() -> None:
    assert read_result(b'{"custom_id": "1.a:x.0", "resp') is None
    assert read_result(b"[1, 2]") is None
    assert read_result(b'{"id": "no custom id"}') is None
    odd = read_result(_line())
    assert odd is not None and odd.body is None and odd.retryable


def test_a_line_its_batch_ended_without_is_uncharged() -> None:
    got = left_over("2.a:x.1", "batch-9", "cancelled")
    assert got.body is None and got.retryable and not got.charged
    assert "batch-9 cancelled" in got.error
