"""Retry decisions: which failures are worth another try, and how long to wait.

Pure functions; the caller supplies the random draw and the clock.
"""

from __future__ import annotations

from datetime import UTC
from email.utils import parsedate_to_datetime

# Statuses that say "not now" rather than "never": rate limits, overload, timeouts.
RETRYABLE_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})

BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 60.0
RETRY_AFTER_CAP_S = 600.0


def is_retryable_status(status: int) -> bool:
    """429 and 5xx (and a few transient 4xx) are retried; every other 4xx is permanent."""
    return status in RETRYABLE_STATUSES or 500 <= status < 600


def backoff_s(
    attempt: int, draw: float, base: float = BACKOFF_BASE_S, cap: float = BACKOFF_CAP_S
) -> float:
    """Exponential backoff with "equal jitter": half fixed, half random.

    ``attempt`` counts from 0 for the first retry; ``draw`` is uniform in [0, 1).
    The fixed half keeps a 429 storm from hammering the server; the random half
    spreads the retries of many conversations apart.
    """
    ceiling = min(cap, base * 2.0**attempt)
    return ceiling / 2 + draw * ceiling / 2


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date), or None."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)  # "-0000": UTC, not local time
        seconds = when.timestamp() - now
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), RETRY_AFTER_CAP_S)


def retry_delay_s(attempt: int, draw: float, retry_after: float | None) -> float:
    """The wait before the next try: the server's Retry-After when it gave one, else backoff."""
    if retry_after is not None:
        # A little jitter on top so a burst of 429s with the same hint does not return as a burst.
        return retry_after + draw * min(1.0, retry_after * 0.1 + 0.05)
    return backoff_s(attempt, draw)
