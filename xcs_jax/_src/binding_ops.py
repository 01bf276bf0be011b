"""The host calls a model binding makes: the `BindingOp` base and `generate`.

`score_options` and `embed` (numeric.py) build on `BindingOp` too. Each op
reads its provider, limit and usage meter from the runtime that runs it.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from xcs_jax._src import text as text_lib
from xcs_jax._src.primitives import HostCallOp, make_host_primitive
from xcs_jax._src.providers import base
from xcs_jax._src.runtime import Runtime, current_runtime

generate_p = make_host_primitive("xcs_generate")


def provider_of(binding, runtime: Runtime | None = None) -> base.Provider:
  """The provider instance serving `binding` in `runtime` (default: current)."""
  return (runtime or current_runtime()).provider(binding.provider)


def concurrency_of(binding, runtime: Runtime | None = None) -> int:
  c = binding.get("concurrency")
  return int(c) if c is not None else provider_of(binding, runtime).concurrency(binding)


@dataclasses.dataclass(frozen=True)
class BindingOp(HostCallOp):
  """A host call made through a model binding's provider.

  Subclasses name the provider `method` and define `request_args` (the
  method's inputs from one example) and `outputs` (arrays from its result).
  """

  binding: Any  # a ModelBinding

  method = ""

  def describe(self) -> str:
    return str(self.binding)

  def request_args(self, inputs: Sequence[np.ndarray]) -> tuple:
    raise NotImplementedError

  def outputs(self, value: Any) -> list[np.ndarray]:
    raise NotImplementedError

  def limit(self, runtime):
    provider = provider_of(self.binding, runtime)
    limit = concurrency_of(self.binding, runtime)
    return (("provider", provider.limit_scope(self.binding), limit), limit)

  def call_timeout_s(self):
    t = self.binding.get("timeout_s")
    return None if t is None else float(t)

  def is_async(self, runtime):
    return base.is_async_method(getattr(provider_of(self.binding, runtime), self.method))

  def prepare(self, runtime):
    provider = provider_of(self.binding, runtime)
    provider.prepare(self.binding)
    method = getattr(provider, self.method)
    backoff = base.Backoff(int(self.binding.get("retries")), provider.is_transient)
    usage, binding = runtime.usage, self.binding

    if base.is_async_method(method):
      async def acall(ctx, inputs):
        value = await base.acall_provider(usage, binding, backoff, method,
                                          self.request_args(inputs), ctx)
        return self.outputs(value)
      return acall

    def call(ctx, inputs):
      value = base.call_provider(usage, binding, backoff, method, self.request_args(inputs),
                                 ctx)
      return self.outputs(value)
    return call

  def call_example(self, runtime, ctx, inputs):
    return self.prepare(runtime)(ctx, inputs)

  async def acall_example(self, runtime, ctx, inputs):
    return await self.prepare(runtime)(ctx, inputs)

  def record_abandoned(self, runtime, n):
    runtime.usage.add(self.binding, abandoned=n)

  def record_dropped(self, runtime, n):
    runtime.usage.add(self.binding, cancelled=n)


def seed_from_key(key_data: np.ndarray | None, default: int) -> int:
  """A 31-bit seed derived from PRNG key data (or `default` without a key)."""
  if key_data is None:
    return int(default)
  digest = hashlib.blake2b(np.ascontiguousarray(key_data).tobytes(), digest_size=4)
  return int.from_bytes(digest.digest(), "little") & 0x7FFFFFFF


def encode_answer(answer: str, binding) -> np.ndarray:
  capacity = int(binding.get("output_bytes"))
  truncate = binding.get("overflow") == "truncate"
  try:
    return text_lib.encode_one(answer.replace("\x00", ""), capacity, truncate=truncate,
                               what="answer")
  except ValueError as e:
    raise ValueError(
        f"the model's answer is {len(answer.encode())} UTF-8 bytes, more than the "
        f"binding's `output_bytes={capacity}`: bind with a larger `output_bytes`, "
        "or with `overflow='truncate'` to cut answers at a character boundary.") from e


@dataclasses.dataclass(frozen=True)
class GenerateOp(BindingOp):
  kind = "generate"
  method = "generate"

  def out_avals(self, in_avals):
    return [jax.ShapeDtypeStruct((int(self.binding.get("output_bytes")),), jnp.uint8)]

  def request_args(self, inputs):
    prompt, key_data = inputs[0], (inputs[1] if len(inputs) > 1 else None)
    return (text_lib.decode_one(prompt), seed_from_key(key_data, self.binding.get("seed")))

  def outputs(self, value):
    return [encode_answer(value.text, self.binding)]
