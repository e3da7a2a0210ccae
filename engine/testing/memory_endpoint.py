"""An in-memory model endpoint: answers from a Python callable, no server, no socket.

For unit tests of tasks and of anything else that talks to a ``ModelEndpoint``
(``engine.http.endpoint``): it keeps the same counters as the HTTP endpoint and
honours its share (``set_share``), so a test sees what a task sent, in what order,
and what the run would count. End-to-end tests use the real mock server
(``engine.testing.mock_server``) instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Self

import anyio
import anyio.lowlevel

from engine.errors import ModelError
from engine.http.endpoint import Completion, EndpointStatistics, Messages
from engine.stats import ModelStats, Outage, ReplicaStats

# (messages, extra) -> the answer's text, or a whole Completion; raise ModelError to fail.
Answer = Callable[[Messages, Mapping[str, Any] | None], str | Completion]


class MemoryEndpoint:
    """A ``ModelEndpoint`` with one replica, answering each request with ``answer``.

    A text answer counts one prompt token per message and one completion token per
    word; return a ``Completion`` to say otherwise (or to give traces). ``answer``
    may be replaced between requests. ``sent`` keeps a copy of the messages of
    every request that took a slot (``extras`` their extra parameters).
    ``reachable`` False makes ``probe`` report it and take it out.
    """

    def __init__(
        self,
        answer: Answer,
        *,
        name: str = "m",
        cap: int = 16,
        reachable: bool = True,
        stats: ModelStats | None = None,
    ) -> None:
        self.answer = answer
        self.name = name
        self.reachable = reachable
        self.sent: list[Messages] = []
        self.extras: list[Mapping[str, Any] | None] = []
        self.stats = stats if stats is not None else ModelStats(name=name, cap=cap)
        self._replica = ReplicaStats(url=f"memory://{name}", cap=cap, limit=cap)
        self.stats.cap = self.stats.limit = cap
        self.stats.replicas = [self._replica]
        self._cap = cap
        self._down = False
        self._room: anyio.Event | None = None  # set when a slot frees or the share grows

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    async def complete(
        self,
        messages: Messages,
        extra: Mapping[str, Any] | None = None,
        *,
        prefer: int | None = None,
    ) -> Completion:
        """``answer``'s reply, once a slot under the share is free."""
        if self._down:
            raise self._down_error()
        while self._replica.in_flight >= self._cap:
            self._room = self._room or anyio.Event()
            await self._room.wait()
        self._take(1)
        self.sent.append([dict(m) for m in messages])
        self.extras.append(extra)
        stats = self.stats
        stats.requests += 1
        self._replica.requests += 1
        try:
            await anyio.lowlevel.checkpoint()  # a request is a chance for others to run
            try:
                reply = self.answer(messages, extra)
            except ModelError:
                stats.failures += 1
                self._replica.failed += 1
                raise
        finally:
            self._take(-1)
        completion = (
            reply
            if isinstance(reply, Completion)
            else Completion([reply], ["stop"], len(messages), len(reply.split()), 0.0)
        )
        stats.ok += 1
        self._replica.ok += 1
        stats.prompt_tokens += completion.prompt_tokens
        stats.completion_tokens += completion.completion_tokens
        stats.reasoning_tokens += completion.reasoning_tokens
        stats.latency.add(completion.latency_s)
        return completion

    async def probe(self) -> list[str]:
        if self.reachable:
            return []
        if self._replica.live:
            self._replica.live = False
            self.stats.outages.append(Outage(replica=0, url=self._replica.url, started=0.0))
        return [f"models.{self.name}: cannot reach {self._replica.url}"]

    def statistics(self) -> EndpointStatistics:
        return EndpointStatistics.of(self.stats, live=int(self._replica.live), down=self._down)

    def set_share(self, cap: int | None) -> None:
        self._cap = cap or 0
        limit = None if cap is None else cap
        self.stats.cap = self._replica.cap = self._cap
        self.stats.limit = self._replica.limit = limit
        self._wake()

    def down_from_start(self) -> None:
        if not self._replica.live:
            self._down = True

    def _take(self, n: int) -> None:
        self._replica.in_flight += n
        self.stats.in_flight += n
        if n < 0:
            self._wake()

    def _wake(self) -> None:
        room, self._room = self._room, None
        if room is not None:
            room.set()

    def _down_error(self) -> ModelError:
        return ModelError(
            f"models.{self.name} unreachable since the run started",
            retryable=False,
            model_down=True,
        )
