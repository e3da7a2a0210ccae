"""The model-endpoint seam: what every request of a run goes through, whatever carries it.

Tasks, the runner and the shard executors see a model only as a ``ModelEndpoint``
(``Context.clients``); none of them knows whether it is the online HTTP endpoint
(``engine.http.client.HttpEndpoint``: replicas, caps, retries, outages), an
in-memory transport (``engine.testing.memory_endpoint``), or, later, a provider's
batch API. A new implementation provides:

- ``complete(messages, extra=None, *, prefer=None) -> Completion``: one chat
  completion. ``extra`` adds request parameters (over the model's own);
  ``prefer`` is the replica (``Completion.replica``) that served the
  conversation's previous turn, a hint an endpoint without replicas ignores. It
  raises ``ModelError``: ``retryable`` False once the request is given up,
  ``model_down`` set when the model itself is down or refuses every request (no
  row's fault: the run stops, resumable, or an optional model's rows go on);
- ``probe() -> list[str]``: before the first request, a problem line (naming
  the config key to fix) per server that cannot be reached;
- ``statistics() -> EndpointStatistics``: a frozen snapshot of its counters,
  never the live objects it writes;
- ``set_share(cap)``: the most requests it may have in flight per replica (a
  sharded run's share of the model's cap; 0 sends nothing); None before a
  share is granted: nothing goes out, and no limit is shown;
- ``down_from_start()``: the run goes on without it (an optional model none of
  whose servers answered the probe): its requests fail at once, ``model_down``,
  until it answers again;
- ``async with``: whatever it holds open (sessions, background probes) lives
  between ``__aenter__`` and ``__aexit__``.

An endpoint that can also send a request body of any kind as it is (a batch
file's ``/completions`` or ``/embeddings`` line, say) is a ``RawEndpoint`` too:
``post(path, body, *, prefer=None) -> RawReply``, ``path`` under the model's
base URL, with the same caps, retries, replicas and errors as ``complete``.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, Protocol, Self, runtime_checkable

from engine.stats import LatencyHistogram, ModelStats, Outage, ReplicaStats

Messages = list[dict[str, str]]

# Who asks: ``(row line, reply key)``, set by ``RowContext.ask`` around ``complete``. An
# endpoint that must name its requests the same in every process (a batch model's
# ``custom_id``) reads it; the others ignore it.
asker: ContextVar[tuple[int, object] | None] = ContextVar("asker", default=None)


# Not frozen: one is built per request, and a frozen dataclass's __init__ costs four
# times as much (object.__setattr__ per field). Nothing changes one after it is made.
@dataclass(slots=True)
class Completion:
    """What one successful request returned: per choice its answer, its reasoning trace
    (None when it had none) and why it ended; and the token usage.

    ``texts`` are answers only: a trace never ends up in them (``engine.http.reasoning``
    takes the reply apart by the model's ``reasoning`` dialect).
    """

    texts: list[str]
    finish_reasons: list[str | None]
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    replica: int = 0  # which of the model's servers answered
    traces: list[str | None] | None = None  # None: no choice had a trace
    reasoning_tokens: int = 0  # part of completion_tokens, where the server reports it
    cached_tokens: int = 0  # part of prompt_tokens served from the server's prompt cache

    def trace(self, choice: int = 0) -> str | None:
        traces = self.traces
        return traces[choice] if traces is not None else None

    def cut_off(self, choice: int = 0) -> bool:
        """Cut off by max_tokens while reasoning: a trace, no answer, finish_reason length."""
        return (
            not self.texts[choice]
            and self.finish_reasons[choice] == "length"
            and self.trace(choice) is not None
        )


@dataclass(slots=True)
class RawReply:
    """What one successful raw request returned (``RawEndpoint.post``): the body as the
    server sent it, parsed (``data``, a JSON object), and the usage it reports (0 where
    it reports none: embeddings have no completion tokens)."""

    status: int
    body: bytes
    data: dict[str, Any]
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    replica: int = 0  # which of the model's servers answered
    cached_tokens: int = 0  # part of prompt_tokens served from the server's prompt cache
    reasoning_tokens: int = 0  # part of completion_tokens, where the server reports it


@dataclass(frozen=True, slots=True)
class ReplicaStatistics:
    """One server of a model at the moment of the snapshot (its URL without credentials)."""

    url: str
    cap: int
    limit: int | None  # the adaptive limit under the cap; None: no share granted yet
    in_flight: int
    requests: int
    ok: int
    failures: int  # health failures: connection errors, timeouts, 5xx
    retried: int
    failed: int
    live: bool
    out_since: float | None


@dataclass(frozen=True, slots=True)
class EndpointStatistics:
    """A model's counters at the moment of the snapshot: copies, never updated after.

    ``live`` is how many of its replicas are taken to be up; ``down`` whether its
    requests fail at once (``model_down``).
    """

    name: str
    cap: int
    limit: int | None
    in_flight: int
    requests: int
    ok: int
    retries: int  # charged to a row (its max_retries)
    resent: int  # sent again after a server failure, charged to no row
    failures: int
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    latency: LatencyHistogram  # a copy
    replicas: tuple[ReplicaStatistics, ...]
    outages: tuple[Outage, ...]  # copies
    live: int
    down: bool

    @property
    def claim(self) -> int:
        """The most it may have in flight on any one replica until it takes a new share:
        its limit there, or more while requests over a lowered limit finish."""
        return max((max(r.limit or 0, r.in_flight) for r in self.replicas), default=0)

    @classmethod
    def of(cls, stats: ModelStats, *, live: int, down: bool) -> EndpointStatistics:
        """A snapshot of the live counters ``stats`` (what an endpoint writes as it goes)."""
        latency = LatencyHistogram()
        latency.merge(stats.latency.buckets(), stats.latency.total_s)
        return cls(
            name=stats.name,
            cap=stats.cap,
            limit=stats.limit,
            in_flight=stats.in_flight,
            requests=stats.requests,
            ok=stats.ok,
            retries=stats.retries,
            resent=stats.resent,
            failures=stats.failures,
            prompt_tokens=stats.prompt_tokens,
            completion_tokens=stats.completion_tokens,
            reasoning_tokens=stats.reasoning_tokens,
            latency=latency,
            replicas=tuple(_replica(r) for r in stats.replicas),
            outages=tuple(replace(o) for o in stats.outages),
            live=live,
            down=down,
        )


def _replica(r: ReplicaStats) -> ReplicaStatistics:
    return ReplicaStatistics(
        url=r.url,
        cap=r.cap,
        limit=r.limit,
        in_flight=r.in_flight,
        requests=r.requests,
        ok=r.ok,
        failures=r.failures,
        retried=r.retried,
        failed=r.failed,
        live=r.live,
        out_since=r.out_since,
    )


class ModelEndpoint(Protocol):
    """One model as a run sees it (see the module's docstring for the contract)."""

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def complete(
        self,
        messages: Messages,
        extra: Mapping[str, Any] | None = None,
        *,
        prefer: int | None = None,
    ) -> Completion:
        """One chat completion; raises ``ModelError`` (see the module's docstring)."""
        ...

    async def probe(self) -> list[str]:
        """A problem line per server that cannot be reached (each is taken out)."""
        ...

    def statistics(self) -> EndpointStatistics:
        """A frozen snapshot of its counters."""
        ...

    def set_share(self, cap: int | None) -> None:
        """Its cap per replica from now on; None: none granted yet (nothing goes out)."""
        ...

    def down_from_start(self) -> None:
        """Fail its requests at once (``model_down``) while no server of it answers."""
        ...


@runtime_checkable
class RawEndpoint(Protocol):
    """An endpoint that also sends request bodies as they are (see the module's docstring)."""

    async def post(self, path: str, body: bytes, *, prefer: int | None = None) -> RawReply:
        """``body`` POSTed to ``path`` (``/completions``, ``/embeddings``, ...) under the
        model's base URL; a 200 whose body is a JSON object, else ``ModelError`` as
        ``complete`` raises it."""
        ...
