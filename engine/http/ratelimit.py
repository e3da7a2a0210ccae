"""Request and token rate limits per model: token buckets that wait, never poll.

A caller reserves what it needs and is told how long to wait; the balance may go
negative, which queues later callers behind it in arrival order. Pure: the clock
is passed in.
"""

from __future__ import annotations


class TokenBucket:
    """``rate`` units per second, bursts of up to ``burst`` units."""

    __slots__ = ("_level", "_stamp", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate = rate
        self.burst = burst
        self._level = burst
        self._stamp = now

    def _refill(self, now: float) -> None:
        if now > self._stamp:
            self._level = min(self.burst, self._level + (now - self._stamp) * self.rate)
            self._stamp = now

    def reserve(self, amount: float, now: float) -> float:
        """Take ``amount`` now; return the seconds to wait before using it (0 if none)."""
        self._refill(now)
        self._level -= amount
        return 0.0 if self._level >= 0 else -self._level / self.rate

    def adjust(self, amount: float, now: float) -> None:
        """Correct an earlier reservation by ``amount`` (positive takes more, negative refunds)."""
        self._refill(now)
        self._level = min(self.burst, self._level - amount)


def per_minute(limit: float, now: float) -> TokenBucket:
    """A bucket for a per-minute limit, allowing a burst of one second's worth (at least 1)."""
    rate = limit / 60.0
    return TokenBucket(rate, max(1.0, rate), now)


def estimate_tokens(body_bytes: int, max_tokens: object) -> int:
    """A request's token cost before it is sent: ~4 bytes a token in, plus its max_tokens out."""
    out = max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else 256
    return body_bytes // 4 + out
