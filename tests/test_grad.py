"""Gradient estimators of `host_op(..., grad=...)` against analytic gradients."""
from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xcs_jax
from xcs_jax._src import grad as grad_lib

from conftest import InFlight


@contextlib.contextmanager
def float64():
  """float64 on, across jax versions (`jax.enable_x64` is a context from 0.5)."""
  try:
    ctx = jax.enable_x64(True)
  except (AttributeError, TypeError):  # pragma: no cover - older jax
    from jax.experimental import enable_x64
    ctx = enable_x64()
  with ctx:
    yield


def scalar_spec(x, *rest):
  return jax.ShapeDtypeStruct((), x.dtype)


def sum_sin(x):
  return np.sum(np.sin(x)).astype(x.dtype)


def rel_error(a, b):
  return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def cosine(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


RNG = np.random.default_rng(0)
A = RNG.normal(size=(6, 6))
B = RNG.normal(size=6)


def quadratic(x):
  return (x @ A @ x + B @ x).astype(x.dtype)


def quadratic_grad(x):
  return (A + A.T) @ x + B


# ------------------------------------------------------------------ accuracy


@pytest.mark.parametrize("jit", [False, True])
def test_central_float64_sum_sin(jit):
  with float64():
    op = xcs_jax.host_op(sum_sin, out_spec=scalar_spec, grad="central")
    x = jnp.linspace(-2.0, 3.0, 8, dtype=jnp.float64)
    g = (jax.jit(jax.grad(op)) if jit else jax.grad(op))(x)
    assert g.dtype == jnp.float64
    assert rel_error(g, np.cos(np.asarray(x))) <= 1e-3
    assert rel_error(g, np.cos(np.asarray(x))) <= 1e-8  # what it really gets


def test_central_float64_quadratic_form():
  with float64():
    op = xcs_jax.host_op(quadratic, out_spec=scalar_spec, grad="central")
    x = jnp.asarray(RNG.normal(size=6) * 10)  # large |x|: the step is relative
    g = jax.jit(jax.grad(op))(x)
    assert rel_error(g, quadratic_grad(np.asarray(x))) <= 1e-3
    assert rel_error(g, quadratic_grad(np.asarray(x))) <= 1e-8


def test_central_float32_is_accurate_enough():
  op = xcs_jax.host_op(sum_sin, out_spec=scalar_spec, grad="central")
  x = jnp.linspace(-2.0, 3.0, 8)
  assert rel_error(jax.grad(op)(x), np.cos(np.asarray(x))) <= 1e-3


def test_central_vector_output_jacobian_forward_and_reverse():
  def f(x):
    return np.stack([np.sum(x ** 2), np.prod(x), x[0] - 3 * x[1]]).astype(x.dtype)
  with float64():
    op = xcs_jax.host_op(f, out_spec=lambda x: jax.ShapeDtypeStruct((3,), x.dtype),
                         grad="central")
    x = jnp.asarray([1.5, -2.0, 0.5])
    want = np.stack([2 * np.asarray(x), [-1.0, 0.75, -3.0], [1, -3, 0]])
    np.testing.assert_allclose(jax.jacrev(op)(x), want, rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(jax.jacfwd(op)(x), want, rtol=1e-7, atol=1e-8)
    y, t = jax.jvp(op, (x,), (jnp.ones(3),))
    np.testing.assert_allclose(t, want.sum(axis=1), rtol=1e-7, atol=1e-8)


def test_spsa_cosine_similarity_and_variance():
  d, n = 8, 128  # docs: mean cosine ~ (1 + (d - 1) / n) ** -0.5 = 0.974
  x = jnp.linspace(-2.0, 3.0, d)
  cosines, estimates = [], []
  for seed in range(20):
    op = xcs_jax.host_op(sum_sin, out_spec=scalar_spec, grad=xcs_jax.grad.spsa(n, seed=seed))
    g = jax.grad(op)(x)  # eager: 20 estimators would be 20 compiles
    estimates.append(np.asarray(g))
    cosines.append(cosine(g, np.cos(np.asarray(x))))
  cosines = np.asarray(cosines)
  assert cosines.min() >= 0.9, cosines
  assert abs(cosines.mean() - (1 + (d - 1) / n) ** -0.5) < 0.03
  # Unbiased: the mean of 20 estimates is closer to the truth than one.
  spread = np.var(np.stack(estimates), axis=0).sum()
  assert rel_error(np.mean(estimates, axis=0), np.cos(np.asarray(x))) < 0.1
  assert 0 < spread < 1.0


def test_spsa_quadratic_float64():
  with float64():
    op = xcs_jax.host_op(quadratic, out_spec=scalar_spec, grad=xcs_jax.grad.spsa(n=64))
    x = jnp.asarray(RNG.normal(size=6))
    assert cosine(jax.grad(op)(x), quadratic_grad(np.asarray(x))) >= 0.9


def test_spsa_directions_are_reproducible_and_follow_inputs_and_seed():
  op = xcs_jax.host_op(sum_sin, out_spec=scalar_spec, grad="spsa")
  x = jnp.linspace(-1.0, 1.0, 6)
  g1, g2 = jax.grad(op)(x), jax.jit(jax.grad(op))(x)
  np.testing.assert_allclose(g1, g2, rtol=1e-5)
  assert not np.allclose(jax.grad(op)(x + 0.1), g1)  # other inputs, other directions
  other = xcs_jax.host_op(sum_sin, out_spec=scalar_spec, grad=xcs_jax.grad.spsa(seed=1))
  assert not np.allclose(jax.grad(other)(x), g1)


def test_host_vjp_is_called_with_numpy_and_matches():
  seen = {}

  def vjp(primals, outputs, cotangents):
    (x,) = primals
    seen["types"] = (type(x), type(outputs), type(cotangents))
    return (np.cos(x) * cotangents,)

  op = xcs_jax.host_op(sum_sin, out_spec=scalar_spec, grad=vjp)
  x = jnp.linspace(-1.0, 1.0, 5)
  for g in (jax.grad(op)(x), jax.jit(jax.grad(op))(x)):
    np.testing.assert_allclose(g, np.cos(np.asarray(x)), rtol=1e-6)
  assert seen["types"] == (np.ndarray, np.ndarray, np.ndarray)
  batch = jnp.stack([x, 2 * x])
  np.testing.assert_allclose(jax.vmap(jax.grad(op))(batch), np.cos(np.asarray(batch)),
                             rtol=1e-6)


def test_host_vjp_pytree_args_and_text_inputs():
  def fn(params, prompt):
    return np.float32(params["w"] * params["b"] + prompt.sum() * 0)

  def vjp(primals, outputs, ct):
    params, prompt = primals
    return ({"b": params["w"] * ct, "w": params["b"] * ct}, None)

  op = xcs_jax.host_op(fn, out_spec=jax.ShapeDtypeStruct((), jnp.float32), grad=vjp)
  prompt = xcs_jax.text.encode("hi", 8)
  g = jax.grad(lambda p: op(p, prompt))({"w": jnp.float32(3.0), "b": jnp.float32(2.0)})
  assert float(g["w"]) == 2.0 and float(g["b"]) == 3.0


# ------------------------------------------------------------------ batching


def test_perturbations_are_one_batched_call_with_the_forward_value():
  calls = []

  def fn(x):  # vectorized: one Python call per host call
    calls.append(x.shape)
    return np.sin(x).sum(axis=-1).astype(x.dtype)

  op = xcs_jax.host_op(fn, out_spec=scalar_spec, vectorized=True, grad="central")
  x = jnp.arange(4.0)
  value, g = jax.jit(jax.value_and_grad(op))(x)
  assert calls == [(2 * 4 + 1, 4)]  # primal row + 4 plus + 4 minus rows, one call
  assert np.isclose(value, np.sin(np.arange(4.0)).sum())

  calls.clear()
  spsa_op = xcs_jax.host_op(fn, out_spec=scalar_spec, vectorized=True,
                            grad=xcs_jax.grad.spsa(n=5))
  jax.jit(jax.grad(spsa_op))(x)
  assert calls == [(2 * 5 + 1, 4)]

  calls.clear()
  jax.jit(jax.vmap(jax.grad(op)))(jnp.stack([x, x + 1, x + 2]))
  assert calls == [(3 * 9, 4)]  # vmap of grad: still one host call


def test_perturbed_evaluations_run_concurrently():
  rec = InFlight(parties=2 * 3 + 1)  # every row must be in flight at once
  op = xcs_jax.host_op(rec.wrap(sum_sin), out_spec=scalar_spec, grad="central")
  jax.jit(jax.grad(op))(jnp.ones(3))
  assert rec.peak == 7 and rec.calls == 7


def test_only_differentiated_inputs_are_perturbed():
  calls = []

  def fn(x, y):  # vectorized: every input arrives with the batch axis
    calls.append((x.shape, y.shape, bool(np.all(y == y[0]))))
    return (np.sum(x * y, axis=-1)).astype(np.float32)

  op = xcs_jax.host_op(fn, out_spec=lambda x, y: jax.ShapeDtypeStruct((), jnp.float32),
                       vectorized=True, grad="central")
  x, y = jnp.arange(3.0), jnp.arange(5.0, 20.0, 5.0)
  g = jax.jit(jax.grad(op, argnums=0))(x, y)
  np.testing.assert_allclose(g, y, rtol=1e-3)
  assert calls == [((7, 3), (7, 3), True)]  # y never perturbed


def test_integer_outputs_beside_float_outputs_get_zero_tangents():
  def fn(x):
    return np.float32(np.sum(x ** 2)), xcs_jax.text.encode("ok", 4)

  op = xcs_jax.host_op(fn, out_spec=(jax.ShapeDtypeStruct((), jnp.float32),
                                     jax.ShapeDtypeStruct((4,), jnp.uint8)), grad="central")
  x = jnp.arange(3.0)
  np.testing.assert_allclose(jax.grad(lambda x: op(x)[0])(x), 2 * np.arange(3.0), atol=2e-2)
  assert xcs_jax.text.decode(op(x)[1]) == "ok"


def test_forward_only_call_makes_no_extra_evaluations():
  calls = []
  op = xcs_jax.host_op(lambda x: calls.append(1) or np.float32(x.sum()),
                       out_spec=jax.ShapeDtypeStruct((), jnp.float32), grad="central")
  jax.jit(op)(jnp.ones(4))
  assert len(calls) == 1


def test_under_xcs_jax_jit():
  if not hasattr(xcs_jax, "jit"):
    pytest.skip("xcs_jax.jit not present")
  rec = InFlight(parties=2 * 4 + 1)
  op = xcs_jax.host_op(rec.wrap(sum_sin), out_spec=scalar_spec, grad="central")
  loss = lambda x: op(x) + jnp.sum(x ** 2)
  x = jnp.linspace(-1.0, 1.0, 4)
  g = xcs_jax.jit(jax.grad(loss))(x)
  np.testing.assert_allclose(g, np.cos(np.asarray(x)) + 2 * np.asarray(x), rtol=1e-3)
  assert rec.peak == 9
  np.testing.assert_allclose(jax.grad(xcs_jax.jit(loss))(x), g, rtol=1e-6)


# ------------------------------------------------------------------ errors


def test_unknown_estimator_lists_the_valid_ones():
  with pytest.raises(ValueError, match=r"grad=.*'central', 'spsa'.*got 'adjoint'"):
    xcs_jax.host_op(sum_sin, out_spec=scalar_spec, grad="adjoint")
  with pytest.raises(ValueError, match=r"spsa\(n=...\)` must be an int in \[1, "):
    xcs_jax.grad.spsa(n=0)
  with pytest.raises(ValueError, match="relative step"):
    xcs_jax.grad.central(step=2.0)


def test_grad_of_text_outputs_is_a_clear_error():
  op = xcs_jax.host_op(lambda x: xcs_jax.text.encode("a", 4),
                       out_spec=jax.ShapeDtypeStruct((4,), jnp.uint8), grad="central",
                       name="labeler")
  with pytest.raises(ValueError, match=r"labeler.*integer or text.*uint8.*Drop `grad=`"):
    op(jnp.ones(2))


def test_no_grad_keeps_the_foundation_error():
  op = xcs_jax.host_op(sum_sin, out_spec=scalar_spec, name="scorer")
  with pytest.raises(xcs_jax.NoGradientError, match="scorer.*grad="):
    jax.grad(op)(jnp.ones(3))


def test_second_derivative_is_a_clear_error():
  op = xcs_jax.host_op(sum_sin, out_spec=scalar_spec, grad="central", name="scorer")
  with pytest.raises(xcs_jax.NoGradientError, match="scorer.*first-order.*twice"):
    jax.hessian(op)(jnp.ones(3))


@pytest.mark.parametrize("bad, problem", [
    (lambda p, o, c: (np.ones(2),), r"shape \(2,\) for argument 0.*is \(3,\)"),
    (lambda p, o, c: (np.ones(3), np.ones(3)), "returned 2 entries"),
    (lambda p, o, c: np.ones(3), "returned a ndarray"),
    (lambda p, o, c: (np.array(["a", "b", "c"]),), "dtype <U1"),
])
def test_vjp_with_wrong_shapes_names_the_op(bad, problem):
  op = xcs_jax.host_op(sum_sin, out_spec=scalar_spec, grad=bad, name="my_scorer")
  with pytest.raises(xcs_jax.XCSExecutionError, match="my_scorer") as info:
    jax.grad(op)(jnp.ones(3))
  assert info.match(problem)
  with pytest.raises(Exception, match="my_scorer"):  # under jit: the text reaches the user
    jax.jit(jax.grad(op))(jnp.ones(3))


def test_jvp_through_a_host_vjp_raises():
  op = xcs_jax.host_op(sum_sin, out_spec=scalar_spec, grad=lambda p, o, c: (np.cos(p[0]) * c,))
  with pytest.raises(TypeError, match="custom_vjp"):
    jax.jvp(op, (jnp.ones(3),), (jnp.ones(3),))


def test_estimators_are_hashable_values():
  assert grad_lib.resolve("central", "f") == xcs_jax.grad.central()
  assert hash(xcs_jax.grad.spsa(8, seed=2)) == hash(xcs_jax.grad.spsa(8, seed=2))


# ------------------------------------------------------------------ review fixes


def test_default_step_follows_the_lowest_precision_output():
  # float64 inputs, float32 output: the step must be float32's eps ** (1/3), not
  # float64's (which left rounding noise of ~20%). With a float32 output the
  # best central differences get is ~eps32 ** (2/3) relative; 1e-2 is the bound.
  with float64():
    op = xcs_jax.host_op(lambda x: np.float32(100 + np.sum(np.sin(x))),
                         out_spec=jax.ShapeDtypeStruct((), jnp.float32), grad="central")
    x = jnp.linspace(-2.0, 3.0, 8, dtype=jnp.float64)
    assert rel_error(jax.grad(op)(x), np.cos(np.asarray(x))) <= 1e-2
    assert grad_lib.default_step([jnp.float64], [jnp.float32]) == pytest.approx(
        float(np.finfo(np.float32).eps) ** (1 / 3))
    assert grad_lib.default_step([jnp.float64], [jnp.float64]) == pytest.approx(
        float(np.finfo(np.float64).eps) ** (1 / 3))


@pytest.mark.parametrize("grad", ["central", "spsa"])
@pytest.mark.parametrize("jit", [False, True])
def test_non_finite_perturbed_outputs_raise_and_name_the_op(grad, jit):
  op = xcs_jax.host_op(lambda x: np.float32(np.sqrt(x).sum()),
                       out_spec=jax.ShapeDtypeStruct((), jnp.float32), grad=grad,
                       name="sqrtsum")
  g = jax.jit(jax.grad(op)) if jit else jax.grad(op)
  with np.errstate(invalid="ignore"), pytest.raises(Exception) as info:
    g(jnp.array([0.0, 1.0]))  # sqrt(0 - h) is NaN while sqrt(0) is finite
  assert info.match(r"sqrtsum(.|\n)*non-finite(.|\n)*smaller `step=`(.|\n)*domain")
  if not jit:
    assert isinstance(info.value, xcs_jax.XCSExecutionError)
  ok = g(jnp.array([1.0, 4.0]))  # inside the domain: no error
  assert np.all(np.isfinite(ok))
  if grad == "central":
    np.testing.assert_allclose(ok, [0.5, 0.25], rtol=1e-3)


@pytest.mark.parametrize("grad", ["central", "spsa"])
def test_complex_inputs_are_a_clear_error(grad):
  op = xcs_jax.host_op(lambda z: np.float32(np.sum(np.abs(z) ** 2)),
                       out_spec=jax.ShapeDtypeStruct((), jnp.float32), grad=grad,
                       name="power")
  with pytest.raises(TypeError, match="power.*complex.*not supported"):
    jax.grad(op)(jnp.array([1 + 2j, 3 - 1j], jnp.complex64))
  assert np.isclose(op(jnp.array([1 + 2j], jnp.complex64)), 5.0)  # forward still works


@pytest.mark.parametrize("factory", [xcs_jax.grad.central, xcs_jax.grad.spsa])
def test_uncalled_estimator_factory_is_a_clear_error(factory):
  name = factory.__name__
  with pytest.raises(TypeError, match=rf"call it: grad=xcs_jax\.grad\.{name}\(\)"):
    xcs_jax.host_op(sum_sin, out_spec=scalar_spec, grad=factory)


@pytest.mark.parametrize("jit", [False, True])
def test_vjp_returning_non_finite_cotangents_names_the_op(jit):
  op = xcs_jax.host_op(lambda x: np.float32(x.sum()),
                       out_spec=jax.ShapeDtypeStruct((), jnp.float32), name="judge",
                       grad=lambda p, o, c: (np.full(3, np.nan, np.float32),))
  g = jax.jit(jax.grad(op)) if jit else jax.grad(op)
  with pytest.raises(Exception, match=r"judge\.vjp(.|\n)*non-finite") as info:
    g(jnp.ones(3))
  if not jit:
    assert isinstance(info.value, xcs_jax.XCSExecutionError)
