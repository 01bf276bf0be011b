"""Passes 3c and 3d: the values going into and coming out of batched calls.

`batch_sibling_calls` turns call sites that start together into one batched
call between a `STACK` of their inputs and an `UNSTACK` of their outputs.
Left as they are, the many small values around it would cost one operation
each, and XLA compiles a segment of many small operations slowly. These
passes give the batched call whole arrays instead, by exact rewrites:

- `vectorize_stacks` (before the call): a `STACK` of rows `i0, ..., i0 + g - 1`
  of one array is that slice of the array; a `STACK` of the results of sibling
  operations (the same elementwise or shape operation with the same params,
  e.g. `x + i` for i in range(g)) is one vectorized operation on stacked
  operands (`pseudo.VMAP`), and so on up through their operands.
- `vectorize_unstacks` (after the call): the same operation applied to every
  row of the call's output (`score_options(p_i, options)[0]`) is one
  vectorized operation on the whole output, followed by an `UNSTACK`;
- `fold_reductions` (after the call): a chain of one commutative binary op
  over the call's rows (`sum(op(x + i) for i in ...)`) is one sequential
  `pseudo.FOLD` (same operations, same order, so bit-equal values);
  `jnp.stack` / `jnp.array` of all the rows in order is the stacked output
  itself.

Only operations whose vectorized form computes each element exactly as the
scalar form does are vectorized (`rowwise.EXACT_ELEMENTWISE`: arithmetic,
comparisons, selection, casts; and shape and indexing operations; no
reductions or transcendental functions, whose vectorized kernels may round
differently). A `STACK` or `UNSTACK` left
over runs on the host beside its call (see `partition.py`).
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any

import numpy as np

from xcs_jax._src import compat
from xcs_jax._src.jit.ir import Eqn, Lit, Program, sort_eqns
from xcs_jax._src.jit.partition import live_eqns
from xcs_jax._src.jit.pseudo import FOLD, ROWS, STACK, UNSTACK, VMAP
from xcs_jax._src.jit.rowwise import EXACT_ELEMENTWISE

VECTORIZABLE = EXACT_ELEMENTWISE | {
    "broadcast_in_dim", "reshape", "squeeze", "expand_dims", "slice", "dynamic_slice",
    "dynamic_update_slice", "concatenate", "pad", "transpose", "rev", "stack",
    "gather", "iota", "jit", "pjit",
}

FOLDABLE = frozenset({"add", "mul", "max", "min", "and", "or", "xor"})
# Bitwise commutative in IEEE arithmetic, so a step's operand order does not
# matter; max and min (signed zeros) fold only when every step has the same order.
_ORDER_FREE = frozenset({"add", "mul", "and", "or", "xor"})
MIN_CHAIN = 4
"""Shorter chains are left as they are (nothing to gain)."""


# -- what a program knows about its refs ------------------------------------------

class _Index:
  """Producers and reader counts of a program's live eqns."""

  def __init__(self, prog: Program, eqns: list):
    self.eqns = eqns
    self.producer = {o: i for i, e in enumerate(eqns) for o in e.outs}
    self.readers = collections.Counter(r for e in eqns for r in e.ins if isinstance(r, int))
    self.readers.update(r for r in prog.outvars if isinstance(r, int))

  def made_by(self, ref) -> Eqn | None:
    i = self.producer.get(ref) if isinstance(ref, int) else None
    return None if i is None else self.eqns[i]

  def row_of(self, ref, avals: dict) -> tuple[int, int] | None:
    """(array ref, row) if `ref` is one row of an array along its first axis:
    an `UNSTACK` output, or `squeeze(slice(a, i:i+1))` (what `a[i]` traces to)."""
    e = self.made_by(ref)
    if e is None:
      return None
    if e.primitive is UNSTACK:
      return e.ins[0], e.outs.index(ref)
    if e.name != "squeeze" or tuple(e.params.get("dimensions", ())) != (0,):
      return None
    s = self.made_by(e.ins[0])
    if s is None or s.name != "slice" or s.params.get("strides") not in (None, ()):
      return None
    a = s.ins[0]
    if not isinstance(a, int):
      return None
    shape = avals[a].shape
    start, limit = s.params["start_indices"], s.params["limit_indices"]
    if (limit[0] - start[0] != 1 or any(st != 0 for st in start[1:])
        or tuple(limit[1:]) != tuple(shape[1:])):
      return None
    return a, start[0]


