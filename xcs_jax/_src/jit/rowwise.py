"""Which tensor operations compute each row of a batch from that row alone.

A batch here is the leading `k` axes (shape `B`) that `vmap` gives a batched
host call's inputs and outputs. An equation is *rowwise* when row `i` of its
output is the same operation applied to row `i` of its batched operands (and
its other operands whole). Then it can run one row at a time, on a batch of
one: operands sliced to `(1,) * k + rest`, the shape params rewritten the
same way. Streams (streams.py) use this to move each item of a vmapped chain
of calls on the moment its own row is ready.

`row_rule` answers for one equation: None (not provably rowwise: the
equation then runs on the whole batch, after the call), or each operand's
mode (`ROW`: sliced to its row, `WHOLE`: passed as is) and the params for a
batch of one. The rules are exact by construction: they cover elementwise
operations, casts and selections, shape and slicing operations that keep the
batch axes in front, reductions of integers or over other axes with exact
order-free results, and nested `jit` bodies made of those.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from xcs_jax._src import compat

ROW, WHOLE = "row", "whole"

EXACT_ELEMENTWISE = frozenset({
    "add", "sub", "mul", "div", "rem", "neg", "max", "min", "abs", "sign", "floor",
    "ceil", "round", "integer_pow", "sqrt", "convert_element_type", "select_n", "clamp",
    "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "not", "xor", "shift_left",
    "shift_right_logical", "shift_right_arithmetic", "is_finite", "copy", "copy_p",
    "nextafter", "population_count", "clz",
})
"""Per element, one correctly rounded (or exact) operation: the same value at
any array size. Transcendental functions (exp, log, tanh, ...) are left out:
XLA may compute them with a vector approximation for long arrays and a
scalar one for short tails, which can differ in the last place."""

EXACT_REDUCTIONS = frozenset({"reduce_max", "reduce_min", "reduce_and", "reduce_or",
                              "reduce_xor", "argmax", "argmin"})
ORDERED_REDUCTIONS = frozenset({"reduce_sum", "reduce_prod"})
"""Exact for integers and booleans only (float sums may be vectorized across
the batch in another order)."""


@dataclasses.dataclass(frozen=True)
class RowRule:
  modes: tuple           # per operand: ROW or WHOLE
  params: Any            # the params for a batch of one (a dict), or a `RowBody`


@dataclasses.dataclass(frozen=True)
class RowBody:
  """A nested `jit` body, each equation with its rule."""
  jaxpr: Any
  rules: tuple           # one RowRule per equation of the body
  row_vars: frozenset    # ids of body vars that hold rows


def _shape(aval) -> tuple:
  return tuple(getattr(aval, "shape", ()))


def _one(shape: Sequence[int], k: int) -> tuple:
  return (1,) * k + tuple(shape[k:])


def row_rule(name: str, params: dict, in_avals: list, out_avals: list,
             row_ins: Sequence[bool], batch: tuple) -> RowRule | None:
  """How to compute one row of this equation, or None if it is not rowwise.

  Args:
    row_ins: which operands hold rows (are derived from a call's rows); they
      must be used as rows.
    batch: the batch shape `B` (the leading axes of every row value).
  """
  k = len(batch)
  outs = [_shape(a) for a in out_avals]
  if not outs or any(o[:k] != batch for o in outs):
    return None
  ins = [_shape(a) for a in in_avals]
  rule = _RULES.get(name)
  if rule is None and name in EXACT_ELEMENTWISE:
    rule = _elementwise
  if rule is None and name in ("jit", "pjit"):
    rule = _nested
  if rule is None:
    return None
  got = rule(params, ins, outs, in_avals, row_ins, batch, k)
  if got is None:
    return None
  if any(r and m != ROW for r, m in zip(row_ins, got.modes)):
    return None            # a row value used whole: needs the full batch
  return got


def _elementwise(params, ins, outs, in_avals, row_ins, batch, k):
  modes = []
  for shape in ins:
    if shape[:k] == batch and len(shape) == len(outs[0]):
      modes.append(ROW)
    elif shape == () or (len(shape) == len(outs[0]) and all(d == 1 for d in shape[:k])):
      modes.append(WHOLE)  # broadcast over the batch
    else:
      return None
  return RowRule(tuple(modes), dict(params))


def _broadcast_in_dim(params, ins, outs, in_avals, row_ins, batch, k):
  dims = tuple(int(d) for d in params["broadcast_dimensions"])
  operand = ins[0]
  maps_batch = [d for d in dims if d < k]
  if maps_batch:
    if dims[:k] != tuple(range(k)) or operand[:k] != batch:
      return None
    mode = ROW
  else:
    mode = WHOLE
  new = dict(params, shape=_one(params["shape"], k))
  return RowRule((mode,) + (WHOLE,) * (len(ins) - 1), new)


def _reshape(params, ins, outs, in_avals, row_ins, batch, k):
  if params.get("dimensions") not in (None, ()) or ins[0][:k] != batch:
    return None
  new_sizes = tuple(params["new_sizes"])
  if new_sizes[:k] != batch:
    return None
  return RowRule((ROW,) + (WHOLE,) * (len(ins) - 1),
                 dict(params, new_sizes=_one(new_sizes, k)))


def _squeeze(params, ins, outs, in_avals, row_ins, batch, k):
  if ins[0][:k] != batch or any(int(d) < k for d in params["dimensions"]):
    return None
  return RowRule((ROW,), dict(params))


def _slice(params, ins, outs, in_avals, row_ins, batch, k):
  start, limit = tuple(params["start_indices"]), tuple(params["limit_indices"])
  strides = params.get("strides")
  if (ins[0][:k] != batch or any(start[:k]) or limit[:k] != batch
      or (strides is not None and any(s != 1 for s in strides[:k]))):
    return None
  return RowRule((ROW,), dict(params, limit_indices=_one(limit, k)))


def _concatenate(params, ins, outs, in_avals, row_ins, batch, k):
  if int(params["dimension"]) < k or any(s[:k] != batch for s in ins):
    return None
  return RowRule((ROW,) * len(ins), dict(params))


def _pad(params, ins, outs, in_avals, row_ins, batch, k):
  config = params["padding_config"]
  if ins[0][:k] != batch or any(tuple(c) != (0, 0, 0) for c in config[:k]):
    return None
  return RowRule((ROW, WHOLE), dict(params))


def _transpose(params, ins, outs, in_avals, row_ins, batch, k):
  perm = tuple(int(p) for p in params["permutation"])
  if ins[0][:k] != batch or perm[:k] != tuple(range(k)):
    return None
  return RowRule((ROW,), dict(params))


def _rev(params, ins, outs, in_avals, row_ins, batch, k):
  if ins[0][:k] != batch or any(int(d) < k for d in params["dimensions"]):
    return None
  return RowRule((ROW,), dict(params))


def _iota(params, ins, outs, in_avals, row_ins, batch, k):
  if int(params["dimension"]) < k:
    return None     # the value changes along the batch
  return RowRule((), dict(params, shape=_one(params["shape"], k)))


def _reduction(params, ins, outs, in_avals, row_ins, batch, k, *, exact_any=True):
  axes = params.get("axes", params.get("axis", ()))
  axes = (axes,) if isinstance(axes, (int, np.integer)) else tuple(axes)
  if ins[0][:k] != batch or any(int(a) < k for a in axes):
    return None
  if not exact_any:
    dtype = np.dtype(in_avals[0].dtype)
    if not (np.issubdtype(dtype, np.integer) or dtype == np.bool_):
      return None
  return RowRule((ROW,) + (WHOLE,) * (len(ins) - 1), dict(params))


def _nested(params, ins, outs, in_avals, row_ins, batch, k):
  body = params.get("jaxpr")
  if body is None:
    return None
  j = compat.open_jaxpr(body)
  if compat.jaxpr_consts(body):
    return None
  rows = set()
  modes = []
  for v, shape, is_row in zip(j.invars, ins, row_ins):
    if is_row or shape[:k] == batch:
      rows.add(id(v))       # batch-shaped operands are passed as rows
      modes.append(ROW)
    else:
      modes.append(WHOLE)
  rules = []
  for e in j.eqns:
    row_in = [not isinstance(v, compat.Literal) and id(v) in rows for v in e.invars]
    if not any(row_in) and not any(_shape(v.aval)[:k] == batch for v in e.outvars):
      rules.append(RowRule((WHOLE,) * len(e.invars), dict(e.params)))  # a constant
      continue
    got = row_rule(e.primitive.name, e.params, [v.aval for v in e.invars],
                   [v.aval for v in e.outvars], row_in, batch)
    if got is None:
      return None
    rules.append(got)
    rows.update(id(v) for v in e.outvars)
  if not all(not isinstance(v, compat.Literal) and id(v) in rows for v in j.outvars):
    return None
  return RowRule(tuple(modes), RowBody(body, tuple(rules), frozenset(rows)))


_RULES = {
    "broadcast_in_dim": _broadcast_in_dim,
    "reshape": _reshape,
    "squeeze": _squeeze,
    "slice": _slice,
    "concatenate": _concatenate,
    "pad": _pad,
    "transpose": _transpose,
    "rev": _rev,
    "iota": _iota,
    **{n: _reduction for n in EXACT_REDUCTIONS},
    **{n: (lambda *a: _reduction(*a, exact_any=False)) for n in ORDERED_REDUCTIONS},
}


def bind_row(primitive, rule: RowRule, values: list) -> list:
  """Binds one equation on one row (values already sliced per `rule.modes`)."""
  if isinstance(rule.params, RowBody):
    return eval_row_body(rule.params, values)
  return compat.bind_eqn(primitive, rule.params, values)


def eval_row_body(body: RowBody, values: list) -> list:
  j = compat.open_jaxpr(body.jaxpr)
  env = dict(zip(map(id, j.invars), values))

  def read(v):
    return v.val if isinstance(v, compat.Literal) else env[id(v)]

  for e, rule in zip(j.eqns, body.rules):
    outs = bind_row(e.primitive, rule, [read(v) for v in e.invars])
    env.update(zip(map(id, e.outvars), outs))
  return [read(v) for v in j.outvars]
