"""The one place that imports from `jax.extend`, `jax.interpreters` and `jax.core`.

`jax.extend` carries no compatibility promise across releases, and jaxpr types
moved between jax 0.4.38, 0.10 and 0.12 (`ClosedJaxpr` and `Jaxpr` merged in
0.11). Everything version-sensitive the library needs is named here, once.
"""
from __future__ import annotations

from typing import Any, Iterator

import jax
import numpy as np
from jax.experimental import io_callback  # noqa: F401  (re-exported)
from jax.extend import core as jex_core
from jax.interpreters import ad, batching, mlir  # noqa: F401  (re-exported)

Primitive = jex_core.Primitive
Literal = jex_core.Literal
Var = jex_core.Var
ClosedJaxpr = jex_core.ClosedJaxpr
jaxpr_as_fun = jex_core.jaxpr_as_fun

try:  # jax >= 0.4.36
  Tracer = jax.core.Tracer
except AttributeError:  # pragma: no cover - very new jax
  from jax._src.core import Tracer  # type: ignore

register_lowering = mlir.register_lowering
lower_fun = mlir.lower_fun
primitive_batchers = batching.primitive_batchers
not_mapped = getattr(batching, "not_mapped", None)  # None in every released jax
primitive_jvps = ad.primitive_jvps
primitive_transposes = ad.primitive_transposes


def is_tracer(x: Any) -> bool:
  return isinstance(x, Tracer)


def symbolic_zero(aval) -> Any:
  """A symbolic-zero tangent (`ad.Zero.from_primal_value` is missing on 0.10.2)."""
  return ad.Zero(aval.to_tangent_aval())


def is_symbolic_zero(t: Any) -> bool:
  return type(t) is ad.Zero


def open_jaxpr(j: Any) -> Any:
  """The open jaxpr (with `.eqns`, `.invars`, ...) of a Jaxpr or ClosedJaxpr."""
  return getattr(j, "jaxpr", j)


def jaxpr_consts(j: Any) -> list:
  """The consts of a ClosedJaxpr (on jax >= 0.11 a Jaxpr may carry them too)."""
  return list(getattr(j, "consts", ()) or ())


def iter_param_jaxprs(params: dict) -> Iterator[tuple[str, Any]]:
  """Yields (param name, jaxpr) for every jaxpr held in an eqn's params.

  Duck-typed: a value counts as a jaxpr when it (or its `.jaxpr`) has `eqns`.
  Tuples (the branches of `cond`) are searched one level deep.
  """
  for name, value in params.items():
    values = value if isinstance(value, (tuple, list)) else (value,)
    for v in values:
      if hasattr(open_jaxpr(v), "eqns"):
        yield name, v

ShapedArray = jax.core.ShapedArray


def get_aval(x: Any) -> Any:
  """The abstract value of an array or tracer."""
  aval = getattr(x, "aval", None)
  if aval is not None:
    return aval
  return ShapedArray(np.shape(x), np.result_type(x))


DropVar = getattr(jex_core, "DropVar", None)


def is_drop_var(v: Any) -> bool:
  return (DropVar is not None and isinstance(v, DropVar)) or type(v).__name__ == "DropVar"


def bind_eqn(primitive, params: dict, args: list) -> list:
  """Binds `primitive` as `eval_jaxpr` would (sub-jaxprs become bind args)."""
  got = primitive.get_bind_params(params)
  if isinstance(got, tuple):  # jax < 0.7: (subfuns, params)
    subfuns, bind_params = got
  else:
    subfuns, bind_params = (), got
  out = primitive.bind(*subfuns, *args, **bind_params)
  return list(out) if primitive.multiple_results else [out]


def scan_layout(params: dict) -> tuple[int, int]:
  """(num_consts, num_carry) of a `scan` eqn."""
  if "num_consts" in params:
    return params["num_consts"], params["num_carry"]
  if "ft_in" in params:  # jax >= 0.12: a flat tree of (consts, carry, xs)
    consts, carry, _ = params["ft_in"].unpack()
    return len(list(consts.vals)), len(list(carry.vals))
  raise NotImplementedError(  # pragma: no cover - a jax that renamed them again
      f"xcs_jax does not know this jax's scan params {sorted(params)}")
