"""engine.tasks.requests.lines: batch lines parsed, output and error lines shaped, and
duplicate custom_ids found with both lines. Pure, but for one small file read."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.errors import InputError, ModelError
from engine.tasks.asking import RAW, RawAnswer, index, raw_answer_of, raw_record, raw_slot
from engine.tasks.requests.lines import (
    BatchLine,
    custom_ids,
    duplicate_ids,
    error_code,
    error_line,
    first_duplicate,
    output_line,
    parse_line,
)

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_a_line_becomes_a_request_to_its_path_under_the_base_url() -> None:
    for url, path in [
        ("/v1/chat/completions", "/chat/completions"),
        ("/v1/completions", "/completions"),
        ("/v1/embeddings", "/embeddings"),
    ]:
        line = {"custom_id": "a", "method": "POST", "url": url, "body": BODY}
        assert parse_line(line) == BatchLine("a", url, path, BODY)


@pytest.mark.parametrize(
    ("line", "names"),
    [
        ({"method": "POST", "url": "/v1/completions", "body": {}}, "'custom_id'"),
        ({"custom_id": "a", "method": "GET", "url": "/v1/completions", "body": {}}, "'method'"),
        ({"custom_id": "a", "url": "/v1/responses", "body": {}}, "'url' must be one of"),
        ({"custom_id": "a", "url": "/v1/completions", "body": [1]}, "'body'"),
    ],
)
def test_an_unusable_line_says_which_field_is_wrong(line: dict[str, object], names: str) -> None:
    problem = parse_line(line)
    assert isinstance(problem, str) and names in problem


def test_output_and_error_lines_have_openais_shapes_and_stable_ids() -> None:
    answer = RawAnswer(200, {"object": "list"}, 3, 0)
    out = output_line(4, "x", answer)
    assert list(out) == ["id", "custom_id", "response", "error"]
    assert list(out["response"]) == ["status_code", "request_id", "body"]
    assert out["response"]["status_code"] == 200 and out["response"]["body"] == {"object": "list"}
    assert out["error"] is None and out["id"].startswith("batch_req_")
    assert output_line(4, "x", answer) == out  # a resumed run writes the same ids
    assert output_line(5, "x", answer)["id"] != out["id"]
    err = error_line(7, "y", "http_400", "HTTP 400: bad")
    assert err["response"] is None and err["error"] == {
        "code": "http_400",
        "message": "HTTP 400: bad",
    }
    assert err["line"] == 7 and err["custom_id"] == "y"
    assert error_line(7, 12, "invalid_request", "m")["custom_id"] is None


def test_error_codes_name_the_status_or_say_the_request_failed() -> None:
    assert error_code(ModelError("HTTP 400: x", retryable=False, status=400)) == "http_400"
    assert error_code(ModelError("timed out", retryable=False)) == "request_failed"


def test_the_first_duplicate_custom_id_comes_with_both_lines() -> None:
    assert first_duplicate([(0, "a"), (1, "b"), (2, None), (3, "c")]) is None
    assert first_duplicate([(0, "a"), (1, "b"), (4, "b"), (5, "a")]) == ("b", 1, 4)


def test_custom_ids_are_numbered_as_the_input_numbers_rows(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"custom_id": "a"}\r\n\n{not json\n[1]\n{"custom_id": "b"}')
    assert [(n, c) for n, c in custom_ids(path) if c is not None] == [(0, "a"), (4, "b")]


def test_a_duplicate_custom_id_is_an_input_error_naming_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"custom_id": "a"}\n{"custom_id": "b"}\n\n{"custom_id": "a"}\n')
    with pytest.raises(InputError, match=r"lines 0 and 3 .*custom_id 'a'"):
        duplicate_ids(path)
    duplicate_ids(tmp_path / "missing.jsonl")  # the run reports a missing input itself


def test_a_raw_reply_is_journaled_and_replayed_whole() -> None:
    answer = RawAnswer(200, {"data": [{"embedding": [0.5, -1.0]}]}, 4, 0, replica=1)
    record = raw_record(3, "request", answer)
    assert record["k"] == RAW and record["l"] == 3 and record["key"] == "request"
    found = index([record, {"k": RAW, "l": 3, "key": "broken"}])
    assert list(found) == [raw_slot("request")]
    assert raw_answer_of(found[raw_slot("request")]) == RawAnswer(200, answer.body, 4, 0)


def test_every_reply_kind_differs_from_the_journals_emit_kinds() -> None:
    # A reply record of an emit's kind would be replayed as an emit (and never as a reply).
    from engine.checkpoint.journal import EMIT_FAILED, EMIT_FILTERED, EMIT_OUTPUT
    from engine.tasks import asking

    replies = {asking.TURN, asking.TRY, asking.SAMPLE, asking.SAMPLE_FAILED, asking.RATING}
    replies |= {asking.OWN, asking.RAW}
    assert len(replies) == 7
    assert not replies & {EMIT_OUTPUT, EMIT_FAILED, EMIT_FILTERED}
