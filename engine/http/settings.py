"""What the HTTP endpoint needs to know of a model, as plain values.

Built from the run's config outside this package (``engine.endpoints``), so the
HTTP client depends on no config, task, input or output module.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.http.reasoning import AUTO, DEFAULT_TAGS

MAX_REPLY_BYTES = 32 * 1024 * 1024  # a longer reply body fails its request


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """One OpenAI-compatible model: its servers, its key, and how hard to drive it.

    ``name`` is the model's name in the config (``models.NAME``), used in messages;
    ``model`` the name sent to the server. ``api_key`` is the key itself (never
    shown); ``api_key_env`` the variable it came from, named when the key is refused.
    """

    name: str
    base_urls: tuple[str, ...]  # one per replica
    model: str
    api_key: str | None = field(default=None, repr=False)
    api_key_env: str | None = None
    max_concurrency: int = 16  # per replica
    timeout_s: float = 120.0
    max_retries: int = 6
    params: Mapping[str, Any] = field(default_factory=dict)
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    down_after_s: float = 300.0
    affinity: bool = True
    max_reply_bytes: int = MAX_REPLY_BYTES
    reasoning: str = AUTO
    reasoning_tags: tuple[str, str] = DEFAULT_TAGS

    def __post_init__(self) -> None:
        if not self.base_urls:
            raise ValueError(f"models.{self.name}: no base_url")
        if self.max_concurrency <= 0:
            raise ValueError(f"models.{self.name}: max_concurrency must be positive")
