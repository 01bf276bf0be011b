"""Gradient estimators for host ops: `xcs_jax.host_op(..., grad=...)`.

A host function is a black box to JAX. These estimators give it a derivative
without changing the host-call primitive itself (it stays rule-free; the
estimator wraps the call site):

- `central(step=None)`: central differences, one pair of evaluations per input
  element. `step` is relative: element `x_i` moves by
  `h_i = step * max(|x_i|, 1)`; the default `step` is `eps ** (1/3)` of the
  lowest-precision float among the differentiated inputs and the outputs
  (about 4.9e-3 for float32, 6.1e-6 for float64), which balances truncation
  (`O(h^2)`) against rounding (`O(eps / h)`). Complex inputs raise TypeError.
  Non-finite perturbed outputs where the forward value is finite raise
  (the step left the function's domain); NaN is never returned silently.
- `spsa(n=16, step=None, seed=0)`: simultaneous perturbation: `n` random
  Rademacher (+-1) directions, two evaluations each, whatever the input size.
  Every element moves by `+-c`, one `c = step * max(rms(x), 1)` for all.
  Unbiased to first order; for a smooth function of `d` inputs the expected
  cosine similarity to the true gradient is about `(1 + (d - 1) / n) ** -0.5`
  (so `n >= 4.3 (d - 1)` for 0.9). Directions come from
  `jax.random.fold_in(jax.random.key(seed), hash(inputs))`: reproducible,
  and fresh whenever the inputs change (every optimization step).
- a callable `vjp(primals, outputs, cotangents) -> tuple of input
  cotangents`, run on the host with numpy arrays.

Every extra evaluation an estimator needs is issued as ONE batched host call
(the primitive bound once with a leading batch axis of `2K + 1` rows: the
unperturbed point and `K` +- pairs), so the evaluations run concurrently on
the op's pool, and the forward value comes from the same call.

`central` and `spsa` are `jax.custom_jvp` rules whose tangent is linear in the
input tangent (a fixed combination of the perturbed outputs), so `jax.grad`,
`jax.vjp`, `jax.jvp`, `jax.jacfwd` and `jax.jacrev` all work. Inputs whose
tangent is a symbolic zero (not differentiated) are not perturbed. A user
VJP is a `jax.custom_vjp` rule: reverse mode only; `jax.jvp` through it
raises JAX's TypeError about custom_vjp functions. Estimates are first order:
differentiating twice (`jax.hessian`) raises `NoGradientError`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from xcs_jax._src import checks

DEFAULT_SPSA_SAMPLES = 16
ESTIMATOR_NAMES = ("central", "spsa")

_BAD_GRAD = (
    "`host_op({name}, grad=...)` must be one of 'central', 'spsa', an estimator "
    "from `xcs_jax.grad` (`xcs_jax.grad.central(step=...)`, "
    "`xcs_jax.grad.spsa(n=..., seed=...)`), or a host VJP callable "
    "`vjp(primals, outputs, cotangents) -> tuple of input cotangents`; got {got!r}.")

_BAD_VJP_RESULT = (
    "the VJP of host_op `{name}` (its `grad=` callable) {problem}. It must "
    "return a tuple with one entry per positional argument of {name} ({nargs} here), each shaped like that "
    "argument (same pytree, same shapes; None for integer/text leaves or for a "
    "zero cotangent).")


@dataclasses.dataclass(frozen=True)
class Central:
  """Central differences. See `central`."""
  step: float | None = None
  name = "central"


@dataclasses.dataclass(frozen=True)
class SPSA:
  """Simultaneous perturbation. See `spsa`."""
  n: int = DEFAULT_SPSA_SAMPLES
  step: float | None = None
  seed: int = 0
  name = "spsa"


@dataclasses.dataclass(frozen=True)
class HostVJP:
  """A user VJP run on the host: `fn(primals, outputs, cotangents)`."""
  fn: Callable
  name = "vjp"


Estimator = Union[Central, SPSA, HostVJP]


def central(step: float | None = None) -> Central:
  """Central differences: `(f(x + h e_i) - f(x - h e_i)) / 2h` per input element.

  Args:
    step: relative step; element `x_i` moves by `step * max(|x_i|, 1)`.
      Default: `eps ** (1/3)` of the lowest-precision input/output float dtype.

  Returns:
    An estimator for `host_op(..., grad=...)`.

  Examples:
    >>> op = xcs_jax.host_op(np.sin, out_spec=lambda x: x, grad=xcs_jax.grad.central())
    >>> jax.grad(lambda x: op(x).sum())(jnp.ones(3))  # ~cos(1)
  """
  return Central(_check_step(step, "central"))


def spsa(n: int = DEFAULT_SPSA_SAMPLES, *, step: float | None = None,
         seed: int = 0) -> SPSA:
  """Simultaneous perturbation (SPSA) with `n` Rademacher directions.

  Args:
    n: directions per gradient evaluation (2 host evaluations each, batched
      into one call). The estimate's expected cosine similarity to the true
      gradient of `d` inputs is about `(1 + (d - 1) / n) ** -0.5`.
    step: relative perturbation size: every input element moves by
      `+-step * max(rms(x), 1)` (default `eps ** (1/3)` of the dtype). For
      noisy or quantized host functions pick one large enough that the
      output changes.
    seed: base of the PRNG key; per call the directions use
      `fold_in(key(seed), hash(inputs))`.

  Returns:
    An estimator for `host_op(..., grad=...)`.
  """
  n = checks.check_int(n, "xcs_jax.grad.spsa(n=...)", min_value=1,
                       max_value=checks.MAX_SAMPLES)
  seed = checks.check_seed(seed, "xcs_jax.grad.spsa(seed=...)")
  return SPSA(n, _check_step(step, "spsa"), seed)


def _check_step(step, who) -> float | None:
  return checks.check_number(step, f"xcs_jax.grad.{who}(step=...)", min_value=0,
                             min_open=True, max_value=1, max_open=True, none_ok=True,
                             fix="It is a relative step: x moves by step * max(|x|, 1).")


def resolve(grad: Any, op_name: str) -> Estimator | None:
  """The estimator `grad=` names (None: no gradient rule)."""
  if grad is None or isinstance(grad, (Central, SPSA, HostVJP)):
    return grad
  if grad is central or grad is spsa:  # the factory itself, not an estimator
    raise TypeError(
        f"`host_op({op_name}, grad=xcs_jax.grad.{grad.__name__})` passes the factory, "
        f"which would be taken for a host VJP; call it: "
        f"grad=xcs_jax.grad.{grad.__name__}() (or grad={grad.__name__!r}).")
  if isinstance(grad, str):
    if grad == "central":
      return Central()
    if grad == "spsa":
      return SPSA()
  elif callable(grad):
    return HostVJP(grad)
  raise ValueError(_BAD_GRAD.format(name=op_name, got=grad))


class CallSite(NamedTuple):
  """What an estimator needs of one host-op call site.

  Attributes:
    name: the op's readable name (`host_op(..., name=...)`), for errors.
    bind: `(args, in_batched, batch_ndim) -> outputs`: binds the op's primitive.
    out_avals: the outputs' ShapeDtypeStructs (flat).
    make_host_call: `(fn, out_spec, name) -> callable`: another host op with the
      same pool, timeout and `vectorized` flag (runs user VJPs).
    in_treedef / out_treedef: the call's argument tuple and output pytrees.
  """
  name: str
  bind: Callable[[Sequence[Any], Sequence[bool], int], list]
  out_avals: Sequence[jax.ShapeDtypeStruct]
  make_host_call: Callable[[Callable, Any, str], Callable]
  in_treedef: Any
  out_treedef: Any


def _is_float(x) -> bool:
  return jnp.issubdtype(x.dtype, jnp.inexact)


def differentiable_call(estimator: Estimator, site: CallSite,
                        leaves: Sequence[jax.Array]) -> list:
  """Binds the call site on `leaves` with `estimator` as its derivative."""
  if not any(_is_float(o) for o in site.out_avals):
    dtypes = ", ".join(sorted({str(np.dtype(o.dtype)) for o in site.out_avals}))
    raise ValueError(
        f"`host_op({site.name}, grad={estimator.name!r})`: every output of "
        f"{site.name} is "
        f"integer or text ({dtypes}), and those carry no gradient. Drop `grad=`, "
        "or return the float values you want to differentiate.")
  if not any(_is_float(x) for x in leaves):
    return site.bind(leaves, [False] * len(leaves), 0)
  if isinstance(estimator, HostVJP):
    return _host_vjp_call(estimator, site, leaves)
  return _perturbation_call(estimator, site, leaves)


# ---------------------------------------------------------------- central / spsa


def _perturbation_call(est: Central | SPSA, site: CallSite, leaves) -> list:
  @jax.custom_jvp
  def call(xs):
    return site.bind(xs, [False] * len(xs), 0)

  def call_jvp(primals, tangents):
    (xs,), (ts,) = primals, tangents
    moving = [i for i, (x, t) in enumerate(zip(xs, ts))
              if _is_float(x) and not isinstance(t, SymbolicZero)]
    if not moving:
      outs = call(xs)
      return outs, [_zero_tangent(o) for o in outs]
    return _perturbation_jvp(est, site, xs, ts, moving)

  call.defjvp(call_jvp, symbolic_zeros=True)
  return call(list(leaves))


def default_step(in_dtypes, out_dtypes) -> float:
  """`eps ** (1/3)` of the LOWEST-precision float among inputs and outputs.

  The rounding error of `f(x + h) - f(x - h)` is set by the output's precision
  as much as the input's: a float32 output of float64 inputs needs float32's step.
  """
  eps = max(float(jnp.finfo(dt).eps) for dt in list(in_dtypes) + list(out_dtypes)
            if jnp.issubdtype(dt, jnp.inexact))
  return eps ** (1 / 3)


def _perturbation_jvp(est, site, xs, ts, moving):
  complex_in = [i for i in moving if jnp.issubdtype(xs[i].dtype, jnp.complexfloating)]
  if complex_in:
    raise TypeError(
        f"`host_op({site.name}, grad={est.name!r})`: input leaf {complex_in[0]} is "
        f"complex ({np.dtype(xs[complex_in[0]].dtype)}); complex inputs are not "
        "supported by the central/spsa estimators (they perturb real directions "
        "only). Pass the real and imaginary parts as separate float inputs, or give "
        "a host VJP `grad=`.")
  dtype = jnp.result_type(*[xs[i] for i in moving])
  sizes = [int(np.prod(xs[i].shape)) for i in moving]
  d = sum(sizes)
  offsets = np.cumsum([0] + sizes)
  step = est.step if est.step is not None else default_step(
      [xs[i].dtype for i in moving], [o.dtype for o in site.out_avals])
  theta = jnp.concatenate([xs[i].ravel().astype(dtype) for i in moving])
  if isinstance(est, Central):
    directions = jnp.diag(step * jnp.maximum(jnp.abs(theta), 1))  # [d, d]
    norm = 1.0
  else:
    # One scale for every element: unequal scales would leak each element's
    # slope into the others' estimates (noise grows with the scale ratio).
    scale = step * jnp.maximum(jnp.sqrt(jnp.mean(jnp.square(theta))), 1)
    signs = jax.random.rademacher(_directions_key(est.seed, xs), (est.n, d), dtype)
    directions = signs * scale                                     # [n, d]
    norm = float(est.n)
  k = directions.shape[0]

  # One batch: row 0 the primal point, then k plus rows, then k minus rows.
  batch, deltas = [], []
  for j, i in enumerate(moving):
    x = xs[i]
    step_i = directions[:, offsets[j]:offsets[j + 1]].astype(x.dtype).reshape(
        (k,) + x.shape)
    plus, minus = x + step_i, x - step_i
    deltas.append(((plus - minus) / 2).reshape(k, -1).astype(dtype))  # the step taken
    batch.append(jnp.concatenate([x[None], plus, minus]))
  args, in_batched = list(xs), [False] * len(xs)
  for j, i in enumerate(moving):
    args[i], in_batched[i] = batch[j], True
  ys = site.bind(args, in_batched, 1)
  outs = [y[0] for y in ys]
  # Non-finite perturbed outputs where the unperturbed one is finite: the step
  # left the function's domain. Raise (on the host, when the values exist)
  # rather than return a NaN gradient.
  ok = _check_perturbed(est, site, ys, k)

  delta = jnp.concatenate(deltas, axis=1)                           # [k, d]
  t = jnp.concatenate([ts[i].ravel().astype(dtype) for i in moving])
  out_tangents = []
  for o, y in zip(outs, ys):
    if not _is_float(o):
      out_tangents.append(_zero_tangent(o))
      continue
    diff = (y[1:k + 1] - y[k + 1:]).reshape(k, -1) + ok.astype(y.dtype)  # [k, m]
    if isinstance(est, Central):
      # Row i moved element i only: column i of the Jacobian is its own two rows
      # over its own step (no sum over rows, so one bad row stays in its element).
      # Linear in t, so jax can transpose it.
      h2 = (2 * jnp.diagonal(delta)).astype(diff.dtype)[:, None]     # [d, 1]
      jac_t = jnp.where(h2 != 0, diff / jnp.where(h2 != 0, h2, 1), 0)  # [d, m]
      tangent = t.astype(diff.dtype) @ jac_t
    else:
      # SPSA: dy = sum_k a_k (y+_k - y-_k), a_k = sum_i t_i / (2 delta_ki) / n.
      inv = jnp.where(delta != 0, 1 / (2 * jnp.where(delta != 0, delta, 1)), 0) / norm
      tangent = (inv @ t).astype(diff.dtype) @ diff
    out_tangents.append(tangent.reshape(o.shape).astype(o.dtype))
  return outs, out_tangents


def _check_perturbed(est, site, ys, k) -> jax.Array:
  """A float32 zero that raises on the host if a perturbed output went non-finite."""
  bad = jnp.zeros((), jnp.int32)
  for o, y in zip(site.out_avals, ys):
    if not _is_float(o):
      continue
    fwd_ok = jnp.isfinite(y[0])
    pert_bad = ~jnp.isfinite(y[1:]) & fwd_ok[None]
    bad = bad + jnp.sum(pert_bad, dtype=jnp.int32)

  def check(count):
    count = np.asarray(count)
    if np.any(count > 0):
      raise ValueError(
          f"host_op `{site.name}` returned non-finite values (NaN/inf) at "
          f"{int(np.max(count))} perturbed point(s) of its `grad={est.name!r}` "
          "estimate where its unperturbed value is finite: the perturbation "
          "left the function's domain. Use a smaller `step=` "
          f"(`xcs_jax.grad.{est.name}(step=...)`) or keep the input "
          "inside the function's domain (away from its boundary).")
    return np.zeros(count.shape, np.float32)

  call = site.make_host_call(check, lambda c: jax.ShapeDtypeStruct((), jnp.float32),
                             f"{site.name}.{est.name}_check")
  return jax.lax.stop_gradient(call(jax.lax.stop_gradient(bad)))


def _zero_tangent(o):
  if _is_float(o):
    return jnp.zeros(o.shape, o.dtype)
  return np.zeros(o.shape, jax.dtypes.float0)


def _directions_key(seed: int, xs) -> jax.Array:
  """`fold_in(key(seed), hash(xs))`: fresh directions wherever the inputs move."""
  h = jnp.uint32(0x9E3779B9)
  for x in xs:
    if _is_float(x):
      bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    else:
      bits = x.astype(jnp.uint32)
    bits = bits.ravel()
    idx = jnp.arange(bits.size, dtype=jnp.uint32)
    mixed = (bits ^ (idx * jnp.uint32(0x85EBCA6B))) * jnp.uint32(0xC2B2AE35)
    h = (h ^ jnp.sum(mixed ^ (mixed >> 13), dtype=jnp.uint32)) * jnp.uint32(0x27D4EB2F)
  return jax.random.fold_in(jax.random.PRNGKey(seed), h)


# ---------------------------------------------------------------- host VJP


def _host_vjp_call(est: HostVJP, site: CallSite, leaves) -> list:
  float_in = [i for i, x in enumerate(leaves) if _is_float(x)]
  float_out = [k for k, o in enumerate(site.out_avals) if _is_float(o)]

  def host_vjp(primal_leaves, out_leaves, out_cts):
    cts = [None] * len(out_leaves)
    for k, ct in zip(float_out, out_cts):
      cts[k] = ct
    primals = jax.tree_util.tree_unflatten(site.in_treedef, list(primal_leaves))
    result = est.fn(primals, jax.tree_util.tree_unflatten(site.out_treedef, list(out_leaves)),
                    jax.tree_util.tree_unflatten(site.out_treedef, cts))
    return _check_vjp_result(result, primals, site.name, float_in)

  def spec(primal_specs, unused_outs, unused_cts):
    return [jax.ShapeDtypeStruct(primal_specs[i].shape, primal_specs[i].dtype)
            for i in float_in]

  vjp_call = site.make_host_call(host_vjp, spec, f"{site.name}.vjp")

  @jax.custom_vjp
  def call(xs):
    return site.bind(xs, [False] * len(xs), 0)

  def fwd(xs):
    outs = call(xs)
    return outs, (xs, outs)

  def bwd(res, cts):
    xs, outs = res
    in_cts = vjp_call(list(xs), list(outs), [cts[k] for k in float_out])
    grads = [None] * len(xs)
    for i, g in zip(float_in, in_cts):
      grads[i] = g
    return (grads,)

  call.defvjp(fwd, bwd)
  return call(list(leaves))


def _check_vjp_result(result, primals: tuple, name: str, float_in: Sequence[int]):
  """The float-input cotangents of a user VJP's result, checked against primals."""
  def fail(problem):
    raise TypeError(_BAD_VJP_RESULT.format(name=name, problem=problem, nargs=len(primals)))

  if not isinstance(result, (tuple, list)):
    fail(f"returned a {type(result).__name__}")
  if len(result) != len(primals):
    fail(f"returned {len(result)} entries")
  flat = []
  for a, (primal, ct) in enumerate(zip(primals, result)):
    p_leaves, p_tree = jax.tree_util.tree_flatten(primal)
    if ct is None:
      flat.extend([None] * len(p_leaves))
      continue
    c_leaves, c_tree = jax.tree_util.tree_flatten(ct, is_leaf=lambda v: v is None)
    if c_tree != p_tree and len(p_leaves) == 1 and len(c_leaves) == 1:
      c_tree = p_tree  # a bare array for a one-leaf argument
    if c_tree != p_tree:
      fail(f"returned a {c_tree} for argument {a}, whose structure is {p_tree}")
    for leaf, (p, c) in enumerate(zip(p_leaves, c_leaves)):
      if c is not None:
        c = np.asarray(c)
        p_shape = np.shape(p)
        if c.shape != p_shape:
          fail(f"returned a cotangent of shape {c.shape} for argument {a} (leaf {leaf}), "
               f"whose shape is {p_shape}")
        if not np.issubdtype(c.dtype, np.number) or np.issubdtype(c.dtype, np.complexfloating):
          fail(f"returned a cotangent of dtype {c.dtype} for argument {a} (leaf {leaf})")
        if not np.all(np.isfinite(c)):
          raise ValueError(
              f"`{name}.vjp` (the `grad=` callable of host_op `{name}`) returned "
              f"{int(np.size(c) - np.sum(np.isfinite(c)))} non-finite (NaN/inf) "
              f"cotangent value(s) for argument {a} (leaf {leaf}). Return finite "
              "values (0 where the output does not depend on the input).")
      flat.append(c)
  all_leaves = jax.tree_util.tree_leaves(list(primals))
  return [np.zeros(np.shape(all_leaves[i]), np.asarray(all_leaves[i]).dtype)
          if flat[i] is None else flat[i].astype(np.asarray(all_leaves[i]).dtype)
          for i in float_in]
