"""Cost from reported usage, and the budget's worst-case holds (pure)."""

from __future__ import annotations

import orjson
import pytest

from engine.cost import (
    DEFAULT_OUTPUT,
    Budget,
    BudgetConfig,
    Price,
    max_output,
    worst_case,
    worst_case_body,
)
from engine.errors import EXIT_BUDGET, BudgetReached, exit_code_of


def test_cost_counts_cached_prompt_tokens_at_their_price_and_batch_at_a_discount() -> None:
    price = Price(input=0.40, output=1.60, cached_input=0.10)
    assert price.cost(1_000_000, 0) == pytest.approx(0.40)
    assert price.cost(1_000_000, 1_000_000, cached=500_000) == pytest.approx(0.2 + 0.05 + 1.6)
    assert price.cost(1_000_000, 0, batch=True) == pytest.approx(0.20)
    assert Price(1.0, 2.0).cost(100, 0, cached=100) == pytest.approx(Price(1.0, 2.0).cost(100, 0))


def test_worst_case_is_the_prompt_plus_max_tokens() -> None:
    assert max_output({"max_tokens": 64}) == 64
    assert max_output({"max_completion_tokens": 32, "max_tokens": 64}) == 32
    prompt, out = worst_case([{"role": "user", "content": "x" * 400}], {"max_tokens": 10})
    assert out == 10 and prompt >= 100


def test_the_budget_holds_in_flight_requests_at_their_worst_case() -> None:
    budget = Budget(BudgetConfig(max_tokens=100), {})
    first = budget.hold("m", 30, 20)
    assert first is not None
    assert budget.hold("m", 30, 20) is not None  # 100 held: at the limit, not past it
    assert budget.hold("m", 1, 0) is None and budget.reached
    budget.release(first)
    budget.spend(0.0, 10)  # it took 10 of its 50
    assert budget.hold("m", 30, 10) is not None


def test_the_usd_budget_and_its_message() -> None:
    budget = Budget(BudgetConfig(max_usd=1.0), {"m": Price(1.0, 1.0)}, spent_usd=0.5)
    assert budget.hold("m", 400_000, 100_001) is None
    assert "budget.max_usd 1" in budget.message("turnstile run x.yaml")
    assert "turnstile run x.yaml" in budget.message("turnstile run x.yaml")
    assert exit_code_of(BudgetReached("x")) == EXIT_BUDGET == 4


def test_a_raw_bodys_worst_case_is_its_size_and_its_own_max_tokens() -> None:
    body = orjson.dumps({"model": "m", "prompt": "x" * 400, "max_tokens": 50})
    assert worst_case_body(body) == (len(body) // 4, 50)
    # No max_tokens (an embeddings body) or no JSON at all: the default output.
    assert worst_case_body(b'{"input": ["a"]}')[1] == DEFAULT_OUTPUT
    assert worst_case_body(b"not json")[1] == DEFAULT_OUTPUT
