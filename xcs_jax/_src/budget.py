"""Budgets: caps on tokens (and on cost, given a price table), checked before a call.

A `Budget` given to a runtime (`xcs_jax.runtime(budget=...)`) holds for the
runtime's life; `with xcs_jax.budget(...)` holds for the calls made inside
the block (several blocks nest: every open one must have room; under a
plain `jax.jit`, whose calls run on XLA's threads, only the runtime's budget
applies). Before each
provider attempt goes out, its tokens are estimated (prompt bytes / 4, plus
`max_tokens` for generation) and reserved; a reservation that would cross a
cap raises `BudgetExceededError` and nothing is sent. After the attempt, the
reservation is replaced by the tokens the provider reported. So the cap can
be crossed only by a provider reporting more than the estimate, never by a
request sent on an already spent budget.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import threading
from typing import Iterator, Mapping

from xcs_jax._src.errors import XCSError

_SCOPED: contextvars.ContextVar[tuple] = contextvars.ContextVar("xcs_jax_budgets", default=())


class BudgetExceededError(XCSError):
  """A call would cross a budget's cap on tokens or cost; it was not sent."""


class Budget:
  """A cap on tokens and/or cost.

  Args:
    tokens: the most tokens (prompt + completion, as providers report them).
    cost: the most cost, in the unit of `prices`.
    prices: `{"provider:model": (per input token, per output token)}`; needed
      for every model called under a `cost` cap.
  """

  def __init__(self, *, tokens: int | None = None, cost: float | None = None,
               prices: Mapping[str, tuple[float, float]] | None = None):
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int)
                               or tokens < 0):
      raise ValueError(f"`Budget(tokens=...)` must be an int >= 0 or None; got {tokens!r}.")
    if cost is not None and (isinstance(cost, bool) or not isinstance(cost, (int, float))
                             or not math.isfinite(cost) or cost < 0):
      raise ValueError(f"`Budget(cost=...)` must be a finite number >= 0 or None; "
                       f"got {cost!r}.")
    prices = dict(prices or {})
    for spec, price in prices.items():
      if not (isinstance(spec, str) and isinstance(price, tuple) and len(price) == 2
              and all(isinstance(p, (int, float)) and p >= 0 for p in price)):
        raise ValueError("`Budget(prices=...)` maps \"provider:model\" to (price per input "
                         f"token, price per output token); got {spec!r}: {price!r}.")
    if cost is not None and not prices:
      raise ValueError("`Budget(cost=...)` needs `prices`: {\"provider:model\": "
                       "(per input token, per output token)}.")
    self.tokens, self.cost, self.prices = tokens, cost, prices
    self._lock = threading.Lock()
    self.spent_tokens = 0
    self.spent_cost = 0.0

  def _price(self, binding) -> tuple[float, float]:
    spec = f"{binding.provider}:{binding.model}"
    if spec not in self.prices:
      raise BudgetExceededError(
          f"the budget caps cost but has no price for {spec!r}: add it to "
          f"`Budget(prices={{{spec!r}: (per input token, per output token)}})`. "
          "The call was not sent.")
    return self.prices[spec]

  def reserve(self, binding, tokens_in: int, tokens_out: int) -> tuple[int, float]:
    """Reserves an estimate; raises `BudgetExceededError` if it would cross a cap."""
    cost = 0.0
    if self.cost is not None:
      p_in, p_out = self._price(binding)
      cost = tokens_in * p_in + tokens_out * p_out
    tokens = tokens_in + tokens_out
    with self._lock:
      if self.tokens is not None and self.spent_tokens + tokens > self.tokens:
        raise BudgetExceededError(
            f"a call to {binding} needs about {tokens} tokens, but the budget has "
            f"{self.tokens - self.spent_tokens} of its {self.tokens} left. The call was not "
            "sent; raise the budget's `tokens` or lower `max_tokens`.")
      if self.cost is not None and self.spent_cost + cost > self.cost:
        raise BudgetExceededError(
            f"a call to {binding} would cost about {cost:.6g}, but the budget has "
            f"{self.cost - self.spent_cost:.6g} of its {self.cost:.6g} left. The call was not "
            "sent.")
      self.spent_tokens += tokens
      self.spent_cost += cost
    return tokens, cost

  def settle(self, binding, reservation: tuple[int, float], tokens_in: int | None,
             tokens_out: int | None) -> None:
    """Replaces a reservation by what the attempt used (None: unknown, keep it)."""
    if tokens_in is None or tokens_out is None:
      return
    tokens, cost = reservation
    new_cost = 0.0
    if self.cost is not None:
      p_in, p_out = self._price(binding)
      new_cost = tokens_in * p_in + tokens_out * p_out
    with self._lock:
      self.spent_tokens += tokens_in + tokens_out - tokens
      self.spent_cost += new_cost - cost

  def __repr__(self) -> str:
    caps = ", ".join(f"{k}={v!r}" for k, v in (("tokens", self.tokens), ("cost", self.cost))
                     if v is not None)
    return (f"xcs_jax.Budget({caps}; spent {self.spent_tokens} tokens"
            f"{f', {self.spent_cost:.6g} cost' if self.cost is not None else ''})")


@contextlib.contextmanager
def budget(*, tokens: int | None = None, cost: float | None = None,
           prices: Mapping[str, tuple[float, float]] | None = None) -> Iterator[Budget]:
  """Caps the calls made inside the block (in this context).

  Examples:
    >>> with xcs_jax.budget(tokens=10_000) as b:
    ...   answers = f(prompts)
    >>> b.spent_tokens
  """
  b = Budget(tokens=tokens, cost=cost, prices=prices)
  token = _SCOPED.set(_SCOPED.get() + (b,))
  try:
    yield b
  finally:
    _SCOPED.reset(token)


def scoped_budgets() -> tuple:
  """The `budget` blocks open in this context (a run's `Scope` keeps them, so
  its calls on other threads see them too)."""
  return _SCOPED.get()


def estimate_tokens(text: str) -> int:
  """A provider-independent estimate: about 4 bytes of UTF-8 per token."""
  return max(1, math.ceil(len(text.encode("utf-8", "surrogatepass")) / 4))

