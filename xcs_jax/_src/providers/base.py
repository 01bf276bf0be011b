"""What every provider shares: the interface, the registry, retries, usage.

A provider turns requests of a `ModelBinding` into answers. Providers are the
only place with network I/O; they never start threads (the executor does).
"""
from __future__ import annotations

import dataclasses
import random
import threading
import time
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np

from xcs_jax._src.errors import XCSCancelledError, XCSTimeoutError
from xcs_jax._src.executor import CallContext

# Parameters every binding accepts, with their defaults.
COMMON_PARAMS: dict[str, Any] = {
    "temperature": 0.0,
    "max_tokens": 128,
    "output_bytes": 1024,     # capacity of the answer's text array
    "overflow": "error",      # or "truncate" (at a UTF-8 character boundary)
    "timeout_s": 60.0,
    "retries": 2,             # extra attempts on transient errors
    "concurrency": None,      # None: the provider's default
    "system_prompt": None,
    "seed": 0,
}


@dataclasses.dataclass(frozen=True)
class Completion:
  text: str
  prompt_tokens: int = 0
  completion_tokens: int = 0


class TransientError(Exception):
  """A failure worth retrying (rate limit, 5xx, timeout, connection reset)."""


class Provider:
  """Base class of providers. Subclasses set `name` and override methods.

  Attributes:
    name: the prefix of `"provider:model"`.
    params: provider-specific binding parameters and their defaults.
    default_concurrency: calls in flight at once, per provider, unless the
      binding says otherwise.
  """

  name: ClassVar[str] = ""
  params: ClassVar[Mapping[str, Any]] = {}
  default_concurrency: ClassVar[int] = 16

  def concurrency(self, binding) -> int:
    """Calls in flight at once for a binding that does not set `concurrency`."""
    return self.default_concurrency

  def limit_scope(self, binding) -> str:
    """What one concurrency limit covers: the provider, or, for a provider bound
    to endpoints (a `base_url` param), each endpoint: rate limits belong to a
    server, so two servers never share one limit."""
    if "base_url" in self.params:
      return f"{self.name}@{binding.get('base_url') or 'default'}"
    return self.name

  def validate(self, model: str, params: Mapping[str, Any]) -> None:
    """Checks a binding when it is made (e.g. that its API key is set)."""

  # Each call gets the binding, its inputs, the batch's `CallContext` (poll it
  # or sleep through it so a failing sibling stops the call) and `deadline`, a
  # `time.monotonic()` value after which the call must raise XCSTimeoutError.

  def generate(self, binding, prompt: str, seed: int, ctx: CallContext,
               deadline: float | None) -> Completion:
    raise NotImplementedError(f"provider `{self.name}` cannot generate text")

  def score_options(self, binding, prompt: str, options: Sequence[str],
                    ctx: CallContext, deadline: float | None) -> np.ndarray:
    raise NotImplementedError(
        f"provider `{self.name}` cannot give log-probabilities of options")

  def embed(self, binding, text: str, ctx: CallContext,
            deadline: float | None) -> np.ndarray:
    raise NotImplementedError(f"provider `{self.name}` cannot embed text")

  def embedding_dim(self, binding) -> int:
    raise NotImplementedError(f"provider `{self.name}` cannot embed text")

  def is_transient(self, error: BaseException) -> bool:
    return isinstance(error, (TransientError, ConnectionResetError))


_PROVIDERS: dict[str, Callable[[], Provider]] = {}
_INSTANCES: dict[str, Provider] = {}
_registry_lock = threading.Lock()


def register_provider(name: str, factory: Callable[[], Provider]) -> None:
  """Registers a provider class (or factory) under `name`."""
  _PROVIDERS[name] = factory


def provider_names() -> list[str]:
  return sorted(_PROVIDERS)


def get_provider(name: str) -> Provider:
  """The process-wide instance of provider `name` (created on first use)."""
  inst = _INSTANCES.get(name)
  if inst is None:
    if name not in _PROVIDERS:
      raise ValueError(
          f"unknown provider {name!r} in `xcs_jax.models.bind`: expected one of "
          f"{', '.join(map(repr, provider_names()))}, as \"provider:model\" "
          "(e.g. \"local:smollm2\", \"fake:echo\").")
    with _registry_lock:
      inst = _INSTANCES.get(name)
      if inst is None:
        inst = _INSTANCES[name] = _PROVIDERS[name]()
  return inst


def call_with_retries(fn: Callable[[], Any], *, retries: int, is_transient,
                      ctx: CallContext, deadline: float | None, timeout_s,
                      on_retry: Callable[[], None] = lambda: None,
                      base_delay_s: float = 0.05, max_delay_s: float = 2.0) -> Any:
  """`fn()`, retried on transient errors with exponential backoff and full jitter.

  Permanent errors, cancellations and timeouts are raised at once.
  """
  attempt = 0
  while True:
    ctx.check()
    try:
      return fn()
    except (XCSCancelledError, XCSTimeoutError):
      raise
    except Exception as e:
      if attempt >= retries or not is_transient(e):
        raise
      attempt += 1
      on_retry()
      delay = random.uniform(0, min(max_delay_s, base_delay_s * 2 ** attempt))
      ctx.sleep(delay, deadline=deadline, timeout_s=timeout_s)


@dataclasses.dataclass
class Usage:
  """Counters for one binding, readable from Python."""
  calls: int = 0
  errors: int = 0
  retries: int = 0
  prompt_tokens: int = 0
  completion_tokens: int = 0
  seconds: float = 0.0


class UsageMeter:
  """Thread-safe usage counters, keyed by binding."""

  def __init__(self) -> None:
    self._lock = threading.Lock()
    self._by_binding: dict[Any, Usage] = {}

  def add(self, binding, **deltas) -> None:
    with self._lock:
      u = self._by_binding.setdefault(binding, Usage())
      for k, v in deltas.items():
        setattr(u, k, getattr(u, k) + v)

  def get(self, binding) -> Usage:
    with self._lock:
      return dataclasses.replace(self._by_binding.get(binding, Usage()))

  def snapshot(self) -> dict[str, dict[str, float]]:
    with self._lock:
      return {str(b): dataclasses.asdict(u) for b, u in self._by_binding.items()}

  def reset(self) -> None:
    with self._lock:
      self._by_binding.clear()


USAGE = UsageMeter()


def timed_call(binding, fn: Callable[[float | None], Any], ctx: CallContext) -> Any:
  """`fn(deadline)` with the binding's retries, timeout and usage accounting."""
  provider = get_provider(binding.provider)
  timeout_s = binding.get("timeout_s")
  deadline = None if timeout_s is None else time.monotonic() + float(timeout_s)
  start = time.perf_counter()
  try:
    result = call_with_retries(
        lambda: fn(deadline), retries=int(binding.get("retries")), is_transient=provider.is_transient,
        ctx=ctx, deadline=deadline, timeout_s=timeout_s,
        on_retry=lambda: USAGE.add(binding, retries=1))
  except Exception:
    USAGE.add(binding, calls=1, errors=1, seconds=time.perf_counter() - start)
    raise
  tokens = {}
  if isinstance(result, Completion):
    tokens = dict(prompt_tokens=result.prompt_tokens,
                  completion_tokens=result.completion_tokens)
  USAGE.add(binding, calls=1, seconds=time.perf_counter() - start, **tokens)
  return result
