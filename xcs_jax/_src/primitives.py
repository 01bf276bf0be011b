"""Host calls as JAX primitives.

Every model call and host op binds one of the primitives made here. Each has:
- impl: eager execution on the host (numpy in, numpy out);
- abstract eval: output shapes and dtypes from the op's static description,
  without calling the host;
- lowering: an unordered `io_callback`, so the call runs inside
  `jax.jit`-compiled programs and under `jax.pmap`;
- batching: `vmap` moves the batch axis to the front and binds once, so a
  whole batch is ONE host call, which fans out concurrently on the
  provider's bounded pool (nested vmap adds leading batch axes; operands that
  are not batched are passed once, not copied per example);
- JVP: integer (text) outputs get zero tangents; a float output whose inputs
  carry a tangent raises an error that names the op and how to give it a
  gradient.

Model calls are treated as functions of their inputs, like
`jax.pure_callback`: a call whose outputs are unused is removed by dead-code
elimination and never made.

The primitive's params are the op (a frozen, hashable dataclass describing the
call), `batch_ndim` (leading batch axes), `in_batched` (which operands carry
them) and `source` (the user's line), so a pass over a jaxpr finds every call
site, its binding and its line.
"""
from __future__ import annotations

import contextlib
import functools
import math
import threading
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from xcs_jax._src import callback_errors
from xcs_jax._src import compat
from xcs_jax._src import progress
from xcs_jax._src.errors import NoGradientError, XCSError, XCSExecutionError, XCSTimeoutError
from xcs_jax._src.runtime import Runtime, TraceRuntime, current_runtime
from xcs_jax._src.scope import CallContext, Job, Scope, wait_for_job

HOST_PRIMITIVES: set = set()
"""Every primitive that calls the host; passes classify eqns by membership."""


class HostCallOp:
  """Static description of one kind of host call; the primitive's `op` param.

  Subclasses are frozen dataclasses (hashable, compared by value) and define
  `kind`, `out_avals`, `describe` and `call_example` (or `acall_example` with
  `is_async`), and may set the limit, timeout and usage hooks below.
  """

  kind: str = "host_call"
  deadline_name: str = "timeout_s"  # the parameter `call_timeout_s` comes from
  hard_timeout: bool = False        # calls cannot stop themselves at their deadline
  release_on_abandon: bool = False  # an abandoned call frees its limit slot at once

  def out_avals(self, in_avals: Sequence[jax.ShapeDtypeStruct]
                ) -> Sequence[jax.ShapeDtypeStruct]:
    raise NotImplementedError

  def describe(self) -> str:
    raise NotImplementedError

  def call_example(self, runtime: Runtime, ctx: CallContext,
                   inputs: Sequence[np.ndarray]) -> Sequence[np.ndarray]:
    """One call on one example (sync); numpy in, numpy out."""
    raise NotImplementedError

  async def acall_example(self, runtime: Runtime, ctx: CallContext,
                          inputs: Sequence[np.ndarray]) -> Sequence[np.ndarray]:
    """One call on one example, for ops whose `is_async(runtime)` is True."""
    raise NotImplementedError

  def is_async(self, runtime: Runtime) -> bool:
    return False

  def prepare(self, runtime: Runtime) -> Callable:
    """`call(ctx, inputs)` for every example of one batch: what `call_example`
    (or `acall_example`) looks up once per batch rather than once per call."""
    if self.is_async(runtime):
      return functools.partial(self.acall_example, runtime)
    return functools.partial(self.call_example, runtime)

  def limit(self, runtime: Runtime) -> tuple[Any, int] | None:
    """(key, limit): the concurrency limit this op's calls hold, or None."""
    return None

  def call_timeout_s(self) -> float | None:
    """Each call's timeout, counted from when it starts."""
    return None

  def record_abandoned(self, runtime: Runtime, n: int) -> None:
    """Usage hook: `n` running calls were abandoned."""

  def record_dropped(self, runtime: Runtime, n: int) -> None:
    """Usage hook: `n` queued calls never started (their run failed first)."""

  def start_batch(self, scope: Scope, inputs: Sequence[np.ndarray],
                  in_batched: Sequence[bool], n: int, source: Any,
                  on_done: Callable[[Job], None] | None = None,
                  priority: float = 0.0) -> Job:
    """Starts `n` examples in `scope`; batched inputs have a leading axis `n`.

    `source` is the user's line, or a tuple of lines (one per example) for
    call sites that `xcs_jax.jit` batched together; `priority` orders its
    calls among others waiting for the same limit (see `scope.Job`).
    """
    def example(i):
      return [x[i] if b else x for x, b in zip(inputs, in_batched)]
    return self.make_job(scope, n, example, source, on_done=on_done,
                         priority=priority).start()

  streamable = True
  """Its examples can run one by one as their inputs arrive (`make_job`)."""

  def make_job(self, scope: Scope, n: int, example: Callable[[int], list], source: Any, *,
               on_done: Callable[[Job], None] | None = None,
               on_item: Callable[[int, Any], None] | None = None,
               priority: float = 0.0) -> Job:
    """A job of `n` examples, not started; `example(i)` gives example i's inputs
    when it runs (a stream feeds examples as their inputs become ready)."""
    runtime = scope.runtime
    is_async = self.is_async(runtime)
    call = self.prepare(runtime)

    def item(i, ctx):   # async: the call's coroutine, for the lane to await
      return call(ctx, example(i))

    def wrap_error(error, i):
      if isinstance(source, tuple):
        return self.execution_error(error, source[i])
      return self.execution_error(error, source, index=i if n > 1 else None)

    key_limit = self.limit(runtime)
    key, limit = key_limit if key_limit is not None else (None, None)
    return Job(scope, n, item, limit_key=key, limit=limit, timeout_s=self.call_timeout_s(),
               hard_timeout=self.hard_timeout, release_on_abandon=self.release_on_abandon,
               is_async=is_async, wrap_error=wrap_error, on_done=on_done, on_item=on_item,
               op=self, source=source, priority=priority, deadline_name=self.deadline_name,
               eager_lanes=runtime.remote is not None)

  def collect(self, job: Job) -> list[np.ndarray]:
    """The outputs of a finished batch, each with a leading axis `n`."""
    results = job.results
    return [np.stack([np.asarray(r[k]) for r in results]) for k in range(len(results[0]))]

  def execution_error(self, error: BaseException, source: str,
                      index: int | None = None) -> XCSExecutionError:
    """The error the user sees for `error` in this call: an `XCSExecutionError`
    (an `XCSTimeoutError` for a timeout) naming the call, `error` its cause."""
    where = f" (batch item {index})" if index is not None else ""
    kind = XCSTimeoutError if isinstance(error, XCSTimeoutError) else XCSExecutionError
    e = kind(f"{self.kind} call to {self.describe()} failed{where}, called at "
             f"{source}: {type(error).__name__}: {error}",
             op=self.kind, binding=self.describe(), source=source, index=index)
    e.__cause__ = error
    return e

  def no_gradient_message(self) -> str:
    return (f"xcs_jax: `{self.kind}` ({self.describe()}) has no gradient rule, "
            "so jax cannot differentiate through it. Keep the float parameters "
            "you differentiate in tensor code around the call, or give the op "
            "a rule with `xcs_jax.host_op(..., grad='central' | 'spsa' | vjp_fn)`.")


