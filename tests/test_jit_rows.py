"""The passes around batched calls (rows.py) and compiling each segment once.

Each rewrite is exact: the values equal plain `jax.jit`'s, bit for bit.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xcs_jax
from xcs_jax._src.jit.classify import Kind
from xcs_jax._src.jit.expose import expose_calls
from xcs_jax._src.jit.plan import SegmentCache, build_plan
from xcs_jax._src.jit.pseudo import FOLD, ROWS, STACK, UNSTACK, VMAP
from xcs_jax._src.jit.rows import fold_reductions, vectorize_stacks
from xcs_jax._src.jit.batch_calls import batch_sibling_calls

from jit_helpers import F32

h = xcs_jax.host_op(lambda x: np.float32(x * 1.5 + 0.25), out_spec=F32, name="h")
hi = xcs_jax.host_op(lambda x: np.int32(x * 3 - 7), out_spec=jax.ShapeDtypeStruct((), jnp.int32),
                     name="hi")
hv = xcs_jax.host_op(lambda x: (x * 2).astype(np.float32),
                     out_spec=lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), name="hv")


def rewritten(f, *args):
  prog = expose_calls(jax.make_jaxpr(f)(*args))
  return fold_reductions(vectorize_stacks(batch_sibling_calls(prog)))


def prims(prog):
  return [e.primitive for e in prog.eqns]


def assert_same_as_jax_jit(f, *args):
  got = xcs_jax.jit(f)(*args)
  want = jax.jit(f)(*args)
  for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    assert g.dtype == w.dtype and g.shape == w.shape
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_sibling_inputs_become_one_vectorized_operation():
  def f(x):
    return jnp.stack([h(x * 0.5 + i) for i in range(16)])

  prog = rewritten(f, jnp.float32(1.0))
  assert VMAP in prims(prog) and STACK not in prims(prog)
  assert_same_as_jax_jit(f, jnp.float32(1.0))


def test_rows_of_an_input_in_order_are_the_input_itself():
  def f(xs):
    return jnp.stack([h(xs[i]) for i in range(xs.shape[0])])

  xs = jnp.linspace(-1.0, 1.0, 12)
  prog = rewritten(f, xs)
  # No STACK, no UNSTACK, no re-stacking: the call reads xs and is the output.
  assert prims(prog) == [prog.eqns[0].primitive] and len(prog.eqns) == 1
  plan = build_plan(jax.make_jaxpr(f)(xs))
  assert [s.kind for s in plan.steps.values()] == [Kind.HOST]
  assert_same_as_jax_jit(f, xs)


def test_some_rows_of_an_input_are_a_slice():
  def f(xs):
    return jnp.array([h(xs[i]) for i in range(2, 7)])

  xs = jnp.arange(10.0)
  prog = rewritten(f, xs)
  assert ROWS in prims(prog)
  assert_same_as_jax_jit(f, xs)


@pytest.mark.parametrize("combine", [
    lambda ys: sum(ys),
    lambda ys: __import__("functools").reduce(lambda a, b: b * a, ys),     # acc second
    lambda ys: __import__("functools").reduce(jnp.maximum, ys),
])
def test_python_reductions_over_call_sites_fold_bit_exactly(combine):
  def f(x):
    return combine([h(x + 0.1 * i) for i in range(24)])

  prog = rewritten(f, jnp.float32(0.3))
  assert FOLD in prims(prog)
  assert_same_as_jax_jit(f, jnp.float32(0.3))


def test_integer_and_vector_reductions_fold():
  def f(x, v):
    return sum(hi(x + i) for i in range(9)), sum(hv(v + i) for i in range(9))

  prog = rewritten(f, jnp.int32(2), jnp.ones(5, jnp.float32))
  assert prims(prog).count(FOLD) == 2
  assert_same_as_jax_jit(f, jnp.int32(2), jnp.ones(5, jnp.float32))


def test_a_chain_whose_partial_results_are_used_elsewhere_stays_exact():
  def f(x):
    ys = [h(x + i) for i in range(8)]
    partial = ys[0] + ys[1] + ys[2]
    return partial + ys[3] + ys[4] + ys[5] + ys[6] + ys[7], partial * 2.0

  assert_same_as_jax_jit(f, jnp.float32(0.5))


def test_stacks_of_unlike_values_run_on_the_host_beside_the_call():
  def f(x):
    # sin and cos are not vectorized (their vector kernels may round
    # differently), so the call's inputs are stacked on the host.
    ys = [h(jnp.sin(x)), h(jnp.cos(x)), h(jnp.sin(2 * x)), h(jnp.cos(2 * x))]
    return jnp.exp(ys[0]) + jnp.log(ys[1] + 10) + jnp.tanh(ys[2]) + ys[3]

  x = jnp.float32(0.7)
  plan = build_plan(jax.make_jaxpr(f)(x))
  host = [s for s in plan.steps.values() if s.kind is Kind.HOST]
  assert len(host) == 1
  assert [e.primitive for e in host[0].pre] == [STACK]
  assert [e.primitive for e in host[0].post] == [UNSTACK]
  assert_same_as_jax_jit(f, x)


def test_identical_segments_compile_once():
  """A Python loop of call -> tensor code -> call makes one segment per step,
  all the same computation: compiled once for the whole function."""
  def f(x):
    for _ in range(12):
      x = h(x * 0.5 + 1.0)
    return x

  cache = SegmentCache()
  plan = build_plan(jax.make_jaxpr(f)(jnp.float32(1.0)), segments=cache)
  segments = [s for s in plan.steps.values() if s.kind is Kind.TENSOR]
  assert len(segments) >= 11
  assert cache.compiled <= 2
  assert_same_as_jax_jit(f, jnp.float32(1.0))


def test_literals_of_other_values_are_other_segments():
  def f(x):
    for scale in (0.5,) * 6 + (0.25,) * 6:
      x = h(x * scale + 1.0)
    return x

  cache = SegmentCache()
  build_plan(jax.make_jaxpr(f)(jnp.float32(1.0)), segments=cache)
  assert cache.compiled == 2
  assert_same_as_jax_jit(f, jnp.float32(1.0))
