"""The host calls a model binding makes: the `BindingOp` base and `generate`.

`score_options` and `embed` (numeric.py) build on `BindingOp` too. Each op
reads its provider, limit and usage meter from the runtime that runs it.
"""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import dataclasses
import hashlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from xcs_jax._src import budget as budget_lib
from xcs_jax._src import text as text_lib
from xcs_jax._src import tracing
from xcs_jax._src.primitives import HostCallOp, make_host_primitive
from xcs_jax._src.providers import base
from xcs_jax._src.providers import retry
from xcs_jax._src.providers import cache as cache_lib
from xcs_jax._src.providers.cache import MISS
from xcs_jax._src.runtime import Runtime, current_runtime
from xcs_jax._src.scope import POLL_S

generate_p = make_host_primitive("xcs_generate")


def provider_of(binding, runtime: Runtime | None = None) -> base.Provider:
  """The provider instance serving `binding` in `runtime` (default: current);
  for a mesh (`xcs_jax.models.mesh`), its router there, which routes each
  attempt to one of its replicas."""
  runtime = runtime or current_runtime()
  router = getattr(binding, "router", None)
  return runtime.provider(binding.provider) if router is None else router(runtime)


def concurrency_of(binding, runtime: Runtime | None = None) -> int:
  c = binding.get("concurrency")
  return int(c) if c is not None else provider_of(binding, runtime).concurrency(binding)


class Prepared:
  """One example and its cache key, looked up before its job runs (`start_batch`)."""

  __slots__ = ("inputs", "key", "disk")

  def __init__(self, inputs, key: tuple | None, disk: bool):
    self.inputs, self.key, self.disk = inputs, key, disk


def text_key(row: np.ndarray) -> bytes:
  """A text row's bytes up to its end (the first NUL): what keys the cache."""
  return np.asarray(row).tobytes().split(b"\0", 1)[0]


def text_keys(rows: np.ndarray, n: int) -> list[bytes]:
  """`text_key` of each of `n` rows `[n, L]`, from one copy of their bytes."""
  rows = np.ascontiguousarray(rows)
  width = rows.shape[-1]
  raw = rows.tobytes()
  return [raw[i * width:(i + 1) * width].split(b"\0", 1)[0] for i in range(n)]


def reported_tokens(value: Any) -> tuple[int, int]:
  if isinstance(value, base.Completion):
    return value.prompt_tokens, value.completion_tokens
  return 0, 0


def _on_loop(future, loop) -> asyncio.Future:
  """An asyncio future set when `future` (concurrent) is; cancelling it leaves
  `future` alone (other callers may wait on it too)."""
  waiter = loop.create_future()

  def done(f):
    loop.call_soon_threadsafe(lambda: waiter.done() or waiter.set_result(f.result()))
  future.add_done_callback(done)
  return waiter


_NOTHING_RESERVED = (None, ())   # (estimated tokens, budget reservations)


