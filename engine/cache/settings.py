"""The ``cache:`` section: where the reply store is, and whether a run may add to it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.problems import Problems

READ_WRITE, READ_ONLY = "read_write", "read_only"
MODES = (READ_WRITE, READ_ONLY)


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """The ``cache:`` section: ``dir`` None is off."""

    dir: Path | None = None
    mode: str = READ_WRITE  # read_write | read_only

    @property
    def on(self) -> bool:
        return self.dir is not None


def parse_cache(p: Problems, raw: Any, base: Path) -> CacheConfig:
    """The ``cache:`` section (a relative ``dir`` is the config file's folder's)."""
    body = p.mapping("cache", raw) if raw is not None else None
    if body is None:
        return CacheConfig()
    p.unknown("cache", body, ("dir", "mode"))
    mode = body.get("mode", READ_WRITE)
    if mode not in MODES:
        p.add("cache.mode", f"must be one of {', '.join(MODES)}, got {mode!r}")
        mode = READ_WRITE
    value = body.get("dir")
    if value is None:
        return CacheConfig(mode=mode)
    folder = p.string("cache.dir", value, required=False, fix="a folder, e.g. dir: ~/.turnstile")
    if folder is None:
        return CacheConfig(mode=mode)
    path = Path(folder).expanduser()
    return CacheConfig(path if path.is_absolute() else base / path, mode)
