"""The servers of one model: where each request goes, each server's cap, and who is out.

A model has one or more *replicas* (servers behind one model name). Each has a
hard cap (``max_concurrency``) and, under it, an adaptive limit that a burst of
backpressure (429, 503, a full KV cache) shrinks and successes grow back. The pool
hands out slots:

- *spread*: a request goes to the live replica with the most free room;
- *affinity*: a conversation's next turn goes back to the replica that served its
  last one while that replica is live and has room (its cached prefix is there);
  a slot freed on a replica goes to the longest waiting of the requests that want
  that replica or have no preference (first come, first served: a conversation's
  next turn does not jump ahead of another's first, which would start the last
  conversations late and leave slots idle at the run's end), else to the longest
  waiting of all, so no slot idles;
- *health*: a replica whose requests fail (connection errors, timeouts, 5xx)
  ``OUT_AFTER_FAILURES`` times in a row is taken out until the client's probe puts
  it back; when every replica is out the model pauses (requests wait, none is
  sent). The model is *unreachable* from the moment its last replica went out
  until a request succeeds again (a probe's answer is not enough: a server can
  answer ``/models`` and fail every completion), and once it has been
  unreachable for ``down_after_s`` with every replica out, the pool is *down*:
  waiting and new requests raise ModelError with ``model_down`` set, until a
  probe finds a replica back. A model that is optional (a preference generator)
  and unreachable from the start is down at once (``down_from_start``);
- *blame*: each replica keeps a ``Ledger`` of its last health failure, settled as
  the row's when the replica answers next and as the server's when it fails again
  or is taken out first (``engine.http.retry``).

URLs are shown (stats, outages, messages) without credentials (``engine.redact``).

Everything here is plain state and decisions: the clock is passed in as ``now``,
the only waiting is on a future per queued request, and no I/O happens (the client
probes).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.errors import ModelError
from engine.http.retry import Ledger
from engine.redact import redact_url
from engine.stats import ModelStats, Outage, ReplicaStats

OUT_AFTER_FAILURES = 3  # health failures in a row that take a replica out
BURST_WINDOW = 32  # recent answers (to requests sent under the current limit) looked at
BURST_MIN = 4  # backpressure answers among them that make a burst (about 1 in 8)


@dataclass(slots=True, eq=False)
class Replica:
    """One server of a model, and its live counters (mirrored into its stats).

    ``url`` is the one requests go to, credentials included; ``stats.url`` the one shown.
    """

    index: int
    url: str
    cap: int
    stats: ReplicaStats
    limit: int = 0
    in_flight: int = 0
    epoch: int = 0  # bumped on each change of limit
    live: bool = True
    failures_in_row: int = 0
    last_answer: float = float("-inf")  # when it last answered anything at all
    ledger: Ledger = field(default_factory=Ledger)  # its last health failure, until settled
    _streak: int = 0
    _recent: deque[bool] = field(default_factory=lambda: deque(maxlen=BURST_WINDOW))

    def __post_init__(self) -> None:
        self.limit = self.cap
        self.stats.limit = self.cap

    @property
    def room(self) -> int:
        return self.limit - self.in_flight if self.live else 0

    def answered(self, now: float) -> None:
        """It answered (any HTTP answer that is not a server failure): it is healthy, so
        its last failure (if still open) was its request's, not its own."""
        self.failures_in_row = 0
        self.last_answer = now
        self.ledger.answered()

    def backpressure(self, epoch: int, *, burst: bool = False) -> bool:
        """A 429/503/full-cache answer to a request sent under ``epoch``; True if it shrank.

        Sporadic ones change nothing (the request is simply retried later); a burst,
        ``BURST_MIN`` of the last ``BURST_WINDOW`` answers sent under the current
        limit, halves the limit once: answers to requests sent before the change
        do not count again. ``burst`` says this one answer is proof enough (a KV
        cache that overflowed because too many conversations run at once).
        """
        self._streak = 0
        if epoch != self.epoch:
            return False
        self._recent.append(True)
        if (not burst and sum(self._recent) < BURST_MIN) or self.limit <= 1:
            return False
        self._set_limit(max(1, self.limit // 2))
        return True

    def succeeded(self, epoch: int) -> bool:
        """A request succeeded; True when this grew the limit (a full window of successes)."""
        if epoch == self.epoch:
            self._recent.append(False)
        if self.limit >= self.cap:
            return False
        self._streak += 1
        if self._streak < self.limit:
            return False
        self._set_limit(self.limit + 1)
        return True

    def resize(self, cap: int) -> None:
        """A new hard cap. A limit at the old cap follows it; one that backpressure
        shrank stays, under the new cap. Requests over a smaller limit finish; no
        new one goes out until the count is under it."""
        at_cap = self.limit >= self.cap
        self.cap = cap
        self.stats.cap = cap
        if at_cap or self.limit > cap:
            self._set_limit(cap)

    def _set_limit(self, limit: int) -> None:
        self.limit = limit
        self.epoch += 1
        self._streak = 0
        self._recent.clear()
        self.stats.limit = limit


@dataclass(slots=True, eq=False)
class _Waiter:
    """A request queued for a slot. ``woken`` is resolved once it is handed a slot
    (``replica``) or the pool goes down (``down``).

    A bare asyncio future, not an anyio Event: aiohttp ties the client to asyncio
    anyway, and at a cap of hundreds every other request queues here, where an
    Event (its backend looked up on each creation) costs three times as much.
    """

    prefer: int | None
    seq: int
    woken: asyncio.Future[None]
    replica: Replica | None = None
    down: bool = False

    def wake(self) -> None:
        if not self.woken.done():  # done: cancelled, and its task will pass the slot on
            self.woken.set_result(None)


class ReplicaPool:
    """Slots on the replicas of one model: spread, affinity, health, pause and down."""

    def __init__(
        self,
        name: str,
        urls: Sequence[str],
        cap: int,
        stats: ModelStats,
        *,
        down_after_s: float = 300.0,
        affinity: bool = True,
    ) -> None:
        if cap <= 0:
            raise ValueError("cap must be positive")
        if not urls:
            raise ValueError("a model needs at least one URL")
        self.name = name
        self.down_after_s = down_after_s
        self.affinity = affinity
        self.stats = stats
        stats.replicas = [ReplicaStats(url=redact_url(url), cap=cap) for url in urls]
        stats.cap = cap * len(urls)
        stats.limit = stats.cap
        self.replicas = [
            Replica(index=i, url=url, cap=cap, stats=stats.replicas[i])
            for i, url in enumerate(urls)
        ]
        self.down = False
        self.unreachable_since: float | None = None
        self._down_why = f"down for {down_after_s:g} s"
        self._queues: dict[int | None, deque[_Waiter]] = {None: deque()}
        for replica in self.replicas:
            self._queues[replica.index] = deque()
        self._waiting = 0
        self._seq = 0
        self._live = len(self.replicas)  # live_count, kept up to date: read once a request

    # -- decisions ----------------------------------------------------------------------

    def pick(self, prefer: int | None) -> Replica | None:
        """The replica a request should go to now, or None when none is live with room."""
        if prefer is not None and self.affinity:
            preferred = self.replicas[prefer] if 0 <= prefer < len(self.replicas) else None
            if preferred is not None and preferred.room > 0:
                return preferred
        best = None
        for replica in self.replicas:
            if replica.room > 0 and (best is None or replica.room > best.room):
                best = replica
        return best

    def other_than(self, replica: Replica) -> Replica | None:
        """A live replica other than ``replica`` (most room first), to re-send to at once."""
        others = [r for r in self.replicas if r is not replica and r.live]
        return max(others, key=lambda r: r.room, default=None)

    @property
    def live_count(self) -> int:
        return self._live

    # -- slots ---------------------------------------------------------------------------

    def try_acquire(self, prefer: int | None = None) -> Replica | None:
        """A slot at once, when one is free and no request is queued; else None (then
        ``acquire``, which queues or raises). The caller must ``release`` it."""
        if self._waiting or self.down:
            return None
        replica = self.pick(prefer)
        if replica is not None:
            self._take(replica)
        return replica

    async def acquire(self, prefer: int | None = None) -> Replica:
        """A slot on a replica (the caller must ``release`` it). Waits while none has room.

        Raises ModelError (``model_down``) when the model is down.
        """
        if self.down:
            raise self.down_error()
        if not self._waiting:
            replica = self.pick(prefer)
            if replica is not None:
                self._take(replica)
                return replica
        if not self.affinity or prefer is None or not 0 <= prefer < len(self.replicas):
            prefer = None
        elif not self.replicas[prefer].live:
            prefer = None
        self._seq += 1
        waiter = _Waiter(prefer, self._seq, asyncio.get_running_loop().create_future())
        self._queues[prefer].append(waiter)
        self._waiting += 1
        try:
            await waiter.woken
        except BaseException:
            if waiter.replica is not None:
                self.release(waiter.replica)  # handed a slot we will not use: pass it on
            elif not waiter.down:
                self._queues[waiter.prefer].remove(waiter)
                self._waiting -= 1
            raise
        if waiter.down:
            raise self.down_error()
        assert waiter.replica is not None
        return waiter.replica

    def release(self, replica: Replica) -> None:
        replica.in_flight -= 1
        replica.stats.in_flight = replica.in_flight
        self.stats.in_flight -= 1
        self._wake(replica)

    def _take(self, replica: Replica) -> None:
        replica.in_flight += 1
        replica.stats.in_flight = replica.in_flight
        self.stats.in_flight += 1

    def _wake(self, replica: Replica) -> None:
        """Hand ``replica``'s free room to waiters: the oldest of its own and those with no
        preference, then the oldest of any."""
        while self._waiting and replica.room > 0:
            waiter = self._next_waiter(replica.index)
            self._waiting -= 1
            self._take(replica)
            waiter.replica = replica
            waiter.wake()

    def _next_waiter(self, index: int) -> _Waiter:
        own, anyone = self._queues[index], self._queues[None]
        if own and (not anyone or own[0].seq < anyone[0].seq):
            return own.popleft()
        if anyone:
            return anyone.popleft()
        oldest = min((q for q in self._queues.values() if q), key=lambda q: q[0].seq)
        return oldest.popleft()

    def _wake_all(self) -> None:
        for replica in self.replicas:
            self._wake(replica)

    # -- adaptive limit --------------------------------------------------------------------

    def set_cap(self, cap: int) -> None:
        """A new hard cap on every replica: a sharded run's share of the model's cap
        (engine.executors.quota), 0 while the shard waits for one."""
        for replica in self.replicas:
            replica.resize(cap)
        self.stats.cap = cap * len(self.replicas)
        self._sync_limit()
        self._wake_all()

    def succeeded(self, replica: Replica, epoch: int, now: float) -> None:
        replica.answered(now)
        replica.stats.ok += 1
        # The model answers. (A late answer from a replica already taken out, with
        # every replica out, restarts the clock instead of stopping it.) With every
        # replica out the clock always runs, so None means there is nothing to do.
        if self.unreachable_since is not None:
            self.unreachable_since = None if self._live else now
            self._down_why = f"down for {self.down_after_s:g} s"  # it has answered now
        if replica.succeeded(epoch):
            self._sync_limit()
            self._wake(replica)

    def backpressure(self, replica: Replica, epoch: int, now: float, *, burst: bool) -> None:
        replica.answered(now)
        if replica.backpressure(epoch, burst=burst):
            self._sync_limit()

    def _sync_limit(self) -> None:
        self.stats.limit = sum(r.limit for r in self.replicas)

    # -- health ----------------------------------------------------------------------------

    def failed(self, replica: Replica, now: float) -> bool:
        """A health failure (connection error, timeout, 5xx); True when it took ``replica`` out."""
        replica.stats.failures += 1
        replica.failures_in_row += 1
        replica.ledger.failed()  # it failed again: its open failure was its own
        if not replica.live or replica.failures_in_row < OUT_AFTER_FAILURES:
            return False
        self.take_out(replica, now)
        self.check_down(now)
        return True

    def take_out(self, replica: Replica, now: float) -> None:
        """Stop sending to ``replica``: its waiters may go to any other replica."""
        if not replica.live:
            return
        replica.live = False
        self._live -= 1
        replica.ledger.failed()  # taken out: its open failure was its own
        replica.stats.live = False
        replica.stats.out_since = now
        self.stats.outages.append(Outage(replica=replica.index, url=replica.stats.url, started=now))
        own = self._queues[replica.index]
        while own:
            waiter = own.popleft()
            waiter.prefer = None
            self._queues[None].append(waiter)
        if self.live_count == 0 and self.unreachable_since is None:
            self.unreachable_since = now

    def back(self, replica: Replica, now: float) -> None:
        """A probe found ``replica`` answering: send to it again."""
        if replica.live:
            return
        replica.live = True
        self._live += 1
        replica.failures_in_row = 0
        replica.last_answer = now
        replica.stats.live = True
        replica.stats.out_since = None
        for outage in reversed(self.stats.outages):
            if outage.replica == replica.index and outage.ended is None:
                outage.ended = now
                break
        self.down = False  # try it again; unreachable_since stays until a request succeeds
        self._wake(replica)

    def check_down(self, now: float) -> bool:
        """Whether the model has been unreachable for ``down_after_s`` with every replica
        out; marks the pool down and fails every waiting request."""
        if self.down:
            return True
        if self.live_count or self.unreachable_since is None:
            return False
        if now - self.unreachable_since < self.down_after_s:
            return False
        self._go_down()
        return True

    def down_from_start(self) -> None:
        """Mark the model down now: every replica is out and none has answered since the
        run started (an optional model, whose requests should not wait ``down_after_s``).
        A probe that finds a replica back lifts it, as it lifts any down."""
        if self.live_count:
            return
        self._down_why = "unreachable since the run started"
        self._go_down()

    def _go_down(self) -> None:
        self.down = True
        for queue in self._queues.values():
            while queue:
                waiter = queue.popleft()
                waiter.down = True
                waiter.wake()
        self._waiting = 0

    def down_error(self) -> ModelError:
        urls = ", ".join(r.stats.url for r in self.replicas)
        return ModelError(
            f"models.{self.name} {self._down_why} (every replica out: {urls})",
            retryable=False,
            model_down=True,
        )
