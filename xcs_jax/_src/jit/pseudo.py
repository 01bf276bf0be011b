"""Tensor operations the passes insert into a program, and how segments run them.

They are not JAX primitives: a segment evaluates them with `jax.numpy` /
`lax` while it is traced for compilation (`bind_pseudo`), so they cost
nothing at run time beyond the XLA code they become.

- `STACK`: g values of one shape -> one array with a leading axis g;
- `UNSTACK`: the inverse;
- `ROWS`: rows `start:stop` of an array;
- `VMAP`: one primitive applied to stacked operands (`jax.vmap` of it, with
  `in_axes`): what g sibling applications of it compute, as one operation;
- `FOLD`: `acc = op(acc, xs[i])` for i in `indices`, in that order (a
  sequential `lax.scan`, so floating-point results equal the chain of
  binary ops it replaces, bit for bit).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from xcs_jax._src import compat
from xcs_jax._src.jit.ir import Eqn


@dataclasses.dataclass(frozen=True)
class PseudoPrimitive:
  """A tensor operation the passes insert; segments evaluate it with jnp."""
  name: str
  multiple_results: bool = True


STACK = PseudoPrimitive("xcs_stack")      # ins: g values -> outs: [stacked]
UNSTACK = PseudoPrimitive("xcs_unstack")  # ins: [stacked] -> outs: g values
ROWS = PseudoPrimitive("xcs_rows")        # ins: [array] -> outs: [array[start:stop]]
VMAP = PseudoPrimitive("xcs_vmap")        # ins: operands -> outs: [result]
FOLD = PseudoPrimitive("xcs_fold")        # ins: [init, stacked] -> outs: [result]
STREAM = PseudoPrimitive("xcs_stream")    # a chain of calls run item by item (streams.py)
"""`FOLD` params: `primitive` and `params` of the binary op, `indices` (rows
of the stacked array, in order) and `acc_first` (the accumulator is the
op's first operand)."""


def _fold(init, stacked, *, primitive, params, indices, acc_first):
  params = dict(params)
  # A literal start (`sum` starts from 0) is typed and broadcast as the op would.
  init = jnp.broadcast_to(lax.convert_element_type(init, stacked.dtype), stacked.shape[1:])

  def step(acc, x):
    args = [acc, x] if acc_first else [x, acc]
    return compat.bind_eqn(primitive, params, args)[0], None

  start = indices[0]
  if tuple(indices) == tuple(range(start, start + len(indices))):
    xs = lax.slice_in_dim(stacked, start, start + len(indices))
  else:
    xs = stacked[jnp.asarray(indices)]
  return lax.scan(step, init, xs)[0]


def _vmap(*operands, primitive, params, in_axes, size):
  params = dict(params)
  return jax.vmap(lambda *xs: compat.bind_eqn(primitive, params, list(xs))[0],
                  in_axes=in_axes, axis_size=size)(*operands)


def bind_pseudo(eqn: Eqn, values: list) -> list | None:
  """Evaluates an inserted eqn (inside a traced segment); None for real ones."""
  if eqn.primitive is STACK:
    return [jnp.stack(values)]
  if eqn.primitive is UNSTACK:
    (stacked,) = values
    return [stacked[i] for i in range(len(eqn.outs))]
  if eqn.primitive is ROWS:
    return [lax.slice_in_dim(values[0], eqn.params["start"], eqn.params["stop"])]
  if eqn.primitive is VMAP:
    return [_vmap(*values, **eqn.params)]
  if eqn.primitive is FOLD:
    return [_fold(*values, **eqn.params)]
  return None


def run_on_host(eqn: Eqn, values: list) -> list:
  """A `STACK` or `UNSTACK` beside a host call, in numpy (see partition.py)."""
  if eqn.primitive is STACK:
    return [np.stack([np.asarray(v) for v in values])]
  (stacked,) = values
  return list(np.asarray(stacked))
