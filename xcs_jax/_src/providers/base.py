"""What every provider shares: the interface, the registry, retries, metering.

A provider turns requests of a `ModelBinding` into answers. Providers are the
only place with network I/O; they never start threads (the runtime does).
Each runtime has its own instance of each provider, so clients, loaded
models and caches belong to a runtime.

A provider's call methods may be plain functions, which run on the
runtime's worker threads, or `async def` coroutines, which run on its event
loop (no thread per request, and cancellation really abandons a request).
"""
from __future__ import annotations

import asyncio
import dataclasses
import inspect
import random
import time
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np

from xcs_jax._src.errors import XCSCancelledError, XCSTimeoutError
from xcs_jax._src.scope import CallContext

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

LOGPROB_ROUNDING_TOL = 1e-4
"""Summing per-token log-probabilities in float32 can round a certain option's
total a hair above zero; up to this much is read as 0, anything more is an
error."""


@dataclasses.dataclass(frozen=True)
class Completion:
  text: str
  prompt_tokens: int = 0
  completion_tokens: int = 0


class TransientError(Exception):
  """A failure worth retrying (rate limit, 5xx, timeout, connection reset)."""


class Provider:
  """Base class of providers. Subclasses set `name` and override methods.

  Call methods get the binding, their inputs and the call's `CallContext`
  (`ctx.deadline`, `ctx.check()`, `ctx.sleep()`); each may be `async def`.

  Attributes:
    name: the prefix of `"provider:model"`.
    params: provider-specific binding parameters and their defaults.
    default_concurrency: calls in flight at once, per endpoint, unless the
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

  def validate(self, model: str, params: dict[str, Any]) -> None:
    """Checks a binding's parameters when it is made (e.g. that its API key is
    set); may normalize values in `params` (every parameter, defaults
    included). Raise TypeError / ValueError as `xcs_jax._src.checks` does."""

  def prepare(self, binding) -> None:
    """Called before a batch of the binding's calls starts, outside their
    deadlines: make what the calls need (an SDK client, which imports parts
    of its SDK), so no call's timeout pays for it."""

  def generate(self, binding, prompt: str, seed: int, ctx: CallContext) -> Completion:
    raise NotImplementedError(f"provider `{self.name}` cannot generate text")

  def score_options(self, binding, prompt: str, options: Sequence[str],
                    ctx: CallContext) -> np.ndarray:
    raise NotImplementedError(
        f"provider `{self.name}` cannot give log-probabilities of options")

  def embed(self, binding, text: str, ctx: CallContext) -> np.ndarray:
    raise NotImplementedError(f"provider `{self.name}` cannot embed text")

  def embedding_dim(self, binding) -> int:
    raise NotImplementedError(f"provider `{self.name}` cannot embed text")

  def is_transient(self, error: BaseException) -> bool:
    return isinstance(error, (TransientError, ConnectionResetError))

  def close(self, runtime) -> None:
    """Frees what the instance holds (clients, models) when its runtime closes."""


_FACTORIES: dict[str, Callable[[], Provider]] = {}


def register_provider(name: str, factory: Callable[[], Provider]) -> None:
  """Registers a provider class (or a factory of instances) under `name`.

  Each runtime makes its own instance on first use.
  """
  if not isinstance(name, str) or not name or ":" in name:
    raise ValueError(f"`register_provider(name, ...)` needs a non-empty name without "
                     f"':'; got {name!r}.")
  if not callable(factory):
    raise TypeError(f"`register_provider({name!r}, factory)` needs a Provider class or a "
                    f"callable returning one; got {factory!r}.")
  _FACTORIES[name] = factory


def provider_names() -> list[str]:
  return sorted(_FACTORIES)


def provider_factory(name: str) -> Callable[[], Provider]:
  try:
    return _FACTORIES[name]
  except KeyError:
    raise ValueError(
        f"unknown provider {name!r} in `xcs_jax.models.bind`: expected one of "
        f"{', '.join(map(repr, provider_names()))}, as \"provider:model\" "
        "(e.g. \"local:smollm2\", \"fake:echo\").") from None


