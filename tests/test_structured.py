"""Structured replies: a schema's references are resolved inside it, never fetched."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from engine.tasks.structured import ReplyChecker, reference_problem


class _Schemas(BaseHTTPRequestHandler):
    """Serves a schema to whoever asks, and counts who did."""

    asked: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        type(self).asked.append(self.path)
        body = b'{"type": "string"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def schema_server() -> Iterator[str]:
    """A real HTTP server on loopback holding a schema; yields its URL."""
    _Schemas.asked = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Schemas)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/schema.json"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_reply_check_never_fetches_a_remote_ref(schema_server: str) -> None:
    schema = {"type": "object", "properties": {"a": {"$ref": schema_server}}}
    checker = ReplyChecker(schema, "generate.json_schema")

    for _ in range(3):
        value, error = checker.check('{"a": "text"}')
        assert value is None and error is not None
        assert "refers outside itself" in error

    assert _Schemas.asked == []
    assert reference_problem(schema) is not None  # and a config naming it is refused
    assert _Schemas.asked == []


def test_refs_inside_the_schema_still_validate() -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/n"}},
        "$defs": {"n": {"type": "integer"}},
    }
    checker = ReplyChecker(schema, "generate.json_schema")

    assert checker.check('{"a": 3}') == ({"a": 3}, None)
    value, error = checker.check('{"a": "x"}')
    assert value is None and error is not None and "'x' is not of type 'integer'" in error