def _consecutive_rows(index: _Index, refs, avals) -> tuple[int, int] | None:
  """(array, first row) if `refs` are consecutive rows of one array, in order."""
  rows = [index.row_of(r, avals) for r in refs]
  if any(r is None for r in rows) or len({a for a, _ in rows}) != 1:
    return None
  first = rows[0][1]
  if [i for _, i in rows] != list(range(first, first + len(rows))):
    return None
  return rows[0][0], first


@dataclasses.dataclass
class _Rewriter:
  """Accumulates replaced eqns, new eqns and ref renames, then rebuilds."""
  prog: Program
  avals: dict
  removed: set = dataclasses.field(default_factory=set)
  added: list = dataclasses.field(default_factory=list)
  renames: dict = dataclasses.field(default_factory=dict)
  _next: int = -1

  def fresh(self, aval) -> int:
    if self._next < 0:
      self._next = max(self.avals) + 1
    ref, self._next = self._next, self._next + 1
    self.avals[ref] = aval
    return ref

  def program(self, eqns: list) -> Program:
    if not self.removed and not self.added and not self.renames:
      return self.prog

    def rename(r):
      while isinstance(r, int) and r in self.renames:
        r = self.renames[r]
      return r
    kept = [dataclasses.replace(e, ins=tuple(rename(r) for r in e.ins))
            for e in eqns + self.added if id(e) not in self.removed]
    prog = dataclasses.replace(self.prog, eqns=kept, avals=self.avals,
                               outvars=[rename(r) for r in self.prog.outvars])
    prog = dataclasses.replace(prog, eqns=sort_eqns(kept, prog))
    return dataclasses.replace(prog, eqns=live_eqns(prog))


# -- before the call ---------------------------------------------------------------

def _vectorizable(eqn: Eqn) -> bool:
  if eqn.name not in VECTORIZABLE or len(eqn.outs) != 1:
    return False
  if eqn.name in ("jit", "pjit"):
    body = compat.open_jaxpr(eqn.params.get("jaxpr"))
    return all(e.primitive.name in VECTORIZABLE and e.primitive.name not in ("jit", "pjit")
               for e in body.eqns)
  return True


def _same_params(a: dict, b: dict) -> bool:
  try:
    return bool(a == b)
  except Exception:  # noqa: BLE001 - params that cannot be compared are not equal
    return False


