"""Sibling calls of one op with the same inputs ready are fused into one step.

The fusion is an execution detail: every call is still made on its own,
concurrently, with its own source line in errors; analysis and explain still
show each call.
"""
from __future__ import annotations

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


def test_siblings_of_one_op_become_one_step_and_run_concurrently():
  rec = Recorder(parties=N)  # every call waits until all N are in flight
  op = rec.op("sib", fn=lambda x: 2 * x)
  f = _siblings(op)
  jf = xcs_jax.jit(f)
  xs = jnp.arange(float(N))
  np.testing.assert_array_equal(jf(xs), 2 * np.arange(float(N)))
  assert rec.peak == N
  (step,) = _host_steps(jf, xs)
  assert len(step.members) == N
  stats = xcs_jax.get_jit_stats(jf)
  assert stats["orchestration_ops"] == N and stats["max_parallelism"] == N
  assert xcs_jax.explain(jf, xs).count("host_op sib at") == N


def test_calls_with_other_inputs_ready_are_not_fused():
  rec = Recorder()
  op = rec.op("chain")

  def f(x):
    a = op(x)
    return op(a) + op(x * 2) + op(x * 3)  # op(a) waits on a; the other two do not

  jf = xcs_jax.jit(f)
  assert float(jf(1.0)) == float(jax.jit(f)(1.0))
  sizes = sorted(len(s.members) for s in _host_steps(jf, 1.0))
  assert sizes == [0, 0, 2]  # op(x * 2) and op(x * 3) fused; op(x) and op(a) alone


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
def test_max_concurrency_holds_inside_a_fused_step(limit):
  rec = Recorder()
  op = rec.op("limited", 0.01)
  jf = xcs_jax.jit(_siblings(op), max_concurrency=limit)
  xs = jnp.arange(float(N))
  np.testing.assert_array_equal(jf(xs), np.arange(float(N)) + 1)
  assert rec.peak == limit