@dataclasses.dataclass(frozen=True)
class BindingOp(HostCallOp):
  """A host call made through a model binding's provider.

  Subclasses name the provider `method` and define `request_args` (the
  method's inputs from one example), `outputs` (arrays from its result) and,
  where it depends on the call, `deterministic` (whether `cache="auto"`
  caches it).

  A call is answered from the runtime's response cache when its binding's
  `cache` allows it (see `cache_mode`); otherwise it goes to the provider
  with the retries and deadlines of `retry.py`.
  """

  binding: Any  # a ModelBinding

  method = ""

  def describe(self) -> str:
    return str(self.binding)

  def request_args(self, inputs: Sequence[np.ndarray]) -> tuple:
    raise NotImplementedError

  def cache_args(self, inputs: Sequence[np.ndarray]) -> tuple:
    """What tells one request of this op from another in the response cache
    (cheap: raw bytes, not decoded text)."""
    raise NotImplementedError

  def batch_cache_args(self, inputs: Sequence[np.ndarray], in_batched: Sequence[bool],
                       n: int) -> list[tuple]:
    """`cache_args` of every example of a batch. This default reads the text
    (the first input) row by row from one copy and adds `cache_args_rest`."""
    texts = (text_keys(inputs[0], n) if in_batched[0]
             else [text_key(inputs[0])] * n)
    rest = self.cache_args_rest(inputs, in_batched, n)
    return [(t,) + r for t, r in zip(texts, rest)]

  def cache_args_rest(self, inputs, in_batched, n) -> list[tuple]:
    """What keys a request besides its text, for each example."""
    return [()] * n

  def outputs(self, value: Any) -> list[np.ndarray]:
    raise NotImplementedError

  def deterministic(self, inputs: Sequence[np.ndarray]) -> bool:
    """Whether the answer is a function of the request (cached by `cache="auto"`)."""
    return True

  def estimate(self, args: tuple) -> tuple[int, int]:
    """(input tokens, output tokens) a request will use, before it is sent
    (for rate limits and budgets): text arguments at about 4 bytes a token."""
    words = [a for a in args if isinstance(a, str)]
    words += [o for a in args if isinstance(a, tuple) for o in a if isinstance(o, str)]
    system = self.binding.get("system_prompt") or ""
    return budget_lib.estimate_tokens(system + "".join(words)), 0

  def cache_mode(self, runtime: Runtime, inputs: Sequence[np.ndarray]) -> str | None:
    """"memory", "disk" or None for this call in `runtime`."""
    if not runtime.cache_enabled:
      return None
    mode = self.binding.get("cache")
    if mode == "auto":
      return "memory" if self.deterministic(inputs) else None
    return mode

  def limit(self, runtime):
    provider = provider_of(self.binding, runtime)
    limit = concurrency_of(self.binding, runtime)
    return (("provider", provider.limit_scope(self.binding), limit), limit)

  def call_timeout_s(self):
    t = self.binding.get("deadline_s")   # the whole call; `timeout_s` is per attempt
    return None if t is None else float(t)

  deadline_name = "deadline_s"

  def is_async(self, runtime):
    return base.is_async_method(self._method(runtime))

  def cache_namespace(self, runtime) -> str:
    """The part of every cache key of this op that names the model and the
    call (a digest: keys stay short, and hash fast)."""
    provider = provider_of(self.binding, runtime)
    return cache_lib.digest(provider.cache_identity(self.binding) + (self.method,))

  def prepared(self, runtime, namespace: str, inputs) -> Prepared:
    """One example with its cache key (None: not cached)."""
    if isinstance(inputs, Prepared):
      return inputs
    mode = self.cache_mode(runtime, inputs)
    key = None if mode is None else (namespace,) + self.cache_args(inputs)
    return Prepared(inputs, key, mode == "disk")

  def _method(self, runtime):
    """The provider method a call runs: here, or on a Ray actor (`executor="ray"`).
    A mesh's router runs here (its replicas' attempts may go to actors)."""
    provider = provider_of(self.binding, runtime)
    if runtime.remote is not None and not hasattr(provider, "requests"):
      return runtime.remote.provider_method(self.binding.provider, self.method)
    return getattr(provider, self.method)

  def requests(self, runtime, *, single_attempt: bool = False):
    """`request_for(args)`: the `retry.Request` that sends one call with `args`
    to the binding's provider, retried per the binding's `retries` (one
    attempt only with `single_attempt`: a mesh fails over instead), with
    budgets and the endpoint's rate limiter around each attempt. One request
    serves every call of a binding; a mesh's router makes one per call (each
    attempt goes to a replica, through that replica's requests)."""
    provider = provider_of(self.binding, runtime)
    routed = getattr(provider, "requests", None)
    if routed is not None:
      return routed(self, runtime)
    if runtime.remote is None:
      provider.prepare(self.binding)     # clients live in the actors otherwise
    binding = self.binding
    policy = retry.RetryPolicy(0 if single_attempt else binding.get("retries"),
                               binding.get("timeout_s"), provider.is_transient,
                               provider.retry_after)
    before, after = self._limits_and_budgets(runtime)
    request = retry.Request(self._method(runtime), binding, policy, runtime.usage,
                            before=before, after=after, tokens=reported_tokens)
    return lambda args: request

  def prepare(self, runtime):
    method = self._method(runtime)
    binding, usage = self.binding, runtime.usage
    namespace = self.cache_namespace(runtime)
    request_for = self.requests(runtime)
    cached = runtime.cache_enabled

    def hit(value, ctx):
      usage.add(binding, cache_hits=1)
      if ctx.facts is not None:
        ctx.facts["cache_hit"] = True
      return self.outputs(value)

    if base.is_async_method(method):
      async def acall(ctx, inputs):
        p = self.prepared(runtime, namespace, inputs) if cached else None
        if p is None or p.key is None:
          args = self.request_args(inputs)
          return self.outputs(await retry.arun(request_for(args), args, ctx))
        cache = runtime.response_cache
        while True:
          value = cache.lookup(p.key, p.disk)
          if value is not MISS:
            return hit(value, ctx)
          flight = cache.begin(p.key)
          if flight is None:
            break
          value = await _on_loop(flight, asyncio.get_running_loop())
          if value is not None:
            return hit(value, ctx)
        try:
          args = self.request_args(p.inputs)
          value = await retry.arun(request_for(args), args, ctx)
          outputs = self.outputs(value)     # only checked values are kept
        except BaseException:
          cache.end(p.key)
          raise
        cache.store(p.key, value, p.disk)
        cache.end(p.key, value)
        return outputs
      return acall

    def call(ctx, inputs):
      p = self.prepared(runtime, namespace, inputs) if cached else None
      if p is None or p.key is None:
        args = self.request_args(inputs)
        return self.outputs(retry.run(request_for(args), args, ctx))
      cache = runtime.response_cache
      while True:
        value = cache.lookup(p.key, p.disk)
        if value is not MISS:
          return hit(value, ctx)
        flight = cache.begin(p.key)
        if flight is None:
          break
        while not flight.done():   # wait for the identical request in flight
          ctx.check_deadline()
          cf.wait([flight], timeout=ctx_poll_s(ctx))
        if flight.result() is not None:
          return hit(flight.result(), ctx)
      try:
        args = self.request_args(p.inputs)
        value = retry.run(request_for(args), args, ctx)
        outputs = self.outputs(value)       # only checked values are kept
      except BaseException:
        cache.end(p.key)
        raise
      cache.store(p.key, value, p.disk)
      cache.end(p.key, value)
      return outputs
    return call

  def _limits_and_budgets(self, runtime):
    """The hooks around each attempt: budgets (the runtime's and the run's
    `xcs_jax.budget` blocks) and the endpoint's rate limiter."""
    binding = self.binding
    key, concurrency = self.limit(runtime)
    limiter = runtime.limiter(provider_of(binding, runtime).limit_scope(binding))
    limiter.configure(binding.get("rpm"), binding.get("tpm"), key, concurrency)
    usage = runtime.usage

    def before(args, ctx):
      scoped = ctx.scope.budgets if ctx.scope is not None else ()
      if not scoped and runtime.budget is None and not limiter.active:
        return _NOTHING_RESERVED, 0.0    # no estimate needed (the common case)
      budgets = scoped + ((runtime.budget,) if runtime.budget is not None else ())
      tokens_in, tokens_out = self.estimate(args)
      reservations = []
      try:
        for b in budgets:
          reservations.append((b, b.reserve(binding, tokens_in, tokens_out)))
      except BaseException:
        for b, r in reservations:
          b.settle(binding, r, 0, 0)
        raise
      wait = limiter.reserve(1, tokens_in + tokens_out) if limiter.active else 0.0
      if wait > 0:
        usage.add(binding, waited_s=wait)
      return (tokens_in + tokens_out, reservations), wait

    def after(token, result, error, actx):
      estimated, reservations = token
      if estimated is not None:
        used = reported_tokens(result) if error is None else (0, 0)
        known = error is not None or isinstance(result, base.Completion)
        for b, r in reservations:
          if known:
            b.settle(binding, r, *used)
        limiter.settle(estimated, sum(used) if known else None)
      limiter.observe(error, actx.headers)
    return before, after

  def start_batch(self, scope, inputs, in_batched, n, source, on_done=None, priority=0.0):
    """Answers what the response cache holds at once, and starts a job for the
    rest: hits never reach the provider, misses go out as one batch."""
    runtime = scope.runtime
    def example(i):
      return [x[i] if b else x for x, b in zip(inputs, in_batched)]

    mode = self.cache_mode(runtime, example(0)) if n else None
    if mode is None or tracing.listening():
      # (While a trace records, hits run as items too: each shows as a call.)
      return self.make_job(scope, n, example, source, on_done=on_done,
                           priority=priority).start()
    namespace = self.cache_namespace(runtime)
    disk = mode == "disk"
    keys = [(namespace,) + a for a in self.batch_cache_args(inputs, in_batched, n)]
    job = self.make_job(scope, n, lambda i: Prepared(example(i), keys[i], disk), source,
                        on_done=on_done, priority=priority)
    cache = runtime.response_cache
    hits = cache.lookup_many(keys, disk)
    job.start(fed=False)
    if hits:
      runtime.usage.add(self.binding, cache_hits=len(hits))
      answered, failure = cache.outputs_many(self, [(i, keys[i], v) for i, v in hits.items()])
      if failure is not None:  # e.g. an answer longer than this binding's output_bytes
        job.fail_item(*failure)  # fails as the call would have
        return job
      job.resolve_many(answered)
    job.feed([i for i in range(n) if i not in hits])
    return job

  def call_example(self, runtime, ctx, inputs):
    return self.prepare(runtime)(ctx, inputs)

  async def acall_example(self, runtime, ctx, inputs):
    return await self.prepare(runtime)(ctx, inputs)

  def record_abandoned(self, runtime, n):
    runtime.usage.add(self.binding, abandoned=n)

  def record_dropped(self, runtime, n):
    runtime.usage.add(self.binding, cancelled=n)