def vectorize_stacks(prog: Program) -> Program:
  eqns = live_eqns(prog)
  index = _Index(prog, eqns)
  rw = _Rewriter(prog, dict(prog.avals))
  work = collections.deque(e for e in eqns if e.primitive is STACK)
  while work:
    stack = work.popleft()
    out = stack.outs[0]
    rows = _consecutive_rows(index, stack.ins, rw.avals)
    if rows is not None:
      array, first = rows
      if first == 0 and rw.avals[array].shape[0] == len(stack.ins):
        rw.renames[out] = array
      else:
        rw.added.append(Eqn(ROWS, dict(start=first, stop=first + len(stack.ins)),
                            (array,), (out,)))
      rw.removed.add(id(stack))
      continue
    siblings = [index.made_by(r) for r in stack.ins]
    first = siblings[0]
    if (first is None or not _vectorizable(first)
        or any(s is None or s.primitive is not first.primitive
               or not _same_params(s.params, first.params) for s in siblings)
        or any(index.readers[r] != 1 for r in stack.ins)):
      continue
    columns = [[s.ins[k] for s in siblings] for k in range(len(first.ins))]
    if any(any(isinstance(r, Lit) for r in c) and not all(isinstance(r, Lit) for r in c)
           for c in columns):
      continue    # a literal beside refs: leave this stack as it is
    operands, in_axes = [], []
    for column in columns:
      if all(isinstance(r, Lit) for r in column):
        values = [r.value for r in column]
        if all(_same_literal(v, values[0]) for v in values):
          operands.append(column[0])
          in_axes.append(None)
        else:
          operands.append(Lit(np.stack([np.asarray(v) for v in values])))
          in_axes.append(0)
      elif all(r == column[0] for r in column):
        operands.append(column[0])
        in_axes.append(None)
      else:
        aval = rw.avals[column[0]]
        stacked = rw.fresh(compat.ShapedArray((len(column),) + tuple(aval.shape),
                                              aval.dtype))
        new_stack = Eqn(STACK, {}, tuple(column), (stacked,))
        rw.added.append(new_stack)
        work.append(new_stack)
        operands.append(stacked)
        in_axes.append(0)
    rw.added.append(Eqn(VMAP, dict(primitive=first.primitive,
                                   params=tuple(sorted(first.params.items())),
                                   in_axes=tuple(in_axes), size=len(siblings)),
                       tuple(operands), (out,)))
    rw.removed.add(id(stack))
  return rw.program(eqns)


def _params_key(params: dict):
  try:
    key = tuple(sorted(params.items()))
    hash(key)
  except TypeError:
    return None
  return key


def _operand_key(r) -> tuple:
  if isinstance(r, Lit):
    a = np.asarray(r.value)
    return ("lit", type(r.value).__name__, str(a.dtype), a.shape, a.tobytes())
  return ("ref", r)


def vectorize_unstacks(prog: Program) -> Program:
  eqns = live_eqns(prog)
  readers = collections.defaultdict(list)
  for e in eqns:
    for r in e.ins:
      if isinstance(r, int):
        readers[r].append(e)
  rw = _Rewriter(prog, dict(prog.avals))
  work = collections.deque(e for e in eqns if e.primitive is UNSTACK)
  while work:
    unstack = work.popleft()
    groups = collections.defaultdict(list)
    for row, r in enumerate(unstack.outs):
      for e in readers.get(r, ()):
        if id(e) in rw.removed or not _vectorizable(e) or e.ins.count(r) != 1:
          continue
        k = e.ins.index(r)
        params = _params_key(e.params)
        if params is None:
          continue
        others = tuple(_operand_key(x) for pos, x in enumerate(e.ins) if pos != k)
        groups[(e.primitive, params, k, others)].append((row, e))
    for (primitive, params, k, _), members in groups.items():
      if sorted(row for row, _ in members) != list(range(len(unstack.outs))):
        continue
      members.sort(key=lambda m: m[0])
      first = members[0][1]
      out = rw.avals[first.outs[0]]
      stacked = rw.fresh(compat.ShapedArray((len(members),) + tuple(out.shape), out.dtype))
      operands = tuple(unstack.ins[0] if pos == k else x for pos, x in enumerate(first.ins))
      in_axes = tuple(0 if pos == k else None for pos in range(len(first.ins)))
      rw.added.append(Eqn(VMAP, dict(primitive=primitive, params=params, in_axes=in_axes,
                                     size=len(members)), operands, (stacked,)))
      rows = Eqn(UNSTACK, {}, (stacked,), tuple(e.outs[0] for _, e in members))
      rw.added.append(rows)
      rw.removed.update(id(e) for _, e in members)
      work.append(rows)
  return rw.program(eqns)


def _same_literal(a: Any, b: Any) -> bool:
  return (type(a) is type(b) and np.result_type(a) == np.result_type(b)
          and bool(np.array_equal(a, b)))


