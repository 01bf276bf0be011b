"""Regressions found in review of xcs_jax.jit."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import xcs_jax
from xcs_jax import models, text

from jit_helpers import Recorder


def test_a_function_whose_only_call_is_unused_runs_like_jax_jit():
  echo = models.bind("fake:echo", output_bytes=8)
  p = text.encode("hi", 8)

  def f(x, p):
    _ = echo(p)  # dead code: never called, as under jax.jit
    return x * 2

  jf = xcs_jax.jit(f)
  for _ in range(2):  # first call and cached call
    np.testing.assert_array_equal(jf(jnp.ones(2), p), jax.jit(f)(jnp.ones(2), p))
  assert xcs_jax.get_jit_stats(jf)["execution_strategy"] == "tensor"


def test_fast_path_after_a_signature_with_a_non_array_argument():
  def g(x, mode="double"):
    return x * (3 if mode == "triple" else 2)

  jg = xcs_jax.jit(g)
  x = jnp.ones(2)
  for mode in ("triple", None, "triple"):
    got = jg(x, mode=mode) if mode else jg(x)
    np.testing.assert_array_equal(got, g(x, mode=mode) if mode else g(x))


def test_literal_and_pass_through_outputs_are_arrays_like_jax_jit():
  op = Recorder().op("lit")

  def f(x):
    return op(x), 3, x

  got, want = xcs_jax.jit(f)(1.0), jax.jit(f)(1.0)
  for g, w in zip(got, want):
    assert isinstance(g, jax.Array)
    assert g.dtype == w.dtype and g.weak_type == w.weak_type
    np.testing.assert_array_equal(g, w)


def test_vmapped_while_with_a_data_dependent_trip_count():
  op = Recorder().op("halve", fn=lambda x: x / 2)

  def g(x):
    return lax.while_loop(lambda c: c > 1.0, op, x)

  xs = jnp.array([3.0, 20.0, 0.5])
  np.testing.assert_allclose(xcs_jax.jit(jax.vmap(g))(xs), jax.jit(jax.vmap(g))(xs))


def test_the_concurrency_limit_holds_for_unbatched_calls_from_many_threads():
  import threading

  from conftest import InFlight
  rec = InFlight()

  def fn(x):
    with rec.track():
      threading.Event().wait(0.05)
    return np.float32(x)

  op = xcs_jax.host_op(fn, out_spec=jax.ShapeDtypeStruct((), jnp.float32),
                       name="limited_unbatched", concurrency=2)
  for call in (op, jax.jit(op)):  # eager, and under plain jax.jit
    rec.peak = 0
    threads = [threading.Thread(target=call, args=(1.0,)) for _ in range(8)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    assert rec.peak == 2


def test_static_args_are_static_by_position_and_by_name():
  op = Recorder().op("scaled")

  def f(x, n):
    return op(x) * n if n > 1 else op(x)  # Python control flow on n: must be static

  for jf in (xcs_jax.jit(f, static_argnames="n"), xcs_jax.jit(f, static_argnums=1)):
    assert float(jf(1.0, 3)) == 6.0          # n by position
    assert float(jf(1.0, n=3)) == 6.0        # n by name
    assert xcs_jax.get_jit_stats(jf)["status"] == "compiled"


def test_flags_and_nan_are_not_numbers_for_bind_host_op_and_jit():
  import pytest
  for kw, kind in ((dict(output_bytes=True), TypeError),
                   (dict(temperature=float("nan")), ValueError),
                   (dict(timeout_s=True), TypeError)):
    with pytest.raises(kind, match=next(iter(kw))):
      models.bind("fake:echo", **kw)
  with pytest.raises(TypeError, match="timeout_s"):
    xcs_jax.host_op(lambda x: x, out_spec=jax.ShapeDtypeStruct((), jnp.float32),
                    timeout_s=True)
  with pytest.raises(ValueError, match="cache_size"):
    xcs_jax.jit(lambda x: x, cache_size=-1)
