"""A run's batches seen from outside the run: ``turnstile status`` and ``turnstile cancel``.

Both read each batch model's records (``engine.batch.log``) and ask its provider, with
the model's ``base_url`` and key, for each batch's state; ``status`` shows the last
state the records know when the provider cannot be reached. ``cancel`` asks the
provider to cancel every batch of the run that is still running (those the records
name, and those a killed run created before journaling them, found by ``metadata``).
The next ``turnstile run`` collects what a cancelled batch finished and sends the rest
again.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
import anyio

from engine.batch.api import BatchApi
from engine.batch.endpoint import MODEL_KEY, RUN_KEY, SEQ_KEY, run_fingerprint
from engine.batch.lines import TERMINAL
from engine.batch.log import LoggedBatch, log_path, logged_batches, read_log
from engine.errors import ModelError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from engine.config import ModelConfig, RunConfig

_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class BatchView:
    """One batch of a run, for ``turnstile status``: the provider's state when it answered."""

    model: str
    batch: LoggedBatch
    status: str
    completed: int
    failed: int
    total: int
    created_at: float
    live: bool  # the provider answered (False: the records' last known state)


def batch_models(config: RunConfig) -> Iterator[ModelConfig]:
    for name in sorted(config.models_used()):
        model = config.models[name]
        if model.batch is not None:
            yield model


@asynccontextmanager
async def _api(model: ModelConfig) -> AsyncIterator[BatchApi]:
    timeout = aiohttp.ClientTimeout(total=min(model.timeout_s, _TIMEOUT_S))
    async with aiohttp.ClientSession(timeout=timeout) as session:
        yield BatchApi(session, model.base_urls[0], model.api_key())


def _logged(config: RunConfig, model: ModelConfig) -> list[LoggedBatch]:
    return logged_batches(read_log(log_path(config.checkpoint_dir, model.name)))


def view(model: str, logged: LoggedBatch, live: dict[str, Any] | None) -> BatchView:
    """``logged`` as the provider described it (``live``), else as last recorded. Pure."""
    if live is None:
        return BatchView(
            model,
            logged,
            logged.status,
            logged.completed,
            logged.failed,
            logged.total,
            logged.created_at,
            live=False,
        )
    counts = live.get("request_counts") or {}
    return BatchView(
        model,
        logged,
        str(live.get("status") or logged.status),
        int(counts.get("completed") or 0),
        int(counts.get("failed") or 0),
        int(counts.get("total") or logged.total),
        float(live.get("created_at") or logged.created_at),
        live=True,
    )


async def views(config: RunConfig) -> list[BatchView]:
    """Every batch the run's records name, each as its provider describes it now (one
    that cannot be reached: as last recorded)."""
    out: list[BatchView] = []
    for model in batch_models(config):
        logged = await anyio.to_thread.run_sync(_logged, config, model)
        if not logged:
            continue
        async with _api(model) as api:
            reachable = True
            for item in logged:
                live = None
                if item.batch and reachable:
                    try:
                        live = await api.get(item.batch)
                    except ModelError as exc:
                        # Unreachable (or a refused key): the records' state, without
                        # waiting on the provider once per batch.
                        reachable = exc.status == 404
                out.append(view(model.name, item, live))
    return out


def age(seconds: float) -> str:
    """'42s', '7m', '3h05m', '2d04h'."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def status_lines(found: list[BatchView], now: float) -> list[str]:
    """``turnstile status``'s lines for a run's batches (none for a run without). Pure."""
    if not found:
        return []
    running = sum(v.status not in TERMINAL for v in found)
    lines = [f"batches:    {len(found)} ({running} running, {len(found) - running} finished)"]
    for v in found:
        ident = v.batch.batch or f"(file {v.batch.file}, no batch journaled)"
        known = "" if v.live else " (last known)"
        when = f", age {age(now - v.created_at)}" if v.created_at else ""
        lines.append(
            f"  {v.model} {ident}: {v.status}{known}, {v.completed} done / {v.failed} failed"
            f" / {v.total} total{when}"
        )
    return lines


def batch_status(config: RunConfig) -> list[str]:
    """``turnstile status``'s lines for the run's batches. Blocking."""
    if not any(True for _ in batch_models(config)):
        return []
    return status_lines(anyio.run(views, config), time.time())


async def cancel(config: RunConfig) -> list[str]:
    """Cancel every running batch of the run; one line per batch cancelled.

    Raises ModelError when a provider cannot be reached or refuses.
    """
    out: list[str] = []
    fingerprint = run_fingerprint(config.fingerprint_fields(), config.checkpoint_dir)
    for model in batch_models(config):
        logged = await anyio.to_thread.run_sync(_logged, config, model)
        ids = [item.batch for item in logged if item.batch and not item.done]
        unjournaled = {item.seq for item in logged if not item.batch}
        async with _api(model) as api:
            if unjournaled:  # a run killed between create and journal: found by metadata
                async for batch in api.batches():
                    meta = batch.get("metadata") or {}
                    if (
                        meta.get(RUN_KEY) == fingerprint
                        and meta.get(MODEL_KEY) == model.name
                        and str(meta.get(SEQ_KEY)).isdigit()
                        and int(meta[SEQ_KEY]) in unjournaled
                    ):
                        ids.append(str(batch["id"]))
            for batch_id in ids:
                batch = await api.get(batch_id)
                if batch.get("status") in TERMINAL or batch.get("status") == "cancelling":
                    continue
                batch = await api.cancel(batch_id)
                out.append(f"cancelled {model.name} {batch_id} ({batch.get('status')})")
    return out
