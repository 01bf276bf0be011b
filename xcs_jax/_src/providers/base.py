"""What every provider shares: the interface and the registry.

A provider turns requests of a `ModelBinding` into answers. Providers are the
only place with network I/O; they never start threads (the runtime does).
Each runtime has its own instance of each provider, so clients, loaded
models and caches belong to a runtime.

A provider's call methods may be plain functions, which run on the
runtime's worker threads, or `async def` coroutines, which run on its event
loop (no thread per request, and cancellation really abandons a request).
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np

from xcs_jax._src.errors import XCSTimeoutError
from xcs_jax._src.scope import CallContext

# Parameters every binding accepts, with their defaults.
COMMON_PARAMS: dict[str, Any] = {
    "temperature": 0.0,
    "max_tokens": 128,
    "output_bytes": 1024,     # capacity of the answer's text array
    "overflow": "error",      # or "truncate" (at a UTF-8 character boundary)
    "timeout_s": 60.0,        # bounds one attempt
    "deadline_s": 600.0,      # bounds the whole call: attempts, backoff, waits on limits
    "retries": None,          # extra attempts on transient errors; None: until deadline_s
    "concurrency": None,      # None: the provider's default
    "system_prompt": None,
    "seed": 0,
    "cache": "auto",          # "memory", "disk" or None; "auto": memory when deterministic
    "rpm": None,              # requests per minute to the endpoint (shared; the lowest holds)
    "tpm": None,              # tokens per minute to the endpoint
}

NON_ANSWER_PARAMS = frozenset({"output_bytes", "overflow", "timeout_s", "deadline_s",
                               "retries", "concurrency", "cache", "rpm", "tpm",
                               "api_key_env"})
"""Common parameters that do not change a model's answer (how it is stored,
waited for, retried, limited, authenticated); every other parameter keys the
response cache. Providers name their own in `Provider.non_answer_params`."""

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
  """A failure worth retrying (rate limit, 5xx, timeout, connection reset).

  `retry_after_s` (optional) is how long the server asked to wait.
  """

  def __init__(self, message: str = "", *, retry_after_s: float | None = None):
    super().__init__(message)
    self.retry_after_s = retry_after_s


class Provider:
  """Base class of providers. Subclasses set `name` and override methods.

  Call methods get the binding, their inputs and the call's `CallContext`
  (`ctx.deadline`, `ctx.check()`, `ctx.sleep()`); each may be `async def`.

  Attributes:
    name: the prefix of `"provider:model"`.
    params: provider-specific binding parameters and their defaults.
    non_answer_params: which of them do not change the answer (all others
      key the response cache: a parameter left out of this set is safe).
    default_concurrency: calls in flight at once, per endpoint, unless the
      binding says otherwise.
  """

  name: ClassVar[str] = ""
  params: ClassVar[Mapping[str, Any]] = {}
  non_answer_params: ClassVar[frozenset] = frozenset()
  default_concurrency: ClassVar[int] = 16

  def cache_identity(self, binding) -> tuple:
    """What identifies the model behind `binding` in response-cache keys: the
    provider, the model and every parameter that may change the answer (all
    but `NON_ANSWER_PARAMS` and the provider's `non_answer_params`; an
    endpoint's `base_url` among them), never an API key (only the name of the
    variable holding it is a parameter, and not even that is in the key).
    Override to add what names cannot tell (a file's identity)."""
    skip = NON_ANSWER_PARAMS | self.non_answer_params
    return (self.name, binding.model) + tuple(p for p in binding.params if p[0] not in skip)

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
    included). Raise TypeError / ValueError naming the parameter, what was
    expected and the fix, as the library's own checks do."""

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
    """Whether an attempt that failed with `error` is worth retrying: a
    `TransientError`, a reset or refused connection, an attempt that ran past
    `timeout_s`, or an error marked `transient` (the SDK providers mark rate
    limits, overloads and 5xx answers)."""
    return (isinstance(error, (TransientError, ConnectionError, XCSTimeoutError))
            or bool(getattr(error, "transient", False)))

  def retry_after(self, error: BaseException) -> float | None:
    """Seconds the server asked to wait before the next attempt, if it said."""
    value = getattr(error, "retry_after_s", None)
    return None if value is None else float(value)

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
