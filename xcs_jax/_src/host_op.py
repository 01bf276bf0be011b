"""`host_op`: any Python host function as a JAX primitive."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import numpy as np

from xcs_jax._src import checks
from xcs_jax._src import grad as grad_lib
from xcs_jax._src.primitives import HostCallOp, bind_host_call, make_host_primitive
from xcs_jax._src.providers import retry
from xcs_jax._src.scope import Job
from xcs_jax._src.source import user_source

host_op_p = make_host_primitive("xcs_host_op")

DEFAULT_CONCURRENCY = 256

_X64_FIX = (
    "JAX runs with 32-bit types unless told otherwise, so the value would silently "
    "come back as {narrow}. Enable 64-bit types before tracing, "
    "`jax.config.update(\"jax_enable_x64\", True)`, or declare {narrow} in `out_spec`.")


@dataclasses.dataclass(frozen=True)
class _StaticSpec:
  """A pytree of ShapeDtypeStructs held hashably."""
  treedef: Any
  leaves: tuple

  def __call__(self, *unused_in_specs):
    return jax.tree_util.tree_unflatten(self.treedef, self.leaves)


def _as_spec_fn(out_spec, name: str) -> Callable:
  if callable(out_spec) and not isinstance(out_spec, jax.ShapeDtypeStruct):
    return out_spec
  leaves, treedef = jax.tree_util.tree_flatten(out_spec)
  bad = [l for l in leaves if not isinstance(l, jax.ShapeDtypeStruct)]
  if not leaves or bad:
    checks.fail(TypeError, f"host_op({name}, out_spec=...)",
                "a pytree of `jax.ShapeDtypeStruct` or a callable from the inputs' "
                "ShapeDtypeStructs to one", out_spec,
                "Write e.g. `out_spec=jax.ShapeDtypeStruct((), jnp.float32)`.")
  return _StaticSpec(treedef, tuple(leaves))


def _check_x64(name: str, specs) -> None:
  """64-bit outputs need `jax_enable_x64`: else JAX would narrow them silently."""
  if jax.config.jax_enable_x64:
    return
  for k, spec in enumerate(specs):
    dtype = np.dtype(spec.dtype)
    narrow = jax.dtypes.canonicalize_dtype(dtype)
    if narrow != dtype:
      raise ValueError(
          f"`host_op({name}, out_spec=...)` declares output {k} as {dtype}. "
          + _X64_FIX.format(narrow=np.dtype(narrow)))


def _cast_output(name: str, k: int, x: np.ndarray, dtype: np.dtype) -> np.ndarray:
  """`x` as `dtype`, or a ValueError naming a value `dtype` cannot hold
  (never a silent wrap-around, or an overflow to infinity)."""
  if x.dtype == dtype:
    return x
  with np.errstate(over="ignore", invalid="ignore"):
    cast = x.astype(dtype)
    if dtype.kind in "iu" and x.dtype.kind in "biu":
      info = np.iinfo(dtype)
      bad = (x < info.min) | (x > info.max)
      limits = f"[{info.min}, {info.max}]"
    elif dtype.kind in "fc":
      bad = np.isfinite(x) & ~np.isfinite(cast)
      limits = f"+-{np.finfo(dtype).max:g}"
    else:
      return cast
  if np.any(bad):
    where = np.unravel_index(int(np.argmax(bad)), x.shape)
    raise ValueError(
        f"host_op `{name}` returned {x[where].item()!r} in output {k}"
        + (f" at index {tuple(int(i) for i in where)}" if x.ndim else "")
        + f", which its `out_spec` dtype {dtype} cannot hold (range {limits}); it "
        f"would become {cast[where].item()!r}. Return values in range, or declare a "
        "wider dtype in `out_spec`.")
  return cast


@dataclasses.dataclass(frozen=True)
class HostFnOp(HostCallOp):
  """The primitive param of a `host_op` call site."""

  fn: Callable
  spec_fn: Callable
  in_treedef: Any
  vectorized: bool
  name: str
  concurrency: int
  timeout_s: float | None
  grad: grad_lib.Estimator | None = None
  retries: int = 0

  kind = "host_op"
  # Python cannot stop a running function: past its timeout the call fails
  # and the function is abandoned; its limit slot is free for the next call.
  hard_timeout = True
  release_on_abandon = True

  def describe(self) -> str:
    return self.name

  @property
  def streamable(self) -> bool:
    return not self.vectorized   # a vectorized function sees whole batches

  def no_gradient_message(self) -> str:
    if self.grad is None:
      return super().no_gradient_message()
    return (f"xcs_jax: host_op `{self.name}` has a first-order gradient estimator "
            f"(`grad={self.grad.name!r}`): it cannot be differentiated twice "
            "(jax.hessian, grad of grad). Differentiate once, or estimate the "
            "second derivative from first derivatives in your own code.")

  def limit(self, runtime):
    # Keyed by the function itself: two ops never share a limit by name, and
    # a key lives only while calls hold it (a lambda made per call leaks nothing).
    return (("host_op", self.fn, self.concurrency), self.concurrency)

  def call_timeout_s(self):
    return self.timeout_s

  def out_tree(self, in_avals):
    return _out_tree(self, tuple((tuple(a.shape), np.dtype(a.dtype)) for a in in_avals))

  def _compute_out_tree(self, signature):
    in_specs = jax.tree_util.tree_unflatten(
        self.in_treedef, [jax.ShapeDtypeStruct(s, d) for s, d in signature])
    out = self.spec_fn(*in_specs)
    leaves, treedef = jax.tree_util.tree_flatten(out)
    if not leaves or not all(isinstance(l, jax.ShapeDtypeStruct) for l in leaves):
      checks.fail(TypeError, f"host_op({self.name}, out_spec=...)(*input_specs)",
                  "a pytree of jax.ShapeDtypeStruct", out)
    return leaves, treedef

  def out_avals(self, in_avals):
    return self.out_tree(in_avals)[0]

  def _check_outputs(self, result, specs, treedef, batch: int | None):
    leaves, got_tree = jax.tree_util.tree_flatten(result)
    if got_tree != treedef:
      raise TypeError(f"{self.describe()} returned a {got_tree} but `out_spec` says "
                      f"{treedef}: return arrays in the structure of `out_spec`.")
    outs = []
    for k, (x, s) in enumerate(zip(leaves, specs)):
      x, dtype = np.asarray(x), np.dtype(s.dtype)
      want = s.shape if batch is None else (batch,) + tuple(s.shape)
      # Any integer fits any integer dtype if its values do (checked below).
      kind_ok = np.can_cast(x.dtype, dtype, "same_kind") or (
          x.dtype.kind in "biu" and dtype.kind in "iu")
      if x.shape != tuple(want) or not kind_ok:
        raise TypeError(
            f"{self.describe()} returned output {k} with shape {x.shape} and dtype "
            f"{x.dtype}; `out_spec` says shape {tuple(want)} and dtype "
            f"{dtype}. Fix the function or its `out_spec`.")
      outs.append(_cast_output(self.name, k, x, dtype))
    return outs

  def _attempts(self, ctx, call: Callable) -> Any:
    """`call()`, retried on `TransientError` up to `retries` times."""
    if not self.retries:
      return call()
    policy = retry.RetryPolicy(self.retries, None, retry.transient_only,
                               lambda e: getattr(e, "retry_after_s", None))
    return retry.attempts(call, policy, ctx)

  def call_example(self, runtime, ctx, inputs):
    ctx.check()
    specs, treedef = self.out_tree(inputs)
    args = jax.tree_util.tree_unflatten(self.in_treedef, list(inputs))
    return self._check_outputs(self._attempts(ctx, lambda: self.fn(*args)), specs,
                               treedef, None)

  def is_async(self, runtime):
    return runtime.remote is not None     # awaited on the driver's loop, run on Ray

  async def acall_example(self, runtime, ctx, inputs):
    ctx.check()
    specs, treedef = self.out_tree(inputs)
    args = jax.tree_util.tree_unflatten(self.in_treedef, list(inputs))
    out = await runtime.remote.run_function(self.fn, tuple(args), self.retries)
    return self._check_outputs(out, specs, treedef, None)

  def start_batch(self, scope, inputs, in_batched, n, source, on_done=None, priority=0.0):
    if not self.vectorized:
      return super().start_batch(scope, inputs, in_batched, n, source, on_done, priority)
    full = [x if b else np.broadcast_to(x, (n,) + x.shape)
            for x, b in zip(inputs, in_batched)]
    specs, treedef = self.out_tree([x[0] for x in full])
    args = jax.tree_util.tree_unflatten(self.in_treedef, full)

    remote = scope.runtime.remote
    if remote is None:
      def whole_batch(i, ctx):  # one call of `fn` on the whole batch
        ctx.check()
        return self._check_outputs(self._attempts(ctx, lambda: self.fn(*args)), specs,
                                   treedef, n)
    else:
      async def whole_batch(i, ctx):
        ctx.check()
        out = await remote.run_function(self.fn, tuple(args), self.retries)
        return self._check_outputs(out, specs, treedef, n)

    def wrap_error(error, i):
      return self.execution_error(error, source if not isinstance(source, tuple)
                                  else source[0])

    key, limit = self.limit(scope.runtime)
    return Job(scope, 1, whole_batch, limit_key=key, limit=limit, is_async=remote is not None,
               timeout_s=self.timeout_s, hard_timeout=True, release_on_abandon=True,
               wrap_error=wrap_error, on_done=on_done, op=self, source=source,
               priority=priority).start()

  def collect(self, job):
    if not self.vectorized:
      return super().collect(job)
    return job.results[0]


@functools.lru_cache(maxsize=4096)
def _out_tree(op: HostFnOp, signature: tuple):
  """`out_spec` evaluated once per op and input signature (not per example)."""
  return op._compute_out_tree(signature)


def host_op(fn: Callable | None = None, *, out_spec: Any, vectorized: bool = False,
            name: str | None = None, concurrency: int = DEFAULT_CONCURRENCY,
            timeout_s: float | None = None, grad: Any = None, retries: int = 0):
  """Makes a Python host function a JAX primitive.

  Args:
    fn: a function of numpy arrays (one example) returning arrays matching
      `out_spec`. Use as `host_op(fn, out_spec=...)` or as a decorator.
    out_spec: a pytree of `jax.ShapeDtypeStruct`, or a callable from the
      inputs' ShapeDtypeStructs (one example) to one. 64-bit dtypes need
      `jax.config.update("jax_enable_x64", True)` (else a ValueError at trace
      time, rather than values silently narrowed).
    vectorized: if True, under `vmap` `fn` is called once with the whole batch
      (every input and output gets a leading batch axis); otherwise once per
      example, concurrently on a pool of `concurrency` threads.
    name: a readable name for errors and `xcs_jax.explain` (default: fn's name).
    concurrency: calls of this op in flight at once.
    timeout_s: per-call timeout in seconds (None: none). Python cannot stop a
      running function: past the timeout the call raises `XCSTimeoutError`
      and the function finishes in the background.
    grad: how to differentiate through the op's float outputs (see
      `xcs_jax.grad` and docs/optimization.md): `'central'` (central
      differences), `'spsa'` (simultaneous perturbation), an estimator such as
      `xcs_jax.grad.spsa(n=32, seed=1)`, or a host VJP callable
      `vjp(primals, outputs, cotangents) -> tuple of input cotangents` on numpy
      arrays (called like `fn`: per example, or batched if `vectorized`).
      The extra evaluations run as one batched, concurrent host call. Default
      None: differentiating through the op raises `NoGradientError`.
    retries: extra attempts when `fn` raises `xcs_jax.extend.TransientError`
      (a flaky service behind it), after exponential backoff sleeps that
      count against `timeout_s`. Other exceptions are never retried.

  Returns:
    A function of JAX arrays (or pytrees of them) that works under `jax.jit`,
    `vmap`, `pmap` and `xcs_jax.jit`. Its outputs are checked against
    `out_spec` (structure, shape, dtype kind) and cast to its dtypes; a value
    the dtype cannot hold (2**40 for int32, 1e300 for float32) is an error,
    never a wrapped or infinite number.

  Examples:
    >>> @host_op(out_spec=jax.ShapeDtypeStruct((), jnp.float32))
    ... def norm(x):
    ...   return np.linalg.norm(x).astype(np.float32)
  """
  if fn is None:
    return functools.partial(host_op, out_spec=out_spec, vectorized=vectorized, name=name,
                             concurrency=concurrency, timeout_s=timeout_s, grad=grad,
                             retries=retries)
  checks.check_callable(fn, "host_op(fn, ...)", "a callable (the host function)")
  checks.check_str(name, "host_op(..., name=...)", none_ok=True, empty_ok=False)
  op_name = name or getattr(fn, "__name__", "host_fn")
  spec_fn = _as_spec_fn(out_spec, op_name)
  vectorized = checks.check_bool(vectorized, f"host_op({op_name}, vectorized=...)")
  concurrency = checks.check_int(concurrency, f"host_op({op_name}, concurrency=...)",
                                 min_value=1)
  timeout_s = checks.check_seconds(timeout_s, f"host_op({op_name}, timeout_s=...)")
  retries = checks.check_int(retries, f"host_op({op_name}, retries=...)", min_value=0)
  estimator = grad_lib.resolve(grad, op_name)

  def make_host_call(host_fn, host_spec, host_name):  # runs a user VJP
    return host_op(host_fn, out_spec=host_spec, vectorized=vectorized, name=host_name,
                   concurrency=concurrency, timeout_s=timeout_s)

  @functools.wraps(fn)
  def call(*args):
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(args)
    leaves = [checks.as_jax_array(x, f"{op_name}(args{jax.tree_util.keystr(path)})")
              for path, x in paths_leaves]
    op = HostFnOp(fn, spec_fn, treedef, vectorized, op_name, concurrency, timeout_s,
                  estimator, retries)
    out_avals, out_tree = op.out_tree(leaves)
    _check_x64(op_name, out_avals)
    source = user_source()

    def bind(xs, in_batched, batch_ndim):
      return bind_host_call(host_op_p, op, xs, batch_ndim=batch_ndim,
                            in_batched=in_batched, source=source)

    if estimator is None:
      outs = bind(leaves, [False] * len(leaves), 0)
    else:
      site = grad_lib.CallSite(op_name, bind, out_avals, make_host_call, treedef, out_tree)
      outs = grad_lib.differentiable_call(estimator, site, leaves)
    return jax.tree_util.tree_unflatten(out_tree, outs)

  call.host_fn = fn
  return call
