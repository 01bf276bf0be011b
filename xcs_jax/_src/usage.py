"""Usage counters per binding, kept by each runtime."""
from __future__ import annotations

import dataclasses
import threading
from typing import Any


@dataclasses.dataclass
class Usage:
  """Counters for one binding, readable from Python.

  Attributes:
    calls: provider calls started (retries are not extra calls; answers from
      the response cache are not calls).
    cache_hits: calls answered from the response cache (no provider call).
    errors: calls that failed for a reason of their own.
    retries: extra attempts after transient errors.
    cancelled: calls stopped, or never started, because their run failed
      first or was interrupted (not errors).
    abandoned: calls still running when their run ended (they ignored
      cancellation or ran past a timeout they could not stop): they finish
      in the background and their results are discarded.
    prompt_tokens, completion_tokens: as the provider reported them.
    seconds: time spent in calls (summed over concurrent calls).
    waited_s: time calls waited on their endpoint's rate limits.
  """
  calls: int = 0
  cache_hits: int = 0
  errors: int = 0
  retries: int = 0
  cancelled: int = 0
  abandoned: int = 0
  prompt_tokens: int = 0
  completion_tokens: int = 0
  seconds: float = 0.0
  waited_s: float = 0.0


class UsageMeter:
  """Thread-safe usage counters, keyed by binding."""

  def __init__(self) -> None:
    self._lock = threading.Lock()
    self._by_binding: dict[Any, Usage] = {}

  def add(self, binding, **deltas) -> None:
    with self._lock:
      u = self._by_binding.get(binding)
      if u is None:
        u = self._by_binding[binding] = Usage()
      d = u.__dict__
      for k, v in deltas.items():
        d[k] += v

  def add_call(self, binding, seconds: float, prompt_tokens: int = 0,
               completion_tokens: int = 0) -> None:
    """One call that succeeded: `add(binding, calls=1, ...)`, on the hot path."""
    with self._lock:
      u = self._by_binding.get(binding)
      if u is None:
        u = self._by_binding[binding] = Usage()
      u.calls += 1
      u.seconds += seconds
      u.prompt_tokens += prompt_tokens
      u.completion_tokens += completion_tokens

  def get(self, binding) -> Usage:
    with self._lock:
      return dataclasses.replace(self._by_binding.get(binding, Usage()))

  def snapshot(self) -> dict[str, dict[str, float]]:
    with self._lock:
      return {str(b): dataclasses.asdict(u) for b, u in self._by_binding.items()}

  def reset(self) -> None:
    with self._lock:
      self._by_binding.clear()
