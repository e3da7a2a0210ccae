"""A run's model endpoints, built from its config.

The one place that turns a ``models.NAME`` section (``engine.config.ModelConfig``)
into the plain values the HTTP endpoint takes, so ``engine.http`` never imports
the config; a model with a ``batch:`` block becomes a ``BatchEndpoint`` here.
The key is read from its environment variable here, when the
endpoint is built.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from engine.config import ModelConfig
from engine.http.client import Clock, HttpEndpoint, Sleep
from engine.http.endpoint import ModelEndpoint
from engine.http.settings import HttpSettings
from engine.stats import ModelStats

if TYPE_CHECKING:
    from engine.batch.endpoint import BatchRun


def http_settings(config: ModelConfig, base_urls: Sequence[str] | None = None) -> HttpSettings:
    """``config`` as plain values; ``base_urls`` replaces its URLs (the built-in server's)."""
    return HttpSettings(
        name=config.name,
        base_urls=tuple(base_urls or config.base_urls),
        model=config.model,
        api_key=config.api_key(),
        api_key_env=config.api_key_env,
        max_concurrency=config.max_concurrency,
        timeout_s=config.timeout_s,
        max_retries=config.max_retries,
        params=config.params,
        requests_per_minute=config.requests_per_minute,
        tokens_per_minute=config.tokens_per_minute,
        down_after_s=config.down_after_s,
        affinity=config.affinity,
        max_reply_bytes=config.max_reply_bytes,
        reasoning=config.reasoning,
        reasoning_tags=config.reasoning_tags,
    )


def http_endpoint(
    config: ModelConfig,
    stats: ModelStats | None = None,
    *,
    base_urls: Sequence[str] | None = None,
    sleep: Sleep = anyio.sleep,
    clock: Clock = time.monotonic,
    draw: Callable[[], float] = random.random,
) -> HttpEndpoint:
    """The online endpoint of model ``config`` (see ``HttpEndpoint`` for the rest)."""
    return HttpEndpoint(
        http_settings(config, base_urls), stats, sleep=sleep, clock=clock, draw=draw
    )


def model_endpoint(
    config: ModelConfig,
    stats: ModelStats | None = None,
    *,
    base_urls: Sequence[str] | None = None,
    batch_run: BatchRun | None = None,
    checkpoint_dir: Path | None = None,
) -> ModelEndpoint:
    """Model ``config``'s endpoint: its Batch API when it has a ``batch:`` block (its
    records in ``checkpoint_dir``, its batches named by ``batch_run``), else online."""
    if config.batch is None:
        return http_endpoint(config, stats, base_urls=base_urls)
    if batch_run is None or checkpoint_dir is None:
        raise ValueError(f"models.{config.name}: a batch model needs its run and checkpoint")
    # Imported here: a run whose models are all online never loads the batch modules.
    from engine.batch.endpoint import BatchEndpoint
    from engine.batch.log import FileLog, log_path

    return BatchEndpoint(
        http_settings(config, base_urls),
        config.batch,
        stats,
        log=FileLog(log_path(checkpoint_dir, config.name)),
        run=batch_run,
    )
