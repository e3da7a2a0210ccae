"""What replies cost, and the budget a run may not go past. Pure: no loop, no I/O.

Cost is counted from the usage a server reports: prompt tokens at ``price.input``
(those it says it served from its prompt cache, ``cached_tokens``, at
``price.cached_input``), completion tokens (reasoning tokens among them) at
``price.output``, per million tokens; a batch model's at ``batch_discount`` of that.

The budget never lets a request start that could take the run past ``max_usd`` or
``max_tokens`` counting every request in flight at its worst case: its prompt
(estimated from its size, ~4 bytes a token) plus its ``max_tokens`` of output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from engine.http.ratelimit import estimate_tokens

if TYPE_CHECKING:
    from engine.problems import Problems

MILLION = 1_000_000
# The field of a journaled reply that was paid for (sent, not answered from the cache):
# its cost in USD (0.0 without a price). Replay sums it, and its tokens, into the spend.
SPENT = "$"
DEFAULT_OUTPUT = 4096  # a request's worst-case output when its params set no max_tokens


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens; ``cached_input`` None: cached prompt tokens cost ``input``."""

    input: float
    output: float
    cached_input: float | None = None
    batch_discount: float = 0.5

    def cost(self, prompt: int, completion: int, cached: int = 0, *, batch: bool = False) -> float:
        cached = min(cached, prompt)
        cached_rate = self.input if self.cached_input is None else self.cached_input
        usd = ((prompt - cached) * self.input + cached * cached_rate + completion * self.output) / (
            MILLION
        )
        return usd * self.batch_discount if batch else usd


@dataclass(frozen=True, slots=True)
class BudgetConfig:
    """The ``budget:`` section (None: no limit)."""

    max_usd: float | None = None
    max_tokens: int | None = None

    @property
    def on(self) -> bool:
        return self.max_usd is not None or self.max_tokens is not None


def max_output(params: Mapping[str, Any]) -> int:
    """The most output tokens a request with ``params`` may take."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = params.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return DEFAULT_OUTPUT


def worst_case_body(body: bytes) -> tuple[int, int]:
    """(prompt tokens estimated, most output tokens) of a request body sent as it is (a
    batch file's line): its size for the prompt, its own max_tokens for the output."""
    try:
        fields = orjson.loads(body)
    except orjson.JSONDecodeError:
        fields = None
    out = max_output(fields) if isinstance(fields, dict) else DEFAULT_OUTPUT
    return estimate_tokens(len(body), out) - out, out


def worst_case(messages: Sequence[Mapping[str, Any]], params: Mapping[str, Any]) -> tuple[int, int]:
    """(prompt tokens estimated, most output tokens) of one request, before it is sent."""
    size = sum(len(str(m.get("content", ""))) + 16 for m in messages)
    out = max_output(params)
    return estimate_tokens(size, out) - out, out


@dataclass(slots=True)
class Budget:
    """A run's spend against its budget: what was spent, what in flight may still cost.

    ``spent_usd``/``spent_tokens`` start at what earlier runs of the checkpoint spent.
    """

    config: BudgetConfig
    prices: Mapping[str, Price | None]
    spent_usd: float = 0.0
    spent_tokens: int = 0
    held_usd: float = 0.0
    held_tokens: int = 0
    reached: bool = False  # a request was held back: the run stops at the budget

    def hold(
        self, model: str, prompt: int, output: int, *, batch: bool = False
    ) -> tuple[float, int] | None:
        """Reserve a request's worst case (``batch``: at the batch price), or None (and
        ``reached``) when it could go past."""
        tokens = prompt + output
        price = self.prices.get(model)
        usd = price.cost(prompt, output, batch=batch) if price is not None else 0.0
        limit_usd, limit_tokens = self.config.max_usd, self.config.max_tokens
        if (limit_usd is not None and self.spent_usd + self.held_usd + usd > limit_usd) or (
            limit_tokens is not None
            and self.spent_tokens + self.held_tokens + tokens > limit_tokens
        ):
            self.reached = True
            return None
        self.held_usd += usd
        self.held_tokens += tokens
        return usd, tokens

    def release(self, held: tuple[float, int]) -> None:
        """A reservation's request ended: its worst case no longer counts."""
        self.held_usd -= held[0]
        self.held_tokens -= held[1]

    def spend(self, usd: float, tokens: int) -> None:
        self.spent_usd += usd
        self.spent_tokens += tokens

    def message(self, command: str) -> str:
        """What stopped the run, the spend, and how to go on."""
        parts = []
        if self.config.max_usd is not None:
            parts.append(f"budget.max_usd {self.config.max_usd:g}")
        if self.config.max_tokens is not None:
            parts.append(f"budget.max_tokens {self.config.max_tokens}")
        return (
            f"stopped at the budget ({', '.join(parts)}): spent ${self.spent_usd:.4f} and "
            f"{self.spent_tokens:,} tokens; the next request could go past it. Raise the budget "
            f"in the config and run `{command}` again: it resumes"
        )


def _non_negative(p: Problems, key: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        p.add(key, f"must be a number >= 0 (USD per million tokens), got {value!r}")
        return None
    return float(value)


def parse_price(p: Problems, key: str, raw: Any) -> Price | None:
    """``models.X.price``: {input, output, cached_input, batch_discount}; problems name the key."""
    body = p.mapping(key, raw) if raw is not None else None
    if body is None:
        return None
    p.unknown(key, body, ("input", "output", "cached_input", "batch_discount"))
    values = {}
    for name in ("input", "output"):
        if body.get(name) is None:
            p.add(f"{key}.{name}", "missing; USD per million tokens, e.g. input: 0.40")
        values[name] = _non_negative(p, f"{key}.{name}", body.get(name))
    cached = _non_negative(p, f"{key}.cached_input", body.get("cached_input"))
    discount = body.get("batch_discount", 0.5)
    if isinstance(discount, bool) or not isinstance(discount, int | float) or not 0 < discount <= 1:
        p.add(f"{key}.batch_discount", f"must be a fraction in (0, 1], got {discount!r}")
        discount = 0.5
    if values["input"] is None or values["output"] is None:
        return None
    return Price(values["input"], values["output"], cached, float(discount))


def parse_budget(p: Problems, raw: Any, prices: Mapping[str, Price | None]) -> BudgetConfig:
    """The ``budget:`` section; ``prices`` are the used models' (max_usd needs them all)."""
    body = p.mapping("budget", raw) if raw is not None else None
    if body is None:
        return BudgetConfig()
    p.unknown("budget", body, ("max_usd", "max_tokens"))
    usd = _non_negative(p, "budget.max_usd", body.get("max_usd"))
    tokens = p.positive_int("budget.max_tokens", body.get("max_tokens"), None)
    if usd is not None:
        for name, price in sorted(prices.items()):
            if price is None:
                p.add(
                    "budget.max_usd",
                    f"needs a price on every model it pays for; set models.{name}.price: "
                    "{input: ..., output: ...} (USD per million tokens), or use max_tokens",
                )
    return BudgetConfig(usd, tokens)
