"""`xcs_jax.host_op`: Python host functions as JAX primitives."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xcs_jax
from xcs_jax import text

from conftest import InFlight

F32 = jax.ShapeDtypeStruct((), jnp.float32)


def test_decorator_and_function_forms():
  def norm(x):
    return np.linalg.norm(x).astype(np.float32)

  as_call = xcs_jax.host_op(norm, out_spec=F32)
  as_decorator = xcs_jax.host_op(out_spec=F32)(norm)
  x = jnp.array([3.0, 4.0], jnp.float32)
  for f in (as_call, as_decorator):
    assert float(f(x)) == 5.0
    assert float(jax.jit(f)(x)) == 5.0
    assert f.__name__ == "norm" and f.host_fn is norm


def test_fn_gets_numpy_arrays_for_one_example():
  seen = []

  @xcs_jax.host_op(out_spec=F32)
  def record(x):
    seen.append((type(x), x.shape))
    return np.float32(0)

  jax.jit(jax.vmap(record))(jnp.zeros((3, 5), jnp.float32))
  assert seen == [(np.ndarray, (5,))] * 3


def test_pytree_inputs_and_outputs():
  out_spec = {"sum": F32, "both": (jax.ShapeDtypeStruct((2,), jnp.int32), F32)}

  @xcs_jax.host_op(out_spec=out_spec)
  def stats(inputs, scale):
    a, b = inputs["a"], inputs["b"]
    return {"sum": np.float32((a.sum() + b.sum()) * scale),
            "both": (np.array([a.size, b.size], np.int32), np.float32(scale))}

  args = ({"a": jnp.ones(3), "b": jnp.arange(4.0)}, jnp.float32(2.0))
  want = {"sum": 18.0, "both": (np.array([3, 4], np.int32), 2.0)}
  for f in (stats, jax.jit(stats)):
    chex.assert_trees_all_close(f(*args), jax.tree_util.tree_map(jnp.asarray, want))
  batched = jax.vmap(stats, in_axes=({"a": 0, "b": None}, None))(
      {"a": jnp.ones((2, 3)), "b": jnp.arange(4.0)}, jnp.float32(2.0))
  chex.assert_shape(batched["both"][0], (2, 2))
  np.testing.assert_allclose(batched["sum"], [18.0, 18.0])


def test_callable_out_spec_follows_input_shapes():
  @xcs_jax.host_op(out_spec=lambda x: jax.ShapeDtypeStruct(x.shape[:-1], jnp.int32))
  def row_argmax(x):
    return np.argmax(x, axis=-1).astype(np.int32)

  x = jnp.array([[1.0, 5.0, 2.0], [7.0, 0.0, 1.0]])
  np.testing.assert_array_equal(row_argmax(x), [1, 0])
  np.testing.assert_array_equal(jax.jit(jax.vmap(row_argmax))(x), [1, 0])
  assert jax.eval_shape(row_argmax, jax.ShapeDtypeStruct((4, 6, 3), jnp.float32)).shape == (4, 6)


def test_text_in_text_out():
  @xcs_jax.host_op(out_spec=lambda t: t)
  def reverse(t):
    return text.encode(text.decode(t)[::-1], t.shape[-1])

  x = jnp.asarray(text.encode(["abc", "héllo"], 8))
  assert text.decode(jax.jit(jax.vmap(reverse))(x)) == ["cba", "olléh"]


def test_vectorized_gets_the_whole_batch_in_one_call():
  calls = []

  @xcs_jax.host_op(out_spec=F32, vectorized=True)
  def scaled_sum(x, scale):
    calls.append((x.shape, scale.shape))
    return (x.sum(axis=-1) * scale).astype(np.float32)

  x = jnp.arange(12.0, dtype=jnp.float32).reshape(4, 3)
  out = jax.jit(jax.vmap(scaled_sum, in_axes=(0, None)))(x, jnp.float32(2.0))
  np.testing.assert_allclose(out, 2.0 * np.asarray(x).sum(-1))
  # One call; the unbatched `scale` arrives broadcast to the batch.
  assert calls == [((4, 3), (4,))]
  # Nested vmap: still one call, with the batch axes flattened into one.
  calls.clear()
  grid = jnp.arange(24.0, dtype=jnp.float32).reshape(2, 4, 3)
  out = jax.vmap(jax.vmap(scaled_sum, in_axes=(0, None)), in_axes=(0, None))(
      grid, jnp.float32(1.0))
  np.testing.assert_allclose(out, np.asarray(grid).sum(-1))
  assert calls == [((8, 3), (8,))]
  # Outside vmap the function still sees a leading batch axis (of 1).
  calls.clear()
  assert float(scaled_sum(x[0], jnp.float32(1.0))) == 3.0
  assert calls == [((1, 3), (1,))]


def test_outputs_are_cast_to_the_spec_dtype():
  @xcs_jax.host_op(out_spec=F32)
  def as_float64(x):
    return np.float64(x.sum())

  out = jax.jit(as_float64)(jnp.ones(3))
  assert out.dtype == jnp.float32 and float(out) == 3.0


@pytest.mark.parametrize("returned, expect", [
    (lambda: np.zeros((2,), np.float32), "shape (2,)"),
    (lambda: np.complex64(1), "complex64"),
    (lambda: (np.float32(1), np.float32(2)), "structure of `out_spec`"),
])
def test_wrong_output_is_a_clear_error(returned, expect):
  @xcs_jax.host_op(out_spec=F32, name="bad_output")
  def bad_output(x):
    return returned()

  with pytest.raises(xcs_jax.XCSExecutionError) as e:
    bad_output(jnp.ones(3))
  assert isinstance(e.value.__cause__, TypeError)
  assert "host_op call to bad_output" in str(e.value) and expect in str(e.value)
  with pytest.raises(RuntimeError, match="host_op call to bad_output"):
    jax.jit(bad_output)(jnp.ones(3)).block_until_ready()


@pytest.mark.parametrize("spec", [None, (), [1, 2], {"a": np.zeros(3)}])
def test_bad_out_spec(spec):
  with pytest.raises(TypeError, match="out_spec"):
    xcs_jax.host_op(lambda x: x, out_spec=spec)


def test_bad_callable_out_spec_fails_at_trace_time():
  op = xcs_jax.host_op(lambda x: x, out_spec=lambda x: "nonsense")
  with pytest.raises(TypeError, match="ShapeDtypeStruct"):
    jax.eval_shape(op, jax.ShapeDtypeStruct((3,), jnp.float32))


@pytest.mark.parametrize("kw, name, kind", [
    (dict(concurrency=0), "concurrency", ValueError),
    (dict(concurrency=2.0), "concurrency", TypeError),
    (dict(timeout_s=0), "timeout_s", ValueError),
    (dict(timeout_s=-1.0), "timeout_s", ValueError),
])
def test_bad_options(kw, name, kind):
  with pytest.raises(kind, match=name):
    xcs_jax.host_op(lambda x: x, out_spec=F32, **kw)


def test_non_callable_fn():
  with pytest.raises(TypeError, match="callable"):
    xcs_jax.host_op(3, out_spec=F32)


def test_calls_per_example_and_concurrency():
  rec = InFlight(parties=8)

  @xcs_jax.host_op(out_spec=F32, name="per_example_8", concurrency=8)
  @rec.wrap
  def total(x):
    return np.float32(x.sum())

  out = jax.jit(jax.vmap(total))(jnp.ones((16, 2)))
  np.testing.assert_array_equal(out, [2.0] * 16)
  assert rec.calls == 16 and rec.peak == 8