def is_async_method(method: Callable) -> bool:
  return inspect.iscoroutinefunction(method)


@dataclasses.dataclass(frozen=True)
class Backoff:
  """Exponential backoff with full jitter on transient errors."""
  retries: int
  is_transient: Callable[[BaseException], bool]
  base_delay_s: float = 0.05
  max_delay_s: float = 2.0

  def delay(self, error: BaseException, attempt: int) -> float | None:
    """Seconds to wait before attempt `attempt + 1`, or None to give up."""
    if isinstance(error, (XCSCancelledError, XCSTimeoutError)):
      return None
    if attempt >= self.retries or not self.is_transient(error):
      return None
    # The exponent is capped: 2 ** 1100 would not convert to a float.
    growth = 2.0 ** min(attempt + 1, 64)
    return random.uniform(0, min(self.max_delay_s, self.base_delay_s * growth))


class Metered:
  """Usage accounting around one provider call (sync or async)."""

  __slots__ = ("usage", "binding", "ctx", "start")

  def __init__(self, usage, binding, ctx: CallContext):
    self.usage, self.binding, self.ctx = usage, binding, ctx

  def __enter__(self) -> "Metered":
    self.start = time.perf_counter()
    return self

  def retried(self) -> None:
    self.usage.add(self.binding, retries=1)

  def __exit__(self, kind, error, tb) -> None:
    seconds = time.perf_counter() - self.start
    if self.ctx.abandoned:      # counted when it was abandoned
      self.usage.add(self.binding, calls=1, seconds=seconds)
    elif error is None:
      return
    elif isinstance(error, (XCSCancelledError, asyncio.CancelledError, KeyboardInterrupt)):
      self.usage.add(self.binding, calls=1, cancelled=1, seconds=seconds)
    else:
      self.usage.add(self.binding, calls=1, errors=1, seconds=seconds)

  def succeeded(self, result: Any) -> None:
    tokens = {}
    if isinstance(result, Completion):
      tokens = dict(prompt_tokens=result.prompt_tokens,
                    completion_tokens=result.completion_tokens)
    self.usage.add(self.binding, calls=1, seconds=time.perf_counter() - self.start,
                   **tokens)


def retry(attempt: Callable[[], Any], backoff: Backoff, ctx: CallContext,
          on_retry: Callable[[], None] = lambda: None) -> Any:
  """`attempt()` until it succeeds or `backoff` gives up, sleeping between
  tries (the sleeps count against `ctx`'s deadline and stop on cancellation)."""
  tries = 0
  while True:
    ctx.check()
    try:
      return attempt()
    except Exception as e:
      delay = backoff.delay(e, tries)
      if delay is None:
        raise
    ctx.sleep(delay)        # counts against the deadline
    tries += 1
    on_retry()


def call_provider(usage, binding, backoff: Backoff, method: Callable, args: tuple,
                  ctx: CallContext) -> Any:
  """`method(binding, *args, ctx)` with retries (backoff sleeps count against
  the call's deadline) and usage accounting."""
  with Metered(usage, binding, ctx) as meter:
    result = retry(lambda: method(binding, *args, ctx), backoff, ctx, meter.retried)
    if not ctx.abandoned:
      meter.succeeded(result)
    return result


async def acall_provider(usage, binding, backoff: Backoff, method: Callable, args: tuple,
                         ctx: CallContext) -> Any:
  """`call_provider` for an `async def` provider method."""
  with Metered(usage, binding, ctx) as meter:
    attempt = 0
    while True:
      try:
        result = await method(binding, *args, ctx)
        break
      except Exception as e:
        delay = backoff.delay(e, attempt)
        if delay is None:
          raise
      await ctx.asleep(delay)
      attempt += 1
      meter.retried()
    meter.succeeded(result)
    return result
