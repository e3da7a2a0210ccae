"""Retry decisions: which failures are worth another try, whose they are, and how long to wait.

Pure functions and plain state; the caller supplies the random draw and the clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime

# Statuses that say "not now" rather than "never": rate limits, overload, timeouts.
RETRYABLE_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})

# What a failed request says, and so what to do about it:
PERMANENT = "permanent"  # a 4xx: the same request fails again; the row fails at once
REFUSED = "refused"  # 401/403: the server refuses the key, so every request of the model fails
BACKPRESSURE = "backpressure"  # 429, 503, a full KV cache: this server wants fewer requests
UNHEALTHY = "unhealthy"  # connection errors, timeouts, other 5xx: the server may be down
FLAKY = "flaky"  # it answered, but not usefully (a broken 200 body, 408/409/425): try again

# llama.cpp's server when two conversations outgrow one shared KV pool: both are
# cancelled with a 500, and both fit again at a lower concurrency.
KV_CACHE_FULL = "Context size has been exceeded"
# llama.cpp's server when one request is longer than a slot's context: permanent.
CONTEXT_OVERFLOW = ("exceed_context_size_error", "exceeds the available context size")

BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 60.0
RETRY_AFTER_CAP_S = 600.0


def is_retryable_status(status: int) -> bool:
    """429 and 5xx (and a few transient 4xx) are retried; every other 4xx is permanent."""
    return status in RETRYABLE_STATUSES or 500 <= status < 600


def classify_status(status: int, message: str) -> str:
    """What an HTTP error status (and the server's message) means for the request."""
    if status in (401, 403):
        return REFUSED
    if status in (429, 503) or (status == 500 and KV_CACHE_FULL in message):
        return BACKPRESSURE
    if status >= 500:
        return UNHEALTHY
    if is_retryable_status(status):
        return FLAKY
    return PERMANENT


def charged_at_once(kind: str) -> bool:
    """Whether a failure of ``kind`` costs the row one of its retries as soon as it happens.

    Backpressure and broken answers do (a full KV cache is handled before this).
    A server failure (``UNHEALTHY``) does not: whose it is shows only afterwards
    (a ``Verdict`` held on the server's ``Ledger``). Permanent failures are not
    retried at all.
    """
    return kind in (BACKPRESSURE, FLAKY)


@dataclass(slots=True, eq=False)
class Verdict:
    """Whether one server failure is charged to its row: ``None`` until its server shows
    whether it works (see ``Ledger``), then True (the row's) or False (the server's)."""

    charged: bool | None = None


class Ledger:
    """The failure of a server (a replica, or a whole model) whose verdict is still open.

    A connection dropped, a timeout or a 5xx says little on its own: a server
    SIGKILLed mid-generation fails every request it holds, and one that was
    answering others a moment before is no healthier for it. So the charge is
    decided lazily, by what the server does next: if it answers a request, the
    failure was the row's (``answered``); if it fails again or is taken out first,
    it was the server's (``failed``), and an outage spends no row's retries.

    Each failure settles the one before it, so at most one verdict is open.
    """

    __slots__ = ("_open",)

    def __init__(self) -> None:
        self._open: Verdict | None = None

    def hold(self) -> Verdict:
        """A new failure of this server: its verdict, open until the server's next outcome."""
        self.failed()  # the open one (if any) is followed by a failure: the server's
        self._open = verdict = Verdict()
        return verdict

    def answered(self) -> None:
        """The server answered a request: the open failure was its row's."""
        if self._open is not None:
            self._open.charged = True
            self._open = None

    def failed(self) -> None:
        """The server failed again, or was taken out: the open failure was the server's."""
        if self._open is not None:
            self._open.charged = False
            self._open = None


def charges(verdicts: list[Verdict]) -> int:
    """How many of a request's server failures have been settled as its row's."""
    return sum(1 for verdict in verdicts if verdict.charged)


def is_context_overflow(status: int, message: str) -> bool:
    return status == 400 and any(marker in message for marker in CONTEXT_OVERFLOW)


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
