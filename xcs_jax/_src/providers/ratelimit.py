"""Rate limits of one endpoint: request and token budgets, pauses, adaptive concurrency.

Each runtime keeps one `EndpointLimiter` per endpoint (what a provider's
`limit_scope` names: `openai@http://host/v1`), shared by every binding of that
endpoint:

- **rpm / tpm**: token buckets of requests and tokens per minute, refilled
  continuously, holding about one second's worth as a burst. Where bindings
  of one endpoint disagree, the lower limit holds. A request reserves its
  estimated tokens before it goes out and is corrected by what the provider
  reports after; a request the buckets cannot take yet waits its turn (in
  arrival order), counting against its call's deadline, never failing.
- **pauses**: a 429 (or 503/529) with `Retry-After`, or response headers
  saying a budget is spent (`x-ratelimit-remaining-requests: 0` with
  `x-ratelimit-reset-requests`), pause every request to the endpoint until
  then.
- **adaptive concurrency (AIMD)**: a 429 halves how many calls may be in
  flight to the endpoint (a cap in the runtime's `Limits`); every success
  earns back a fraction of one slot (one slot per cap's worth of successes),
  up to the bindings' own limit.
"""
from __future__ import annotations

import threading
import time
from typing import Any

from xcs_jax._src.providers import sdk


class _Bucket:
  """Virtual-time token bucket: a reservation returns how long to wait."""

  __slots__ = ("rate", "burst", "level", "stamp")

  def __init__(self, per_minute: float, now: float):
    self.rate = per_minute / 60.0
    self.burst = max(1.0, self.rate)
    self.level = self.burst
    self.stamp = now

  def refill(self, now: float) -> None:
    self.level = min(self.burst, self.level + (now - self.stamp) * self.rate)
    self.stamp = now

  def reserve(self, amount: float, now: float) -> float:
    self.refill(now)
    self.level -= amount
    return 0.0 if self.level >= 0 else -self.level / self.rate

  def give_back(self, amount: float) -> None:
    self.level = min(self.burst, self.level + amount)


class EndpointLimiter:
  """Rate limits and adaptive concurrency of one endpoint (see the module doc).

  Args:
    endpoint: the endpoint's name (a provider's `limit_scope`).
    limits: the runtime's `Limits` (for the adaptive cap).
  """

  def __init__(self, endpoint: str, limits):
    self.endpoint = endpoint
    self._limits = limits
    self._keys: dict = {}          # the endpoint's concurrency keys -> their limits
    self.cap: int | None = None
    self._lock = threading.Lock()
    self.rpm: float | None = None
    self.tpm: float | None = None
    self._requests: _Bucket | None = None
    self._tokens: _Bucket | None = None
    self.paused_until = 0.0
    self.max_concurrency: int | None = None
    self._earned = 0.0
    self.rate_limited = 0        # 429s seen
    self.waited_s = 0.0          # summed over requests

  def configure(self, rpm: float | None, tpm: float | None, key: Any,
                concurrency: int) -> None:
    """A binding's limits: the lower rpm and tpm hold; `key` is its concurrency
    key (each binding's limit is a key of its own; a cap applies to all)."""
    now = time.monotonic()
    with self._lock:
      if rpm is not None and (self.rpm is None or rpm < self.rpm):
        self.rpm, self._requests = rpm, _Bucket(rpm, now)
      if tpm is not None and (self.tpm is None or tpm < self.tpm):
        self.tpm, self._tokens = tpm, _Bucket(tpm, now)
      if key in self._keys:
        return
      self._keys[key] = concurrency
      self.max_concurrency = max(self._keys.values())
      cap = self.cap
    if cap is not None:
      self._limits.set_cap(key, cap)

  def _set_cap(self, cap: int | None) -> None:
    with self._lock:
      self.cap = cap
      keys = list(self._keys)
    for key in keys:
      self._limits.set_cap(key, cap)

  def _in_flight(self) -> int:
    return sum(self._limits.held(k) for k in list(self._keys))

  @property
  def active(self) -> bool:
    """Whether a request may have to wait (a budget set, or a pause seen)."""
    return self._requests is not None or self._tokens is not None or self.paused_until > 0

  def reserve(self, requests: int, tokens: int) -> float:
    """Takes `requests` and `tokens` from the buckets; seconds to wait first."""
    now = time.monotonic()
    with self._lock:
      wait = max(0.0, self.paused_until - now)
      if self._requests is not None:
        wait = max(wait, self._requests.reserve(requests, now))
      if self._tokens is not None:
        wait = max(wait, self._tokens.reserve(tokens, now))
      self.waited_s += wait
    return wait

  def settle(self, estimated: int, actual: int | None) -> None:
    """Corrects a request's token reservation by what it really used."""
    if actual is None or self._tokens is None:
      return
    with self._lock:
      self._tokens.give_back(estimated - actual)

  def observe(self, error: BaseException | None, headers: Any = None) -> None:
    """After an attempt: a 429 halves the concurrency and pauses the endpoint;
    a success earns concurrency back; exhausted budgets in headers pause."""
    if error is None and not headers and self.cap is None:
      return     # the common case: nothing learnt
    status = getattr(error, "status", None) if error is not None else None
    now = time.monotonic()
    if status in (429, 503, 529):
      pause = getattr(error, "retry_after_s", None)
      held = self._in_flight()
      with self._lock:
        self.rate_limited += 1
        if pause:
          self.paused_until = max(self.paused_until, now + float(pause))
        cap = self.cap or self.max_concurrency or held or 1
        new_cap = max(1, min(cap, max(held, 1)) // 2)
        self._earned = 0.0
      self._set_cap(new_cap)
      return
    if error is None:
      self._pause_from_headers(headers, now)
      cap = self.cap
      if cap is None:
        return
      with self._lock:
        self._earned += 1.0 / cap
        grow = self._earned >= 1.0
        if grow:
          self._earned = 0.0
      if grow:
        top = self.max_concurrency or cap + 1
        self._set_cap(None if cap + 1 >= top else cap + 1)

  def _pause_from_headers(self, headers: Any, now: float) -> None:
    if not headers:
      return
    for budget in ("requests", "tokens"):
      remaining = headers.get(f"x-ratelimit-remaining-{budget}")
      if remaining is None:
        continue
      try:
        spent = float(remaining) <= 0
      except ValueError:
        continue
      reset = sdk.parse_duration(headers.get(f"x-ratelimit-reset-{budget}"))
      if spent and reset:
        with self._lock:
          self.paused_until = max(self.paused_until, now + reset)
