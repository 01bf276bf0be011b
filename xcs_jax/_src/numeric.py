"""Model outputs as numbers: option log-probabilities and embeddings.

Two host-call primitives beside text generation, with the same rules (abstract
eval, io_callback lowering, one concurrent batched host call under `vmap`,
pmap, and a JVP rule):

- `xcs_score_options`: for a prompt and a static tuple of K options, the total
  log-probability of each option as the model's whole reply, float32 `[K]`;
- `xcs_embed`: an embedding of a text, float32 `[D]`, with D known at trace
  time from `provider.embedding_dim(binding)`.

Their inputs are text (uint8), so their outputs carry zero tangents: gradients
do not flow into the text, but `jax.grad` flows exactly to float parameters
used downstream (a bias, a temperature, a linear head).

Provider values are checked before they reach JAX: a NaN, an infinity, a
positive log-probability, a wrong shape or a zero vector to normalize is an
error naming the provider, never a number passed on silently.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xcs_jax._src import checks
from xcs_jax._src import text as text_lib
from xcs_jax._src.binding_ops import BindingOp, provider_of, text_key
from xcs_jax._src.errors import ProviderValueError
from xcs_jax._src.primitives import bind_host_call, make_host_primitive
from xcs_jax._src.providers import base
from xcs_jax._src.providers.base import LOGPROB_ROUNDING_TOL
from xcs_jax._src.source import user_source

score_options_p = make_host_primitive("xcs_score_options")
embed_p = make_host_primitive("xcs_embed")


@dataclasses.dataclass(frozen=True)
class ScoreOptionsOp(BindingOp):
  """The `op` param of `xcs_score_options`: a binding and the K options."""

  options: tuple[str, ...]

  kind = "score_options"
  method = "score_options"

  def out_avals(self, in_avals):
    return [jax.ShapeDtypeStruct((len(self.options),), jnp.float32)]

  def request_args(self, inputs):
    return (text_lib.decode_one(inputs[0]), self.options)

  def cache_args(self, inputs):
    return (text_key(inputs[0]), self.options)

  def cache_args_rest(self, inputs, in_batched, n):
    return [(self.options,)] * n

  def outputs(self, value):
    return [check_log_probs(value, self.options, self.binding)]


@dataclasses.dataclass(frozen=True)
class EmbedOp(BindingOp):
  """The `op` param of `xcs_embed`: a binding and whether to L2-normalize."""

  normalize: bool = True

  kind = "embed"
  method = "embed"

  def out_avals(self, in_avals):
    return [jax.ShapeDtypeStruct((embedding_dim(self.binding),), jnp.float32)]

  def request_args(self, inputs):
    return (text_lib.decode_one(inputs[0]),)

  def cache_args(self, inputs):
    return (text_key(inputs[0]),)

  def outputs(self, value):
    return [check_embedding(value, embedding_dim(self.binding), self.normalize,
                            self.binding)]


def check_options(options: Any) -> tuple[str, ...]:
  """`options` if it is a tuple of distinct, non-empty, valid strings; else a
  clear error (an option holding NUL could never be the model's reply)."""
  return checks.check_str_tuple(
      options, "options", example="options=(\"positive\", \"negative\")", distinct=True,
      fix_kind=" (static: part of the call's description, like a shape)")


def check_log_probs(values: Any, options: tuple[str, ...],
                    binding) -> np.ndarray:
  """Provider log-probabilities as float32 `[K]`, or ProviderValueError."""
  who = f"provider `{binding.provider}` ({binding})"
  try:
    arr = np.asarray(values, dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise ProviderValueError(f"{who} returned option scores that are not numbers: "
                             f"{values!r}") from e
  if arr.shape != (len(options),):
    raise ProviderValueError(f"{who} returned option scores of shape {arr.shape} for "
                             f"{len(options)} options; expected ({len(options)},).")
  bad = ~np.isfinite(arr) | (arr > LOGPROB_ROUNDING_TOL)
  if bad.any():
    k = int(np.argmax(bad))
    raise ProviderValueError(
        f"{who} returned log-probability {float(arr[k])} for option {options[k]!r}: "
        "a log-probability must be finite and <= 0. This is a provider bug; the "
        "value is not passed on.")
  return np.minimum(arr, 0.0).astype(np.float32)


def check_embedding(values: Any, dim: int, normalize: bool,
                    binding) -> np.ndarray:
  """A provider embedding as float32 `[dim]` (unit norm if `normalize`)."""
  who = f"provider `{binding.provider}` ({binding})"
  try:
    arr = np.asarray(values, dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise ProviderValueError(f"{who} returned an embedding that is not numbers") from e
  if arr.shape != (dim,):
    raise ProviderValueError(f"{who} returned an embedding of shape {arr.shape}; its "
                             f"`embedding_dim` says ({dim},).")
  if not np.isfinite(arr).all():
    raise ProviderValueError(f"{who} returned an embedding with NaN or infinite values; "
                             "it is not passed on.")
  if normalize:
    norm = np.linalg.norm(arr)
    if norm == 0.0:
      raise ProviderValueError(f"{who} returned a zero embedding, which cannot be "
                               "L2-normalized; call `embed(..., normalize=False)` to "
                               "get it as is.")
    arr = arr / norm
  return arr.astype(np.float32)


def embedding_dim(binding) -> int:
  """D of `binding.embed`, from the provider, without calling the model."""
  provider = provider_of(binding)
  try:
    dim = provider.embedding_dim(binding)
  except NotImplementedError as e:
    raise NotImplementedError(
        f"`{binding}.embed(...)`: {e}. Bind a model that can embed (e.g. "
        "\"local:smollm2\", an OpenAI-compatible embeddings model, or \"fake:echo\").") from e
  if not isinstance(dim, (int, np.integer)) or isinstance(dim, bool) or dim <= 0:
    raise ProviderValueError(f"provider `{binding.provider}` gave `embedding_dim` "
                             f"{dim!r} for {binding}; expected a positive int.")
  return int(dim)


def check_can_score(binding) -> None:
  """A clear error at trace time if the provider has no `score_options` at all.

  (A provider that can score only on some endpoints raises its own error when
  called.)
  """
  provider = provider_of(binding)
  if type(provider).score_options is base.Provider.score_options:
    raise NotImplementedError(
        f"`{binding}.score_options(...)`: provider `{binding.provider}` cannot give "
        "log-probabilities of options. Use a provider that can (\"local:...\", an "
        "OpenAI-compatible endpoint serving logprobs, or \"fake:...\" in tests), or "
        "generate an answer and parse it.")


def _prepare_text(x: Any, what: str) -> tuple[jax.Array, int]:
  text_lib.check_text_array(x, what)
  x = jnp.asarray(x)
  return x, x.ndim - 1


def score_options(binding, prompts: jax.typing.ArrayLike,
                  options: tuple[str, ...]) -> jax.Array:
  """See `ModelBinding.score_options`."""
  options = check_options(options)
  prompts, batch_ndim = _prepare_text(prompts, "prompts")
  check_can_score(binding)
  (out,) = bind_host_call(score_options_p, ScoreOptionsOp(binding, options), [prompts],
                          batch_ndim=batch_ndim, in_batched=[batch_ndim > 0],
                          source=user_source())
  return out


def embed(binding, texts: jax.typing.ArrayLike, *,
          normalize: bool = True) -> jax.Array:
  """See `ModelBinding.embed`."""
  normalize = checks.check_bool(normalize, "embed(texts, normalize=...)")
  texts, batch_ndim = _prepare_text(texts, "texts")
  embedding_dim(binding)  # a clear error now if the model cannot embed
  (out,) = bind_host_call(embed_p, EmbedOp(binding, normalize), [texts],
                          batch_ndim=batch_ndim, in_batched=[batch_ndim > 0],
                          source=user_source())
  return out