def ctx_poll_s(ctx) -> float:
  left = ctx.remaining()
  return POLL_S if left is None else max(0.0, min(POLL_S, left))


def seed_from_key(key_data: np.ndarray | None, default: int) -> int:
  """A 31-bit seed derived from PRNG key data (or `default` without a key)."""
  if key_data is None:
    return int(default)
  digest = hashlib.blake2b(np.ascontiguousarray(key_data).tobytes(), digest_size=4)
  return int.from_bytes(digest.digest(), "little") & 0x7FFFFFFF


def encode_answer(answer: str, binding) -> np.ndarray:
  """The model's answer as a row of the binding's `output_bytes` (NULs
  dropped; cut at a character boundary with `overflow='truncate'`)."""
  p = binding._by_name     # read-only, no copy: this runs once per call
  capacity, truncate = p["output_bytes"], p["overflow"] == "truncate"
  if isinstance(answer, str):
    if "\x00" in answer:
      answer = answer.replace("\x00", "")
    try:
      data = answer.encode("utf-8")
    except UnicodeEncodeError:
      data = None     # encode_one names the character
    if data is not None and len(data) <= capacity:
      return np.frombuffer(data.ljust(capacity, b"\x00"), np.uint8)
    if data is not None and not truncate:
      raise ValueError(
          f"the model's answer is {len(data)} UTF-8 bytes, more than the "
          f"binding's `output_bytes={capacity}`: bind with a larger `output_bytes`, "
          "or with `overflow='truncate'` to cut answers at a character boundary.")
  return text_lib.encode_one(answer, capacity, truncate=truncate, what="the model's answer")


