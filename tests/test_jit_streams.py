"""Streams: a vmapped chain of calls runs item by item, exactly.

Pipelining is checked by construction, not by wall time: an item of the first
call waits until an item of the second call has started, which only a
per-item schedule allows (a level-by-level one would time out).
"""
from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xcs_jax
from xcs_jax import models, text
from xcs_jax._src.jit.classify import Kind

F32 = jax.ShapeDtypeStruct((), jnp.float32)
WAIT_S = 10.0


def kinds(jf, *args):
  return sorted(s.kind.value for s in jf.trace(*args).steps.values())


def test_item_of_the_next_call_starts_before_the_first_call_ends():
  second_started = threading.Event()

  def first_host(x):
    if float(x) == 1.0:            # item 1 waits for item 0 to reach `second`
      assert second_started.wait(WAIT_S), "items did not move on one by one"
    return np.float32(x + 10)

  def second_host(y):
    second_started.set()
    return np.float32(y * 2)

  first = xcs_jax.host_op(first_host, out_spec=F32, name="first")
  second = xcs_jax.host_op(second_host, out_spec=F32, name="second")
  f = jax.vmap(lambda a: second(first(a) + 1.0))
  jf = xcs_jax.jit(f)
  a = jnp.arange(4.0)
  assert Kind.STREAM.value in kinds(jf, a)
  np.testing.assert_array_equal(jf(a), (np.arange(4.0) + 11) * 2)


def test_text_chain_with_rowwise_tensor_code_between_matches_jax_jit():
  echo = models.bind("fake:echo", output_bytes=24)
  upper = models.bind("fake:upper", output_bytes=24)
  prefix = jnp.asarray(text.encode("Q:", 2))

  def one(p):
    answer = echo(p)
    cleaned = jnp.where(answer == ord("x"), ord("y"), answer).astype(jnp.uint8)
    return upper(jnp.concatenate([prefix, cleaned[:22]]))

  prompts = jnp.asarray(text.encode([f"ax {i}" for i in range(6)], 24))
  f = jax.vmap(one)
  jf = xcs_jax.jit(f)
  assert Kind.STREAM.value in kinds(jf, prompts)
  got = jf(prompts)
  np.testing.assert_array_equal(got, jax.jit(f)(prompts))
  assert text.decode(got)[0] == "Q:AY 0"


def test_outputs_of_every_stage_are_available_after_the_chain():
  double = xcs_jax.host_op(lambda x: np.float32(2 * x), out_spec=F32, name="double")
  inc = xcs_jax.host_op(lambda x: np.float32(x + 1), out_spec=F32, name="inc")

  def f(a):
    b = jax.vmap(double)(a)
    c = jax.vmap(inc)(b)
    return b.sum(), c, jnp.sort(b)     # b is used whole after the chain

  jf = xcs_jax.jit(f)
  a = jnp.asarray([3.0, 1.0, 2.0])
  assert Kind.STREAM.value in kinds(jf, a)
  for g, w in zip(jf(a), jax.jit(f)(a)):
    np.testing.assert_array_equal(g, w)


def test_a_tree_and_a_join_of_stages():
  inc = xcs_jax.host_op(lambda x: np.float32(x + 1), out_spec=F32, name="inc")
  add = xcs_jax.host_op(lambda x, y: np.float32(x + 10 * y), out_spec=F32, name="add")

  def one(a):
    b = inc(a)
    c, d = inc(b * 2.0), inc(b * 3.0)   # two stages read b
    return add(c, d)                    # one reads both

  f = jax.vmap(one)
  jf = xcs_jax.jit(f)
  a = jnp.arange(5.0)
  plan = jf.trace(a)
  (stream,) = [s for s in plan.steps.values() if s.kind is Kind.STREAM]
  assert len(stream.eqn.params["spec"].stages) == 4
  np.testing.assert_array_equal(jf(a), jax.jit(f)(a))