def _batch_shape(shapes: Sequence[tuple], batch_ndim: int,
                 in_batched: Sequence[bool]) -> tuple:
  for shape, b in zip(shapes, in_batched):
    if b:
      return tuple(shape[:batch_ndim])
  return ()


class HostCall:
  """One (possibly batched) host call on concrete arrays, ready to start."""

  __slots__ = ("op", "batch_shape", "n", "flat", "in_batched", "source", "arrays",
               "batch_ndim")

  def __init__(self, op: HostCallOp, batch_ndim: int, in_batched: tuple, source: Any,
               args: Sequence[Any]):
    self.op, self.in_batched, self.source, self.batch_ndim = op, in_batched, source, batch_ndim
    self.arrays = [np.asarray(a) for a in args]
    self.batch_shape = _batch_shape([a.shape for a in self.arrays], batch_ndim, in_batched)
    self.n = math.prod(self.batch_shape)
    if batch_ndim == 0:  # one call: a batch of one, unbatched inputs as they are
      self.flat, self.in_batched = self.arrays, tuple(False for _ in self.arrays)
    else:
      self.flat = [a.reshape((self.n,) + a.shape[batch_ndim:]) if b else a
                   for a, b in zip(self.arrays, in_batched)]

  def start(self, scope: Scope, on_done: Callable[[Job], None] | None = None,
            priority: float = 0.0) -> Job:
    return self.op.start_batch(scope, self.flat, self.in_batched, self.n, self.source,
                               on_done, priority)

  def outputs(self, job: Job) -> list[np.ndarray]:
    if self.n == 0:  # an empty batch: nothing was called
      return [np.zeros(self.batch_shape + tuple(o.shape), o.dtype) for o in
              _example_out_avals(self.op, self.arrays, self.batch_ndim, self.in_batched)]
    outs = self.op.collect(job)
    return [o.reshape(self.batch_shape + o.shape[1:]) for o in outs]


def run_host_call(op: HostCallOp, batch_ndim: int, in_batched: tuple, source: Any,
                  *args: Any, runtime: Runtime | None = None) -> list[np.ndarray]:
  """Runs a (possibly batched) host call on concrete arrays and waits; numpy out.

  The call runs in a scope of its own on `runtime` (default: the current one).
  """
  call = HostCall(op, batch_ndim, in_batched, source, args)
  scope = Scope(runtime or current_runtime())
  job = call.start(scope)
  with progress.shown(scope, lambda: f"{op.kind} {op.describe()}", call.n):
    wait_for_job(job)
  return call.outputs(job)


