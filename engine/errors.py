"""The error tree: what went wrong, and whether trying again can help."""

from __future__ import annotations

from typing import Final

# Exit codes, the same for every command and executor (engine.cli's docstring says
# what each means to a user); 128+N is a stop by signal N.
EXIT_OK: Final = 0  # every row succeeded
EXIT_FAILED_ROWS: Final = 1  # some rows failed (see the failed file)
EXIT_UNUSABLE: Final = 2  # the config, input or checkpoint cannot be used (nothing was sent)
EXIT_STOPPED: Final = 3  # stopped on an error it cannot go past: rerun to resume
EXIT_BUDGET: Final = 4  # stopped at the budget: raise it and rerun to resume
EXIT_CRASHED: Final = 70  # EX_SOFTWARE: a bug, never to be read as "some rows failed"


class TurnstileError(Exception):
    """Base of every error Turnstile raises on purpose."""


class ConfigError(TurnstileError):
    """The config is unusable. Holds every problem found, one line each."""

    exit_code = EXIT_UNUSABLE  # also when found once the run has begun (nothing sent)

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class InputError(TurnstileError):
    """One input row cannot be used; the message names the fix."""


class CheckpointError(TurnstileError):
    """The checkpoint cannot be used as it is (changed input or config, damage, lock)."""


class ModelError(TurnstileError):
    """A request to a model failed.

    ``retryable`` says whether the same request may succeed later (429, 5xx,
    timeouts, dropped connections); ``kind`` says why it failed (one of
    ``engine.http.retry``'s PERMANENT, BACKPRESSURE, UNHEALTHY, FLAKY); ``retry_after``
    is the server's hint in seconds, when it gave one. ``model_down`` marks a
    failure of the model, not of this request: it has been unreachable for its
    ``down_after_s``, or it refuses every request (its key is refused, or it answers
    404 to everything); ``fix`` then says what to do before running again.
    """

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        status: int | None = None,
        retry_after: float | None = None,
        model_down: bool = False,
        kind: str = "",
        fix: str = "",
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.kind = kind
        self.status = status
        self.retry_after = retry_after
        self.model_down = model_down
        self.fix = fix

    def stopped(self, role: str = "") -> ModelDown:
        """The error that stops a run for this failure of a model (``model_down``): no
        row is failed for it, and the same command resumes. ``role`` names the model's
        part in the run, e.g. " (the judge)"."""
        fix = self.fix or "start it (or fix base_url)"
        return ModelDown(f"{self}{role}; {fix} and run the same command to resume")


class BudgetReached(TurnstileError):
    """The run stopped at its budget (``budget.max_usd``/``max_tokens``): nothing in
    flight was lost; raising the budget and running the same command resumes it."""

    exit_code = EXIT_BUDGET


def exit_code_of(exc: TurnstileError) -> int:
    """The exit code of a run stopped by ``exc`` (3 unless the error names its own)."""
    code = getattr(exc, "exit_code", EXIT_STOPPED)
    return code if isinstance(code, int) else EXIT_STOPPED


class ModelDown(TurnstileError):
    """A model stopped answering altogether; the run stops, resumable."""


class LocalServerError(TurnstileError):
    """The local llama.cpp server cannot be found, started or made ready."""


class ExportError(TurnstileError):
    """The export cannot be made as asked; the message names the fix."""


class ExecutorError(TurnstileError):
    """A sharded run cannot go on as it is (a shard failed, the cluster or its quota is
    gone); the shards that finished stay finished, and a rerun resumes the others."""