# -- after the call ----------------------------------------------------------------

@dataclasses.dataclass
class _Step:
  eqn: Eqn
  acc: Any           # the accumulator operand (a ref or a literal)
  array: int         # the stacked array the row comes from
  row: int
  acc_first: bool


def _as_step(eqn: Eqn, index: _Index, avals: dict) -> _Step | None:
  if eqn.name not in FOLDABLE or len(eqn.ins) != 2 or len(eqn.outs) != 1:
    return None
  out = avals[eqn.outs[0]]
  for k in (1, 0):  # prefer the second operand as the row: `acc + y_i`
    r = eqn.ins[k]
    got = index.row_of(r, avals) if isinstance(r, int) else None
    if got is not None and avals[r].shape == out.shape and avals[r].dtype == out.dtype:
      return _Step(eqn, eqn.ins[1 - k], got[0], got[1], acc_first=(k == 1))
  return None


def fold_reductions(prog: Program) -> Program:
  eqns = live_eqns(prog)
  index = _Index(prog, eqns)
  rw = _Rewriter(prog, dict(prog.avals))
  steps = {}
  for e in eqns:
    step = _as_step(e, index, rw.avals)
    if step is not None:
      steps[e.outs[0]] = step

  def predecessor(step: _Step) -> _Step | None:
    """The step whose output is `step`'s accumulator, and read by nothing else."""
    prev = steps.get(step.acc) if isinstance(step.acc, int) else None
    if (prev is None or index.readers[step.acc] != 1 or prev.array != step.array
        or prev.eqn.primitive is not step.eqn.primitive
        or not _same_params(prev.eqn.params, step.eqn.params)):
      return None
    return prev

  successor = {}
  for step in steps.values():
    prev = predecessor(step)
    if prev is not None:
      successor[id(prev)] = step
  followers = {id(s) for s in successor.values()}
  for head in steps.values():
    if id(head) in followers:
      continue
    chain = [head]
    while id(chain[-1]) in successor:
      chain.append(successor[id(chain[-1])])
    orders = {s.acc_first for s in chain}
    if len(chain) < MIN_CHAIN or (head.eqn.name not in _ORDER_FREE and len(orders) > 1):
      continue
    params = dict(primitive=head.eqn.primitive,
                  params=tuple(sorted(head.eqn.params.items())),
                  indices=tuple(s.row for s in chain),
                  acc_first=orders.pop() if len(orders) == 1 else True)
    rw.added.append(Eqn(FOLD, params, (head.acc, head.array), (chain[-1].eqn.outs[0],)))
    rw.removed.update(id(s.eqn) for s in chain)

  for e in eqns:     # jnp.stack / jnp.array of every row, in order: the array itself
    rows = _restacked_rows(e, index, rw.avals)
    if rows is not None:
      rw.renames[e.outs[0]] = rows
      rw.removed.add(id(e))
  return rw.program(eqns)


def _restacked_rows(e: Eqn, index: _Index, avals: dict) -> int | None:
  """The array whose rows `e` stacks back, all of them in order, else None."""
  if e.name == "stack" and e.params.get("axis") == 0:
    refs = e.ins
  elif e.name == "concatenate" and e.params.get("dimension") == 0:
    refs = []
    for r in e.ins:      # `jnp.array([...])`: each row broadcast to shape (1, ...)
      b = index.made_by(r)
      if b is None or b.name != "broadcast_in_dim" or not isinstance(b.ins[0], int):
        return None
      if tuple(avals[r].shape) != (1,) + tuple(avals[b.ins[0]].shape):
        return None
      refs.append(b.ins[0])
  else:
    return None
  rows = _consecutive_rows(index, refs, avals)
  if rows is None or rows[1] != 0:
    return None
  array, out = rows[0], avals[e.outs[0]]
  if avals[array].shape != out.shape or avals[array].dtype != out.dtype:
    return None
  return array