@dataclasses.dataclass(frozen=True)
class GenerateOp(BindingOp):
  kind = "generate"
  method = "generate"

  def deterministic(self, inputs):
    # Greedy decoding, or sampling with a PRNG key the caller passed: the same
    # request gives the same answer. Sampling without a key is not cached.
    return float(self.binding.get("temperature")) == 0.0 or len(inputs) > 1

  def estimate(self, args):
    tokens_in, _ = super().estimate(args[:1])    # the prompt (not the seed)
    return tokens_in, int(self.binding.get("max_tokens"))

  def out_avals(self, in_avals):
    return [jax.ShapeDtypeStruct((int(self.binding.get("output_bytes")),), jnp.uint8)]

  def request_args(self, inputs):
    prompt, key_data = inputs[0], (inputs[1] if len(inputs) > 1 else None)
    return (text_lib.decode_one(prompt), seed_from_key(key_data, self.binding.get("seed")))

  def cache_args(self, inputs):
    key_data = inputs[1] if len(inputs) > 1 else None
    return (text_key(inputs[0]), seed_from_key(key_data, self.binding.get("seed")))

  def cache_args_rest(self, inputs, in_batched, n):
    seed = self.binding.get("seed")
    if len(inputs) < 2:
      return [(seed,)] * n
    if not in_batched[1]:
      return [(seed_from_key(inputs[1], seed),)] * n
    return [(seed_from_key(inputs[1][i], seed),) for i in range(n)]

  def outputs(self, value):
    return [encode_answer(value.text, self.binding)]

  def collect(self, job):
    # Every answer is a row of `output_bytes` uint8: one join, not a stack of
    # n arrays (a fifth of the time at n = 1,000).
    rows = b"".join([r[0].tobytes() for r in job.results])
    return [np.frombuffer(bytearray(rows), np.uint8).reshape(job.n, -1)]