def _example_out_avals(op, avals, batch_ndim, in_batched):
  example = [jax.ShapeDtypeStruct(a.shape[batch_ndim:] if b else a.shape, a.dtype)
             for a, b in zip(avals, in_batched)]
  return op.out_avals(example)


def _abstract_eval(*avals, op, batch_ndim, in_batched, source):
  del source
  batch_shape = _batch_shape([a.shape for a in avals], batch_ndim, in_batched)
  return [compat.ShapedArray(batch_shape + tuple(o.shape), o.dtype)
          for o in _example_out_avals(op, avals, batch_ndim, in_batched)]


def _impl(*args, op, batch_ndim, in_batched, source):
  outs = run_host_call(op, batch_ndim, in_batched, source, *args)
  return [jnp.asarray(o) for o in outs]


def _lowering(ctx, *args, op, batch_ndim, in_batched, source):
  result_shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in ctx.avals_out]
  runtime = TraceRuntime()  # XLA's threads do not see the caller's context

  def host(*xs):
    try:
      return run_host_call(op, batch_ndim, in_batched, source, *xs, runtime=runtime.get())
    except XCSError as e:  # XLA keeps only text: make it lead with the message
      raise callback_errors.for_xla(e, source if isinstance(source, str) else source[0])

  def via_callback(*xs):
    return jax.experimental.io_callback(host, result_shapes, *xs, ordered=False)

  return compat.lower_fun(via_callback, multiple_results=True)(ctx, *args)


def _make_batching_rule(prim):
  def rule(args, dims, *, op, batch_ndim, in_batched, source):
    size = next(x.shape[d] for x, d in zip(args, dims) if d is not compat.not_mapped)
    # The batch shape the operands had before this vmap level.
    old_shape = ()
    for x, d, b in zip(args, dims, in_batched):
      if b:
        shape = list(x.shape)
        if d is not compat.not_mapped:
          del shape[d]
        old_shape = tuple(shape[:batch_ndim])
        break
    new_args, new_batched = [], []
    for x, d, b in zip(args, dims, in_batched):
      if d is compat.not_mapped:
        if b:  # batched before, not at this level: give it the new axis
          x = jnp.broadcast_to(x[None], (size,) + x.shape)
        new_args.append(x)
        new_batched.append(b)
        continue
      x = jnp.moveaxis(x, d, 0)
      if not b and batch_ndim:  # batched only at this level: add the old axes
        x = jnp.broadcast_to(x[(slice(None),) + (None,) * batch_ndim],
                             (size,) + old_shape + x.shape[1:])
      new_args.append(x)
      new_batched.append(True)
    outs = prim.bind(*new_args, op=op, batch_ndim=batch_ndim + 1,
                     in_batched=tuple(new_batched), source=source)
    return outs, [0] * len(outs)
  return rule


def _make_jvp_rule(prim):
  def jvp(primals, tangents, *, op, batch_ndim, in_batched, source):
    outs = prim.bind(*primals, op=op, batch_ndim=batch_ndim,
                     in_batched=in_batched, source=source)
    tangent_flows = any(not compat.is_symbolic_zero(t) and
                        jnp.issubdtype(p.dtype, jnp.inexact)
                        for p, t in zip(primals, tangents))
    if tangent_flows and any(jnp.issubdtype(o.dtype, jnp.inexact) for o in outs):
      raise NoGradientError(op.no_gradient_message() + f" Called at {source}.")
    return outs, [compat.symbolic_zero(compat.get_aval(o)) for o in outs]
  return jvp


def make_host_primitive(name: str):
  """A new host-call primitive named `name`, with all its rules registered."""
  prim = compat.Primitive(name)
  prim.multiple_results = True
  prim.def_impl(_impl)
  prim.def_abstract_eval(_abstract_eval)
  compat.register_lowering(prim, _lowering)
  compat.primitive_batchers[prim] = _make_batching_rule(prim)
  compat.primitive_jvps[prim] = _make_jvp_rule(prim)
  HOST_PRIMITIVES.add(prim)
  return prim


_watchers = threading.local()


@contextlib.contextmanager
def watch_host_calls():
  """Counts the host calls bound on this thread inside the block.

  Yields a one-element list holding the count (nested watches all count).
  """
  counter = [0]
  stack = getattr(_watchers, "stack", None)
  if stack is None:
    stack = _watchers.stack = []
  stack.append(counter)
  try:
    yield counter
  finally:
    stack.remove(counter)


def bind_host_call(prim, op: HostCallOp, args: Sequence[Any], *, batch_ndim: int,
                   in_batched: Sequence[bool], source: str) -> list:
  """Binds `prim` on `args`: the one entry point used by every call site."""
  for counter in getattr(_watchers, "stack", ()):
    counter[0] += 1
  return prim.bind(*args, op=op, batch_ndim=int(batch_ndim),
                   in_batched=tuple(bool(b) for b in in_batched), source=source)


def is_host_call(eqn) -> bool:
  return eqn.primitive in HOST_PRIMITIVES
