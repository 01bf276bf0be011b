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
import math
import threading
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from xcs_jax._src import compat
from xcs_jax._src.errors import (XCSCancelledError, XCSExecutionError,
                                 XCSError)
from xcs_jax._src.executor import CallContext, map_concurrent

HOST_PRIMITIVES: set = set()
"""Every primitive that calls the host; passes classify eqns by membership."""


class HostCallOp:
  """Static description of one kind of host call; the primitive's `op` param.

  Subclasses are frozen dataclasses (hashable, compared by value) and define
  `kind`, `out_avals`, `run_example`, `pool` and `describe`.
  """

  kind: str = "host_call"

  def out_avals(self, in_avals: Sequence[jax.ShapeDtypeStruct]
                ) -> Sequence[jax.ShapeDtypeStruct]:
    raise NotImplementedError

  def run_example(self, ctx: CallContext, *inputs: np.ndarray) -> Sequence[np.ndarray]:
    raise NotImplementedError

  def pool(self):
    raise NotImplementedError

  def describe(self) -> str:
    raise NotImplementedError

  def run_single(self, ctx: CallContext, inputs: Sequence[np.ndarray], source: str,
                 index: int | None = None) -> Sequence[np.ndarray]:
    """One call on one example, its failure wrapped in `XCSExecutionError`."""
    ctx.check()
    start = time.perf_counter()
    try:
      with self.pool().slots:  # the provider's concurrency limit
        return self.run_example(ctx, *inputs)
    except XCSCancelledError:
      raise
    except Exception as e:
      raise self.execution_error(e, source, index=index) from e
    finally:
      ctx.add_call_time(time.perf_counter() - start)

  def run_batch(self, ctx: CallContext, inputs: Sequence[np.ndarray],
                in_batched: Sequence[bool], n: int, source: str) -> list[np.ndarray]:
    """Runs `n` examples concurrently; batched inputs have a leading axis `n`."""
    def one(i):
      example = [x[i] if b else x for x, b in zip(inputs, in_batched)]
      if isinstance(source, tuple):  # call sites batched by xcs_jax.jit: their own lines
        return self.run_single(ctx, example, source[i])
      return self.run_single(ctx, example, source, index=i if n > 1 else None)
    results = map_concurrent(one, n, pool=self.pool(), ctx=ctx)
    return [np.stack([r[k] for r in results]) for k in range(len(results[0]))]

  def execution_error(self, error: BaseException, source: str,
                      index: int | None = None) -> XCSExecutionError:
    where = f" (batch item {index})" if index is not None else ""
    return XCSExecutionError(
        f"{self.kind} call to {self.describe()} failed{where}, called at "
        f"{source}: {type(error).__name__}: {error}",
        op=self.kind, binding=self.describe(), source=source)

  def no_gradient_message(self) -> str:
    return (f"xcs_jax: `{self.kind}` ({self.describe()}) has no gradient rule, "
            "so jax cannot differentiate through it. Keep the float parameters "
            "you differentiate in tensor code around the call, or give the op "
            "a rule with `xcs_jax.host_op(..., grad='central' | 'spsa' | vjp_fn)`.")


class NoGradientError(XCSError, TypeError):
  """Differentiating through a host call that has no gradient rule."""


def _batch_shape(shapes: Sequence[tuple], batch_ndim: int,
                 in_batched: Sequence[bool]) -> tuple:
  for shape, b in zip(shapes, in_batched):
    if b:
      return tuple(shape[:batch_ndim])
  return ()


def run_host_call(op: HostCallOp, batch_ndim: int, in_batched: tuple, source: str,
                  *args: Any, ctx: CallContext | None = None) -> list[np.ndarray]:
  """Runs a (possibly batched) host call on concrete arrays; numpy out.

  `ctx` lets a caller that runs many calls (the scheduler) cancel them all.
  """
  arrays = [np.asarray(a) for a in args]
  if batch_ndim == 0:  # one call: no batch to split and stack
    return [np.asarray(o) for o in op.run_single(ctx or CallContext(), arrays, source)]
  batch_shape = _batch_shape([a.shape for a in arrays], batch_ndim, in_batched)
  n = math.prod(batch_shape)
  flat = [a.reshape((n,) + a.shape[batch_ndim:]) if b else a
          for a, b in zip(arrays, in_batched)]
  outs = op.run_batch(ctx or CallContext(), flat, in_batched, n, source) if n else None
  if outs is None:  # an empty batch: nothing to call
    outs = [np.zeros((0,) + tuple(o.shape), o.dtype)
            for o in _example_out_avals(op, arrays, batch_ndim, in_batched)]
  return [o.reshape(batch_shape + o.shape[1:]) for o in outs]


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

  def host(*xs):
    return run_host_call(op, batch_ndim, in_batched, source, *xs)

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
