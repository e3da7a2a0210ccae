"""What a crash leaves behind: one line for the user, a traceback for the bug report.

A crash is an exception Turnstile did not raise on purpose: a bug. It exits 70
(EX_SOFTWARE), never 1 ("some rows failed"), so a wrapper script cannot read it as
partial success. The journal is left as it was: the same command resumes.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

from engine.redact import scrub

CRASH_LOG = "crash.log"


def first_error(exc: BaseException) -> BaseException:
    """The error a task group's exception group was raised for (its first leaf)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def crash_report(exc: BaseException, secrets: Iterable[str]) -> tuple[str, str]:
    """The one-line summary and the full traceback of ``exc``, secrets removed from both."""
    keys = list(secrets)
    cause = first_error(exc)
    line = scrub(f"{type(cause).__name__}: {cause}", keys).splitlines()
    text = "".join(traceback.format_exception(exc))
    return (line[0] if line else type(cause).__name__), scrub(text, keys)


def write_crash_log(folder: Path, exc: BaseException, secrets: Iterable[str]) -> tuple[str, Path]:
    """Append the crash's traceback to ``folder/crash.log``; returns the summary and the path."""
    summary, text = crash_report(exc, secrets)
    path = folder / CRASH_LOG
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    with path.open("a", encoding="utf-8") as f:
        f.write(f"--- {stamp} turnstile crashed: {summary}\n{text}\n")
    return summary, path
