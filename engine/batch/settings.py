"""The ``models.NAME.batch`` block: how a model's requests are gathered into batches."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from engine.problems import Problems

_KEYS = ("completion_window", "max_requests", "max_bytes", "max_batches", "poll_s", "flush_s")
_WINDOW = re.compile(r"[1-9][0-9]*h")
MOST_REQUESTS = 50_000  # OpenAI's limit of lines per batch file
MOST_BYTES = 200_000_000  # and of bytes


@dataclass(frozen=True, slots=True)
class BatchSettings:
    """Sizes and times of a model's batches (times in seconds, fractions allowed)."""

    completion_window: str = "24h"
    max_requests: int = MOST_REQUESTS  # lines per batch file
    max_bytes: int = MOST_BYTES  # bytes per batch file
    max_batches: int = 10  # batches running at once for the model
    poll_s: float = 30.0  # how often a running batch is polled
    flush_s: float = 60.0  # a partial batch goes once its oldest request waited this long

    def __post_init__(self) -> None:
        if self.max_requests < 1 or self.max_bytes < 1 or self.max_batches < 1:
            raise ValueError(f"batch sizes must be positive: {self!r}")
        if self.poll_s <= 0 or self.flush_s <= 0:
            raise ValueError(f"batch times must be positive: {self!r}")

    @property
    def rows_in_flight(self) -> int:
        """The most rows that may wait on the model at once: every batch full."""
        return self.max_requests * self.max_batches


def parse_batch(p: Problems, key: str, raw: Any) -> BatchSettings | None:
    """``raw`` (None when the block is absent: online requests) as settings; problems to ``p``."""
    if raw is None:
        return None
    body = p.mapping(key, raw)
    if body is None:
        return None
    p.unknown(key, body, _KEYS)
    window = body.get("completion_window", "24h")
    if not isinstance(window, str) or not _WINDOW.fullmatch(window):
        p.add(f"{key}.completion_window", f"must be hours such as 24h, got {window!r}")
        window = "24h"
    default = BatchSettings()
    return BatchSettings(
        completion_window=window,
        max_requests=p.positive_int(
            f"{key}.max_requests",
            body.get("max_requests"),
            default.max_requests,
            most=MOST_REQUESTS,
        )
        or default.max_requests,
        max_bytes=p.positive_int(
            f"{key}.max_bytes", body.get("max_bytes"), default.max_bytes, most=MOST_BYTES
        )
        or default.max_bytes,
        max_batches=p.positive_int(
            f"{key}.max_batches", body.get("max_batches"), default.max_batches, most=10_000
        )
        or default.max_batches,
        poll_s=p.positive_float(f"{key}.poll_s", body.get("poll_s"), default.poll_s),
        flush_s=p.positive_float(f"{key}.flush_s", body.get("flush_s"), default.flush_s),
    )
