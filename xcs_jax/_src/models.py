"""Model bindings: `bind("provider:model", **params)` and the calls they make."""
from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from xcs_jax._src import checks
from xcs_jax._src import numeric
from xcs_jax._src import text as text_lib
from xcs_jax._src.binding_ops import GenerateOp, concurrency_of, generate_p, provider_of
from xcs_jax._src.primitives import bind_host_call
from xcs_jax._src.providers import base
from xcs_jax._src.runtime import current_runtime
from xcs_jax._src.source import user_source
from xcs_jax._src.usage import Usage


@dataclasses.dataclass(frozen=True)
class ModelBinding:
  """An immutable, hashable handle on one model with fixed parameters.

  Make one with `xcs_jax.models.bind`. Calling it on a uint8 text array
  `[..., max_len]` generates one answer per prompt, as a text array
  `[..., output_bytes]`; leading axes are a batch of prompts, answered
  concurrently.

  Attributes:
    provider: the provider name (``"local"``, ``"openai"``, ``"fake"``, ...).
    model: the model name within the provider.
    params: every parameter, defaults included, as sorted (name, value) pairs.
  """

  provider: str
  model: str
  params: tuple[tuple[str, Any], ...]

  @functools.cached_property
  def _by_name(self) -> Mapping[str, Any]:
    return types.MappingProxyType(dict(self.params))

  @functools.cached_property
  def _hash(self) -> int:
    return hash((self.provider, self.model, self.params))

  def __hash__(self) -> int:
    # Computed once: a binding keys usage counters, limits and caches on
    # every call, and hashing all its parameters each time costs microseconds.
    return self._hash

  def __reduce__(self):
    # Pickled as its fields (a Ray actor receives bindings), not its caches.
    return (ModelBinding, (self.provider, self.model, self.params))

  @property
  def options(self) -> dict[str, Any]:
    """Every parameter by name (a copy)."""
    return dict(self._by_name)

  def get(self, name: str) -> Any:
    try:
      return self._by_name[name]
    except KeyError:
      raise KeyError(f"binding {self} has no parameter {name!r}") from None

  def replace(self, **params) -> "ModelBinding":
    """A copy with some parameters changed (validated like `bind`)."""
    return bind(f"{self.provider}:{self.model}", **{**self.options, **params})

  def __str__(self) -> str:
    defaults = {**base.COMMON_PARAMS, **provider_of(self).params}
    changed = ", ".join(f"{k}={v!r}" for k, v in self.params if defaults.get(k) != v)
    return f"{self.provider}:{self.model}" + (f"({changed})" if changed else "")

  def __repr__(self) -> str:
    return f"ModelBinding({str(self)!r})"

  def usage(self) -> Usage:
    """This binding's usage in the current runtime: calls, errors, retries,
    cancelled, abandoned, tokens and seconds."""
    return current_runtime().usage.get(self)

  def concurrency(self) -> int:
    """Calls in flight at once (the binding's `concurrency`, or its provider's)."""
    return concurrency_of(self)

  def __call__(self, prompts: jax.typing.ArrayLike, *, key: jax.Array | None = None
               ) -> jax.Array:
    """Generates one answer per prompt.

    Args:
      prompts: uint8 text array `[..., max_len]` (see `xcs_jax.text.encode`);
        leading axes are a batch.
      key: optional JAX PRNG key (typed or raw uint32). It derives the
        sampling seed: the same key gives the same answer where the provider
        supports seeds, and keys from `jax.random.split` give independent
        samples. A key with the prompts' batch shape gives one seed per prompt.

    Returns:
      uint8 text array `[..., output_bytes]`.
    """
    text_lib.check_text_array(prompts, "prompts")
    prompts = jnp.asarray(prompts)
    batch_ndim = prompts.ndim - 1
    args, in_batched = [prompts], [batch_ndim > 0]
    if key is not None:
      key_data = _key_data(key)
      key_batch = key_data.shape[:-1]
      if key_batch == prompts.shape[:-1] and batch_ndim > 0:
        in_batched.append(True)
      elif key_batch == ():
        in_batched.append(False)
      else:
        raise ValueError(
            f"`key` must be one PRNG key or one per prompt (batch shape "
            f"{prompts.shape[:-1]}); got keys of batch shape {key_batch}. Use "
            "`jax.random.split(key, n)` to make one key per prompt.")
      args.append(key_data)
    (out,) = bind_host_call(generate_p, GenerateOp(self), args, batch_ndim=batch_ndim,
                            in_batched=in_batched, source=user_source())
    return out

  def score_options(self, prompts: jax.typing.ArrayLike, options: tuple[str, ...]
                    ) -> jax.Array:
    """Log-probability of each option as the model's whole reply to each prompt.

    Args:
      prompts: uint8 text array `[..., max_len]`; leading axes are a batch.
      options: a static tuple of K distinct, non-empty strings.

    Returns:
      float32 `[..., K]`: the sum of the option's token log-probabilities under
      the binding's chat template and system prompt; values are `<= 0`.
      No gradient flows into the text; float params used downstream get exact
      gradients. See docs/numeric.md.

    Raises:
      TypeError / ValueError: bad `options` or `prompts`.
      XCSExecutionError: the provider failed, cannot score, or returned values
        that are not log-probabilities (NaN, infinite, positive).
    """
    return numeric.score_options(self, prompts, options)

  def embed(self, texts: jax.typing.ArrayLike, *, normalize: bool = True) -> jax.Array:
    """An embedding of each text: float32 `[..., D]`, D from the provider.

    Args:
      texts: uint8 text array `[..., max_len]`; leading axes are a batch.
      normalize: L2-normalize each vector (default) or return it as is.

    Raises:
      NotImplementedError: the binding's model cannot embed (at trace time).
      XCSExecutionError: the provider failed or returned bad values.
    """
    return numeric.embed(self, texts, normalize=normalize)


