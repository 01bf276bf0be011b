"""Sibling call sites of one op that start together run as one batched call.

`batch_sibling_calls` is an execution detail: every call is still made on
its own, concurrently, with its own source line in errors; analysis and
explain still show each call site; under `max_concurrency` it is not applied.
"""
from __future__ import annotations

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xcs_jax
from xcs_jax._src.jit.classify import Kind

from jit_helpers import Recorder

N = 12


def _siblings(op):
  def f(xs):
    return jnp.stack([op(xs[i]) for i in range(N)])
  return f


def _host_steps(jf, *args):
  plan = jf.trace(*args)
  return [s for s in plan.steps.values() if s.kind is Kind.HOST]


def _batch_sizes(jf, *args):
  """Examples per host step of the plan (1 for a call site run on its own)."""
  sizes = []
  for s in _host_steps(jf, *args):
    p = s.eqn.params
    sizes.append(len(p["source"]) if isinstance(p["source"], tuple) else 1)
  return sorted(sizes)


def test_siblings_of_one_op_become_one_batched_call_and_run_concurrently():
  rec = Recorder(parties=N)  # every call waits until all N are in flight
  op = rec.op("sib", fn=lambda x: 2 * x)
  f = _siblings(op)
  jf = xcs_jax.jit(f)
  xs = jnp.arange(float(N))
  np.testing.assert_array_equal(jf(xs), 2 * np.arange(float(N)))
  assert rec.peak == N
  assert _batch_sizes(jf, xs) == [N]
  stats = xcs_jax.get_jit_stats(jf)
  assert stats["orchestration_ops"] == N and stats["max_parallelism"] == N
  assert xcs_jax.explain(jf, xs).count("host_op sib at") == N


def test_calls_that_start_at_other_times_are_not_batched():
  rec = Recorder()
  op = rec.op("chain")

  def f(x):
    a = op(x)
    # op(a) waits on op(x); op(x * 2) and op(x * 3) start together and are
    # read together (by the stack); op(x) is read by op(a) alone.
    return op(a) + jnp.stack([op(x * 2), op(x * 3)]).sum()

  jf = xcs_jax.jit(f)
  assert float(jf(1.0)) == float(jax.jit(f)(1.0))
  assert _batch_sizes(jf, 1.0) == [1, 1, 2]


def test_a_failing_member_names_its_own_line():
  rec = Recorder()
  ok = rec.op("member")
  bad_value = 5.0

  def host(x):
    if float(x) == bad_value:
      raise ValueError("bad member")
    return np.float32(x)
  op = xcs_jax.host_op(host, out_spec=jax.ShapeDtypeStruct((), jnp.float32), name="m")
  del ok

  def f(xs):
    outs = [op(xs[i]) for i in range(4)]
    outs.append(op(xs[5]))  # the failing call, on its own line
    return jnp.stack(outs)

  import inspect
  src, first = inspect.getsourcelines(f)
  line = first + next(i for i, l in enumerate(src) if "the failing call" in l)
  with pytest.raises(xcs_jax.XCSExecutionError) as e:
    xcs_jax.jit(f)(jnp.arange(8.0))
  assert e.value.source.endswith(f":{line} (f)")
  assert isinstance(e.value.__cause__, ValueError)


@pytest.mark.parametrize("limit", [1, 3])
def test_max_concurrency_keeps_call_sites_apart(limit):
  rec = Recorder(parties=limit)   # `limit` calls must overlap (N is a multiple of it)
  op = rec.op("limited")
  jf = xcs_jax.jit(_siblings(op), max_concurrency=limit)
  xs = jnp.arange(float(N))
  np.testing.assert_array_equal(jf(xs), np.arange(float(N)) + 1)
  assert rec.peak == limit
  assert _batch_sizes(jf, xs) == [1] * N


def test_other_shapes_or_ops_are_not_batched_together():
  def plus_one(x):
    return np.asarray(x + 1, np.float32)

  same = lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32)  # noqa: E731
  a = xcs_jax.host_op(plus_one, out_spec=same, name="a")
  b = xcs_jax.host_op(plus_one, out_spec=same, name="b")

  def f(x, v):
    return (jnp.stack([a(x), a(x * 2), b(x)]).sum()
            + jnp.stack([a(v), a(v * 3)]).sum())

  jf = xcs_jax.jit(f)
  x, v = jnp.float32(1.0), jnp.ones(3, jnp.float32)
  assert float(jf(x, v)) == float(jax.jit(f)(x, v))
  assert _batch_sizes(jf, x, v) == [1, 2, 2]  # b alone; a on scalars; a on vectors


def test_unused_sibling_is_still_never_called():
  rec = Recorder()
  op = rec.op("maybe")

  def f(x):
    used, _unused = op(x), op(x * 5)
    return used + op(x * 2)

  out = float(xcs_jax.jit(f)(1.0))
  assert sorted(v for _, v in rec.args) == [1.0, 2.0]  # op(x * 5) never made
  assert out == float(jax.jit(f)(1.0))


def test_a_fast_sibling_s_downstream_does_not_wait_for_a_slow_one():
  # Same op, same ancestors, but different readers: not batched, so post()
  # starts as soon as the fast call returns (latency depends on the input).
  rec = Recorder()
  done_fast = threading.Event()

  def step(x):
    time.sleep(0.05 if float(x) < 1 else 0.0)
    if float(x) >= 1:
      assert done_fast.wait(5.0), "post() never started while the slow call ran"
    return np.float32(x)

  def post(y):
    done_fast.set()
    return np.float32(y)

  f32 = jax.ShapeDtypeStruct((), jnp.float32)
  step_op = xcs_jax.host_op(step, out_spec=f32, name="step")
  post_op = xcs_jax.host_op(post, out_spec=f32, name="post")
  del rec

  def f(a, b):
    return post_op(step_op(a)), step_op(b)

  jf = xcs_jax.jit(f)
  out = jf(0.5, 2.0)
  assert [float(o) for o in out] == [0.5, 2.0]
  assert _batch_sizes(jf, 0.5, 2.0) == [1, 1, 1]
