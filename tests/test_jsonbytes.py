"""JSON that is held (request bodies in flight, replies queued for the store, a batch's
results) takes the memory of its own size, not orjson's working buffer (engine.jsonbytes)."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable

import orjson
import pytest

from engine import jsonbytes
from engine.batch.lines import read_result
from engine.cache.keys import stored_reply
from engine.http.client import HttpEndpoint
from engine.http.settings import HttpSettings
from engine.stats import ModelStats

HELD = 200  # values held at once, as a queue holds them


def held_per_value(make: Callable[[int], bytes]) -> tuple[float, int]:
    """Traced bytes per value while ``HELD`` of them are held, and one value's length."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        values = [make(i) for i in range(HELD)]
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return (after - before) / HELD, len(values[0])


def close_to_its_size(per_value: float, size: int) -> bool:
    # The bytes object's header and the list's slot come on top of the value itself.
    return per_value <= size + 128


@pytest.mark.parametrize("chars", [100, 16_384])
def test_orjson_alone_holds_a_bigger_buffer_which_dumps_does_not(chars: int) -> None:
    value = {"c": "x" * chars, "f": "stop"}
    per_value, size = held_per_value(lambda _: orjson.dumps(value))
    assert not close_to_its_size(per_value, size)  # why jsonbytes exists
    per_value, size = held_per_value(lambda _: jsonbytes.dumps(value))
    assert close_to_its_size(per_value, size)
    assert jsonbytes.dumps(value) == orjson.dumps(value)
    sorted_ = jsonbytes.dumps({"b": 1, "a": 2}, option=orjson.OPT_SORT_KEYS)
    assert sorted_ == b'{"a":2,"b":1}'


def test_a_reply_queued_for_the_store_holds_its_own_size() -> None:
    trace = "t" * 16_384
    per_value, size = held_per_value(lambda i: stored_reply(f"answer {i}", "stop", 5, 9, 0, trace))
    assert close_to_its_size(per_value, size)


def test_a_request_body_in_flight_holds_its_own_size() -> None:
    settings = HttpSettings(name="teacher", base_urls=("http://a/v1",), model="m")
    endpoint = HttpEndpoint(settings, ModelStats(name="teacher", cap=8))  # never entered
    history = [{"role": "user", "content": "q" * 20_000}]
    per_value, size = held_per_value(lambda _: endpoint.request_body(history, None))
    assert close_to_its_size(per_value, size)
    assert orjson.loads(endpoint.request_body(history, None))["messages"] == history


def test_a_batch_result_waiting_for_its_row_holds_its_own_size() -> None:
    body = {"choices": [{"message": {"role": "assistant", "content": "a" * 8_000}}]}
    line = orjson.dumps({"custom_id": "3.turn0.0", "response": {"status_code": 200, "body": body}})

    def make(_: int) -> bytes:
        result = read_result(line)
        assert result is not None and result.body is not None
        return result.body

    per_value, size = held_per_value(make)
    assert close_to_its_size(per_value, size)
