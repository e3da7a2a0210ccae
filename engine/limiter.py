"""Per-model concurrency: a hard cap, and an adaptive limit under it.

The limit starts at the model's ``max_concurrency`` and never exceeds it. A
burst of 429s halves it once (only a 429 from a request sent under the current
limit counts, so one burst shrinks it one time); every ``limit`` successes in a
row grow it by one, back up to the cap.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

from engine.stats import ModelStats


class Limiter:
    """A FIFO semaphore whose size adapts to rate limiting, up to a fixed cap."""

    def __init__(self, cap: int, stats: ModelStats) -> None:
        if cap <= 0:
            raise ValueError("cap must be positive")
        self.cap = cap
        self.limit = cap
        self.in_flight = 0
        self.epoch = 0  # bumped on each change of limit
        self._streak = 0
        self._waiters: deque[anyio.Event] = deque()
        self._stats = stats
        stats.limit = cap

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[int]:
        """Hold one slot for the body; yields the epoch the request was sent under."""
        if self.in_flight < self.limit and not self._waiters:
            self._take()
        else:
            event = anyio.Event()
            self._waiters.append(event)
            try:
                await event.wait()  # _wake() takes the slot on our behalf before setting
            except BaseException:
                if event in self._waiters:
                    self._waiters.remove(event)
                else:
                    self._release()  # handed a slot we will not use: pass it on
                raise
        try:
            yield self.epoch
        finally:
            self._release()

    def _take(self) -> None:
        self.in_flight += 1
        self._stats.in_flight = self.in_flight

    def _release(self) -> None:
        self.in_flight -= 1
        self._stats.in_flight = self.in_flight
        self._wake()

    def _wake(self) -> None:
        # Slots are handed over, not raced for: a newcomer can never slip in
        # between a waiter being woken and it running.
        while self.in_flight < self.limit and self._waiters:
            self._take()
            self._waiters.popleft().set()

    def rate_limited(self, epoch: int) -> None:
        """A 429 arrived for a request sent under ``epoch``: shrink once per burst."""
        self._streak = 0
        if epoch != self.epoch or self.limit == 1:
            return
        self.limit = max(1, self.limit // 2)
        self.epoch += 1
        self._stats.limit = self.limit

    def succeeded(self) -> None:
        """A request succeeded: after a full window of successes, grow by one."""
        if self.limit >= self.cap:
            return
        self._streak += 1
        if self._streak >= self.limit:
            self._streak = 0
            self.limit += 1
            self.epoch += 1
            self._stats.limit = self.limit
            self._wake()
