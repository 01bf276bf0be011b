"""Control flow holding model calls under `xcs_jax.jit`: cond, switch, scan, while, fori.

Values must match plain `jax.jit`; `cond`/`switch` make only the taken
branch's calls; loop iterations run in order, the calls inside one iteration
concurrently (checked with a barrier, not with wall time).
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import xcs_jax
from xcs_jax import models, text

from conftest import unique_binding
from jit_helpers import Recorder


def same_as_jax_jit(make, *args):
  """Runs `make(rec)` under xcs_jax.jit and, with fresh ops, under jax.jit.

  Returns the xcs_jax.jit recorder (the plain run records nothing shared, so a
  barrier in the xcs run is never met by the one-at-a-time plain run)."""
  rec, plain = make.recorder(), Recorder()
  got = xcs_jax.jit(make(rec))(*args)
  want = jax.jit(make(plain))(*args)
  chex.assert_trees_all_close(got, want, rtol=1e-6)
  return rec, plain


def program(recorder=Recorder):
  """Decorator: `make(rec) -> f`, with the recorder factory the xcs run uses."""
  def wrap(make):
    make.recorder = recorder
    return make
  return wrap


# --- cond / switch -----------------------------------------------------------------

@pytest.mark.parametrize("p", [1.0, -1.0])
def test_cond_makes_only_the_taken_branch_calls(p):
  @program()
  def make(rec):
    yes_a, yes_b, no = rec.op("yes_a"), rec.op("yes_b"), rec.op("no")
    return lambda p, x: lax.cond(p > 0, lambda x: yes_a(x) * yes_b(x + 1.0),
                                 lambda x: no(x) - 1.0, x)

  rec, plain = same_as_jax_jit(make, p, 3.0)
  taken = ["yes_a", "yes_b"] if p > 0 else ["no"]
  assert sorted(rec.names()) == taken
  assert sorted(plain.names()) == taken


def test_calls_in_a_cond_branch_run_concurrently():
  rec = Recorder(parties=3)
  a, b, c = rec.op("a"), rec.op("b"), rec.op("c")

  @xcs_jax.jit
  def f(p, x):
    return lax.cond(p > 0, lambda x: a(x) + b(x) + c(x), jnp.negative, x)

  assert float(f(1.0, 1.0)) == 6.0 and rec.peak == 3
  assert float(f(-1.0, 1.0)) == -1.0 and rec.calls == 3


@pytest.mark.parametrize("index", [0, 1, 2, 7, -3])
def test_switch_makes_only_the_taken_branch_calls(index):
  @program()
  def make(rec):
    ops = [rec.op(f"b{i}") for i in range(3)]
    branches = [lambda x: ops[0](x), lambda x: ops[1](x) * ops[1](x + 1.0),
                lambda x: ops[2](x) - 10.0]
    return lambda i, x: lax.switch(i, branches, x)

  rec, _ = same_as_jax_jit(make, index, 2.0)
  taken = min(max(index, 0), 2)  # lax.switch clamps the index
  assert set(rec.names()) == {f"b{taken}"}


def test_cond_with_model_calls_in_a_branch():
  echo = models.bind("fake:echo", output_bytes=8)
  upper = models.bind("fake:upper", output_bytes=8)

  def f(p, prompt):
    return lax.cond(p > 0, lambda q: upper(q), lambda q: echo(q), prompt)

  prompt = text.encode("abc", 8)
  for p in (1, 0):
    assert text.decode(xcs_jax.jit(f)(p, prompt)) == text.decode(jax.jit(f)(p, prompt))


# --- scan ---------------------------------------------------------------------------

@pytest.mark.parametrize("reverse", [False, True])
def test_scan_values_match_jax_jit(reverse):
  @program()
  def make(rec):
    h, g = rec.op("h", fn=lambda x: x * 0.5), rec.op("g", fn=lambda x: x + 2.0)

    def body(carry, x):
      y = h(x) + g(carry)
      return carry + jnp.tanh(y), (y, x * 2.0)

    return lambda c, xs: lax.scan(body, c, xs, reverse=reverse)

  rec, plain = same_as_jax_jit(make, 0.5, jnp.arange(4.0))
  assert rec.calls == plain.calls == 8


def test_scan_runs_iterations_in_order_and_calls_in_one_iteration_at_once():
  rec = Recorder(parties=3)  # the 3 calls of each iteration wait for each other
  a, b, c = rec.op("a"), rec.op("b"), rec.op("c")

  def f(xs):
    def body(carry, x):
      return carry + a(x) + b(x * 2.0) + c(carry), x
    return lax.scan(body, 0.0, xs)

  xs = jnp.arange(5.0)
  chex.assert_trees_all_close(xcs_jax.jit(f)(xs), _scan_reference(xs))
  assert rec.peak == 3 and rec.calls == 15
  # Iteration i+1 starts only after iteration i ended (the carry needs it).
  args = [v for name, v in rec.args if name == "a"]
  assert args == [0.0, 1.0, 2.0, 3.0, 4.0]
  starts = [t for _, e, t in rec.log if e == "start"]
  ends = [t for _, e, t in rec.log if e == "end"]
  for i in range(1, 5):
    assert min(starts[3 * i:3 * i + 3]) >= max(ends[3 * (i - 1):3 * i])


def _scan_reference(xs):
  carry = 0.0
  for x in np.asarray(xs):
    carry = carry + (x + 1) + (2 * x + 1) + (carry + 1)
  return jnp.float32(carry), xs


def test_scan_with_model_calls_over_prompts(fake_inflight):
  rec = fake_inflight(parties=2)
  echo = unique_binding("fake:echo", output_bytes=8)
  upper = unique_binding("fake:upper", output_bytes=8)

  def f(prompts):
    def body(n, p):
      a, b = echo(p), upper(p)
      return n + jnp.sum(a == b), jnp.stack([a, b])
    return lax.scan(body, 0, prompts)

  prompts = jnp.asarray(text.encode(["ab1", "CD2", "e"], 8))
  n, out = xcs_jax.jit(f)(prompts)
  assert text.decode(out) == [["ab1", "AB1"], ["CD2", "CD2"], ["e", "E"]]
  assert int(n) == 6 + 8 + 7  # bytes equal in echo and upper: "1" + padding, all, padding
  assert rec.peak == 2 and rec.calls == 6


def test_scan_of_length_zero():
  h = Recorder().op("h")

  def f(xs):
    return lax.scan(lambda c, x: (c + h(x), h(x) * 2.0), 1.0, xs)

  xs = jnp.zeros((0,))
  chex.assert_trees_all_close(xcs_jax.jit(f)(xs), jax.jit(f)(xs))


# --- while / fori --------------------------------------------------------------------

def test_while_loop_values_and_concurrency():
  rec = Recorder(parties=2)
  a, b = rec.op("a"), rec.op("b", fn=lambda x: x * 2.0)

  def f(x):
    def body(state):
      i, v = state
      return i + 1, v + a(v) + b(v)
    return lax.while_loop(lambda s: s[0] < 3, body, (0, x))

  plain = Recorder()
  pa, pb = plain.op("a"), plain.op("b", fn=lambda x: x * 2.0)

  def reference(x):
    return lax.while_loop(lambda s: s[0] < 3,
                          lambda s: (s[0] + 1, s[1] + pa(s[1]) + pb(s[1])), (0, x))

  chex.assert_trees_all_close(xcs_jax.jit(f)(0.5), jax.jit(reference)(0.5))
  assert rec.peak == 2 and rec.calls == 6


def test_while_loop_whose_condition_makes_a_call():
  @program()
  def make(rec):
    score = rec.op("score", fn=lambda x: x * 10.0)
    return lambda x: lax.while_loop(lambda v: score(v) < 100.0, lambda v: v + 1.0, x)

  rec, _ = same_as_jax_jit(make, 5.0)
  assert rec.calls == 6  # conditions at 5, 6, 7, 8, 9, 10


@pytest.mark.parametrize("dynamic", [False, True])
def test_fori_loop_matches_jax_jit(dynamic):
  @program(lambda: Recorder(parties=2))
  def make(rec):
    a, b = rec.op("a", fn=lambda x: x * 0.5), rec.op("b", fn=lambda x: x - 1.0)

    def f(n, x):
      upper = n if dynamic else 4  # static bounds lower to scan, dynamic to while
      return lax.fori_loop(0, upper, lambda i, v: v + a(v) * b(v + i), x)
    return f

  rec, _ = same_as_jax_jit(make, 4, 1.0)
  assert rec.peak == 2 and rec.calls == 8


def test_nested_control_flow():
  @program()
  def make(rec):
    a, b = rec.op("a"), rec.op("b", fn=lambda x: -x)

    def body(carry, x):
      y = lax.cond(x > 1.0, lambda v: a(v) * 2.0, lambda v: b(v), x)
      return carry + y, y
    return lambda xs: lax.scan(body, 0.0, xs)

  rec, _ = same_as_jax_jit(make, jnp.arange(4.0))
  assert rec.names() == ["b", "b", "a", "a"]


def test_control_node_runs_beside_independent_calls():
  rec = Recorder(parties=2)
  loop_op, side = rec.op("loop"), rec.op("side")

  def f(xs, y):
    s = lax.scan(lambda c, x: (c + loop_op(x), None), 0.0, xs)[0]
    return s + side(y)

  # Each loop call meets `side` at the barrier only if `side` runs while the
  # loop does; after `side` ends, the loop's next calls would wait alone, so
  # use one iteration.
  assert float(xcs_jax.jit(f)(jnp.ones(1), 1.0)) == 2.0 + 2.0
  assert rec.peak == 2


def test_explain_shows_control_nodes():
  h = Recorder().op("h")
  out = xcs_jax.explain(lambda xs: lax.scan(lambda c, x: (c + h(x), None), 0.0, xs)[0],
                        jnp.ones(3))
  assert "scan (control flow holding host calls)" in out