def test_nested_vmap_streams_over_both_batch_axes():
  inc = xcs_jax.host_op(lambda x: np.float32(x + 1), out_spec=F32, name="inc")
  f = jax.vmap(jax.vmap(lambda a: inc(inc(a) * 3.0)))
  jf = xcs_jax.jit(f)
  a = jnp.arange(12.0).reshape(3, 4)
  assert Kind.STREAM.value in kinds(jf, a)
  np.testing.assert_array_equal(jf(a), jax.jit(f)(a))


def test_per_item_inputs_and_constants_reach_every_stage():
  scale = xcs_jax.host_op(lambda x, s: np.float32(x * s), out_spec=F32, name="scale")

  def f(a, s, k):
    return jax.vmap(lambda x, si: scale(scale(x, si) + 1.0, k))(a, s)

  jf = xcs_jax.jit(f)
  args = (jnp.arange(4.0), jnp.asarray([1.0, 2.0, 3.0, 4.0]), jnp.float32(0.5))
  assert Kind.STREAM.value in kinds(jf, *args)
  np.testing.assert_array_equal(jf(*args), jax.jit(f)(*args))


def test_a_stage_that_needs_an_unrelated_call_is_not_delayed_into_a_stream():
  """`second` also reads a slow, unrelated call: joining the stream would
  make the stream (and `first`) wait for it, so it stays a call of its own."""
  slow_done = threading.Event()
  first_ran = threading.Event()

  def slow_host(x):
    assert first_ran.wait(WAIT_S), "first waited for an unrelated call"
    slow_done.set()
    return np.float32(x)

  def first_host(x):
    first_ran.set()
    return np.float32(x + 1)

  slow = xcs_jax.host_op(slow_host, out_spec=F32, name="slow")
  first = xcs_jax.host_op(first_host, out_spec=F32, name="first")
  second = xcs_jax.host_op(lambda x, y: np.float32(x + y), out_spec=F32, name="second")

  def f(a, z):
    s = slow(z)
    return jax.vmap(lambda x: second(first(x), s))(a)

  jf = xcs_jax.jit(f)
  assert Kind.STREAM.value not in kinds(jf, jnp.arange(3.0), jnp.float32(1.0))
  np.testing.assert_array_equal(jf(jnp.arange(3.0), jnp.float32(1.0)), [2.0, 3.0, 4.0])


@pytest.mark.parametrize("fail_in", ["first", "second"])
def test_a_failing_item_fails_the_run_with_its_op_and_item(fail_in):
  def host(name):
    def fn(x):
      if name == fail_in and float(x) >= 2.0:
        raise ValueError(f"bad item in {name}")
      return np.float32(x)
    return xcs_jax.host_op(fn, out_spec=F32, name=name)

  first, second = host("first"), host("second")
  jf = xcs_jax.jit(jax.vmap(lambda a: second(first(a) + 0.0)))
  with pytest.raises(xcs_jax.XCSExecutionError) as e:
    jf(jnp.arange(3.0))
  assert e.value.op == "host_op" and e.value.binding == fail_in
  assert "batch item 2" in str(e.value) and f"bad item in {fail_in}" in str(e.value)
  # The runtime is left clean: the next run works.
  ok = xcs_jax.jit(jax.vmap(lambda a: second(first(a) + 0.0)))
  np.testing.assert_array_equal(ok(jnp.zeros(3)), np.zeros(3))


def test_an_empty_batch_streams_nothing():
  inc = xcs_jax.host_op(lambda x: np.float32(x + 1), out_spec=F32, name="inc")
  f = jax.vmap(lambda a: inc(inc(a) + 1.0))
  out = xcs_jax.jit(f)(jnp.zeros((0,)))
  assert out.shape == (0,)


def test_model_calls_stream_on_the_async_path():
  echo = models.bind("fake:echo", output_bytes=16, latency_s=0.01)
  f = jax.vmap(lambda p: echo(echo(p)))
  prompts = jnp.asarray(text.encode([f"p{i}" for i in range(16)], 16))
  jf = xcs_jax.jit(f)
  assert Kind.STREAM.value in kinds(jf, prompts)
  assert text.decode(jf(prompts)) == [f"p{i}" for i in range(16)]