def _key_data(key) -> jax.Array:
  key = checks.check_prng_key(key, "binding(prompts, key=...)")
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  return jnp.asarray(key)


def bind(spec: str, **params: Any) -> ModelBinding:
  """Binds a model: `bind("provider:model", **params)`.

  Args:
    spec: ``"provider:model"``, e.g. ``"local:smollm2"``, ``"openai:gpt-4o-mini"``,
      ``"anthropic:claude-3-5-haiku-latest"``, ``"fake:echo"``.
    **params: common parameters (`temperature`, `max_tokens`, `output_bytes`,
      `overflow`, `timeout_s`, `retries`, `concurrency`, `system_prompt`,
      `seed`) and the provider's own (see its docs).

  Returns:
    A hashable `ModelBinding`.

  Raises:
    TypeError: a parameter of the wrong kind (`timeout_s="10"`, `seed=1.5`).
    ValueError: malformed spec, unknown provider, unknown parameter, a value
      out of range (`timeout_s=float("inf")`: pass None for no timeout), or a
      provider-specific problem (such as a missing API key).
    ImportError: the provider's SDK is not installed (the message names the
      pip extra).

  Examples:
    >>> echo = bind("fake:echo", latency_s=0.0)
    >>> text.decode(echo(text.encode("hi", 16)))
    'hi'
  """
  checks.check_str(spec, "bind(spec, ...)")
  if ":" not in spec:
    checks.fail(ValueError, "bind(spec, ...)", "\"provider:model\" (e.g. \"local:smollm2\")",
                spec)
  provider_name, model = spec.split(":", 1)
  provider = current_runtime().provider(provider_name)
  known = {**base.COMMON_PARAMS, **provider.params}
  unknown = sorted(set(params) - set(known))
  if unknown:
    raise ValueError(
        f"unknown parameter(s) {', '.join(unknown)} for provider {provider_name!r} in "
        f"`bind({spec!r}, ...)`: expected some of {', '.join(sorted(known))}.")
  merged = {**known, **params}
  _check_common(spec, merged)
  provider.validate(model, merged)
  items = tuple(sorted(merged.items()))
  try:
    hash(items)
  except TypeError as e:
    raise ValueError(f"`bind({spec!r}, ...)` parameters must be hashable "
                     f"(use tuples, not lists): {e}") from e
  return ModelBinding(provider_name, model, items)


def _check_common(spec: str, p: dict[str, Any]) -> None:
  """Checks the common parameters in place, normalizing their values."""
  def arg(name):
    return f"bind({spec!r}, {name}=...)"

  p["output_bytes"] = checks.check_int(p["output_bytes"], arg("output_bytes"), min_value=1,
                                       max_value=checks.MAX_TEXT_BYTES,
                                       fix="It is the capacity of the answer's byte array.")
  p["max_tokens"] = checks.check_int(p["max_tokens"], arg("max_tokens"), min_value=1)
  checks.check_one_of(p["overflow"], arg("overflow"), ("error", "truncate"))
  p["timeout_s"] = checks.check_seconds(p["timeout_s"], arg("timeout_s"))
  p["deadline_s"] = checks.check_seconds(p["deadline_s"], arg("deadline_s"))
  p["retries"] = checks.check_int(p["retries"], arg("retries"), min_value=0, none_ok=True,
                                  fix="None retries transient errors until `deadline_s`.")
  checks.check_retries_end(p["retries"], p["deadline_s"], f"bind({spec!r})")
  for name in ("rpm", "tpm"):
    p[name] = checks.check_number(p[name], arg(name), min_value=0, min_open=True,
                                  none_ok=True, fix="It is a rate per minute to the endpoint.")
  checks.check_one_of(p["cache"], arg("cache"), ("auto", "memory", "disk", None))
  p["concurrency"] = checks.check_int(p["concurrency"], arg("concurrency"), min_value=1,
                                      none_ok=True)
  p["temperature"] = checks.check_number(p["temperature"], arg("temperature"), min_value=0)
  checks.check_str(p["system_prompt"], arg("system_prompt"), none_ok=True)
  p["seed"] = checks.check_seed(p["seed"], arg("seed"))
