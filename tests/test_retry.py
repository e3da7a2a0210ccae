"""Retry decisions: which statuses are retried, backoff bounds, and Retry-After."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from engine.http.retry import (
    BACKOFF_BASE_S,
    BACKOFF_CAP_S,
    BACKPRESSURE,
    FLAKY,
    PERMANENT,
    REFUSED,
    RETRY_AFTER_CAP_S,
    UNHEALTHY,
    Ledger,
    backoff_s,
    charged_at_once,
    charges,
    classify_status,
    is_context_overflow,
    is_retryable_status,
    parse_retry_after,
    retry_delay_s,
)

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC).timestamp()


def http_date(seconds_from_now: float) -> str:
    return format_datetime(datetime.fromtimestamp(NOW + seconds_from_now, UTC), usegmt=True)


# --- classification ------------------------------------------------------------------------


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504, 599])
def test_transient_statuses_are_retried(status: int) -> None:
    assert is_retryable_status(status)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 413, 422])
def test_other_client_errors_are_permanent(status: int) -> None:
    assert not is_retryable_status(status)


# --- backoff -------------------------------------------------------------------------------


def ceiling(attempt: int) -> float:
    return min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2.0**attempt)


@pytest.mark.parametrize("attempt", range(12))
@pytest.mark.parametrize("draw", [0.0, 0.25, 0.5, 0.999999])
def test_backoff_stays_between_half_the_ceiling_and_the_ceiling(attempt: int, draw: float) -> None:
    delay = backoff_s(attempt, draw)
    assert ceiling(attempt) / 2 <= delay <= ceiling(attempt)
    assert delay <= BACKOFF_CAP_S


def test_backoff_grows_with_each_attempt_until_the_cap() -> None:
    lows = [backoff_s(attempt, 0.0) for attempt in range(12)]
    highs = [backoff_s(attempt, 0.999999) for attempt in range(12)]
    assert lows[0] == BACKOFF_BASE_S / 2
    assert all(b >= a for a, b in itertools.pairwise(lows))
    assert lows[1] == 2 * lows[0] and lows[4] == 16 * lows[0]
    # Past the cap the schedule is flat at [cap/2, cap).
    assert lows[-1] == BACKOFF_CAP_S / 2
    assert BACKOFF_CAP_S * 0.99 < highs[-1] < BACKOFF_CAP_S


def test_backoff_draw_spreads_within_the_attempt() -> None:
    assert backoff_s(3, 0.0) < backoff_s(3, 0.5) < backoff_s(3, 0.99)


def test_backoff_respects_a_custom_base_and_cap() -> None:
    assert backoff_s(0, 0.0, base=2.0, cap=5.0) == 1.0
    assert backoff_s(10, 0.0, base=2.0, cap=5.0) == 2.5
    assert backoff_s(10, 0.999, base=2.0, cap=5.0) < 5.0


# --- Retry-After ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"), [("30", 30.0), (" 2 ", 2.0), ("0.5", 0.5), ("0", 0.0)]
)
def test_retry_after_seconds(value: str, seconds: float) -> None:
    assert parse_retry_after(value, NOW) == seconds


def test_retry_after_http_date_is_relative_to_now() -> None:
    assert parse_retry_after(http_date(45), NOW) == pytest.approx(45.0)
    assert parse_retry_after(http_date(45), NOW + 40) == pytest.approx(5.0)


def test_retry_after_http_date_in_the_past_is_zero() -> None:
    assert parse_retry_after(http_date(-120), NOW) == 0.0


@pytest.mark.parametrize("value", [None, "", "   ", "soon", "Wed, 99 Foo 2015", "nan"])
def test_retry_after_junk_is_none(value: str | None) -> None:
    assert parse_retry_after(value, NOW) is None


def test_retry_after_negative_is_zero() -> None:
    assert parse_retry_after("-5", NOW) == 0.0


@pytest.mark.parametrize("value", ["86400", "1e12", "inf"])
def test_retry_after_huge_is_capped(value: str) -> None:
    assert parse_retry_after(value, NOW) == RETRY_AFTER_CAP_S


def test_retry_after_far_future_date_is_capped() -> None:
    assert parse_retry_after(http_date(7 * 86400), NOW) == RETRY_AFTER_CAP_S


# --- retry_delay_s -------------------------------------------------------------------------


@pytest.mark.parametrize("draw", [0.0, 0.5, 0.999])
def test_retry_delay_prefers_retry_after(draw: float) -> None:
    delay = retry_delay_s(attempt=0, draw=draw, retry_after=20.0)
    # The hint, plus at most one second of jitter: never shorter than asked.
    assert 20.0 <= delay <= 21.0
    assert delay != backoff_s(0, draw)


def test_retry_delay_jitter_is_small_for_small_hints() -> None:
    assert retry_delay_s(0, 0.0, retry_after=0.0) == 0.0
    assert 0.0 < retry_delay_s(0, 0.999, retry_after=0.0) <= 0.05
    assert retry_delay_s(0, 0.999, retry_after=1.0) <= 1.0 + 0.15


@pytest.mark.parametrize("attempt", [0, 3, 9])
def test_retry_delay_without_hint_is_the_backoff(attempt: int) -> None:
    assert retry_delay_s(attempt, 0.3, retry_after=None) == backoff_s(attempt, 0.3)


# --- what a failure means ------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "message", "kind"),
    [
        (429, "slow down", BACKPRESSURE),
        (503, "loading", BACKPRESSURE),
        (500, "Context size has been exceeded.", BACKPRESSURE),
        (500, "boom", UNHEALTHY),
        (502, "bad gateway", UNHEALTHY),
        (408, "timeout", FLAKY),
        (400, "bad request", PERMANENT),
        (404, "no such model", PERMANENT),
        (401, "invalid api key", REFUSED),
        (403, "forbidden", REFUSED),
    ],
)
def test_classify_status(status: int, message: str, kind: str) -> None:
    assert classify_status(status, message) == kind


def test_a_context_overflow_is_recognised_by_llama_cpp_s_words() -> None:
    message = "request (751 tokens) exceeds the available context size (512 tokens)"
    assert is_context_overflow(400, message)
    assert is_context_overflow(400, "exceed_context_size_error")
    assert not is_context_overflow(500, message)
    assert not is_context_overflow(400, "bad request")


def test_backpressure_and_broken_answers_are_charged_at_once_server_failures_never() -> None:
    assert charged_at_once(BACKPRESSURE) and charged_at_once(FLAKY)
    assert not charged_at_once(UNHEALTHY)
    assert not charged_at_once(PERMANENT) and not charged_at_once(REFUSED)


# --- whose failure it was: settled by what the server does next ----------------------------


def test_a_server_failure_is_the_rows_when_its_server_answers_next() -> None:
    ledger = Ledger()
    verdict = ledger.hold()
    assert verdict.charged is None  # not known yet: charged to nobody
    ledger.answered()
    assert verdict.charged is True
    ledger.failed()  # settled once: what comes later changes nothing
    assert verdict.charged is True


def test_an_outage_spends_no_retry_a_failure_followed_by_another_is_the_servers() -> None:
    # A server SIGKILLed with several requests in flight: each failure settles the one
    # before it as the server's, and the last is settled when the server is taken out.
    ledger = Ledger()
    first, second, third = ledger.hold(), ledger.hold(), ledger.hold()
    assert first.charged is False and second.charged is False and third.charged is None
    ledger.failed()  # taken out
    assert third.charged is False
    ledger.answered()  # back after the restart: the outage stays the server's
    assert charges([first, second, third]) == 0


def test_charges_count_only_the_failures_settled_as_the_rows() -> None:
    server, model = Ledger(), Ledger()
    held = [server.hold(), model.hold()]
    assert charges(held) == 0
    model.answered()
    assert charges(held) == 1
    held.append(server.hold())  # fails again: the first one on it was the server's
    server.answered()
    assert charges(held) == 2
