"""Pass 3b, batch sibling calls: call sites that would start together, and whose
results are waited for together, become one batched call, as if the user had
written `vmap`.

Unbatched calls of the same op with the same input shapes and the same set
of host-call ancestors become ready at (almost) the same moment; when their
outputs are also read by the same equations (all of them feed one `stack`,
say), nothing downstream could start before the slowest of them anyway.
Only then are they batched, so a fast call's own downstream work never
waits on a slow sibling. Rewritten as
stack -> one batched host call -> unstack, they run exactly as a `vmap` of the
op does: one node, fanned out on the op's pool, while the many small
per-call values never pass through the scheduler one by one. Each item keeps
its own source line for errors. The analysis (stats, `explain`) is made on the
program before this pass, so it still counts every call site.

Not applied under `max_concurrency` (a batched call is one node there) and
not to vectorized host ops (their function sees whole batches).
"""
from __future__ import annotations

import collections
import dataclasses
import heapq

import jax.numpy as jnp

from xcs_jax._src import compat
from xcs_jax._src.jit.classify import Kind, classify
from xcs_jax._src.jit.ir import Eqn, Program
from xcs_jax._src.jit.partition import live_eqns
from xcs_jax._src.primitives import HOST_PRIMITIVES


@dataclasses.dataclass(frozen=True)
class _PseudoPrimitive:
  """A tensor operation the passes insert; segments evaluate it with jnp."""
  name: str
  multiple_results: bool = True


STACK = _PseudoPrimitive("xcs_stack")      # ins: g values -> outs: [stacked]
UNSTACK = _PseudoPrimitive("xcs_unstack")  # ins: [stacked] -> outs: g values


def bind_pseudo(eqn: Eqn, values: list) -> list | None:
  """Evaluates an inserted eqn (inside a traced segment); None for real ones."""
  if eqn.primitive is STACK:
    return [jnp.stack(values)]
  if eqn.primitive is UNSTACK:
    (stacked,) = values
    return [stacked[i] for i in range(len(eqn.outs))]
  return None


def _ancestor_keys(eqns: list) -> dict:
  """eqn index -> frozenset of the host-call eqn indices its inputs depend on."""
  ancestors: dict[int, frozenset] = {}
  keys = {}
  for i, eqn in enumerate(eqns):
    key = frozenset().union(*(ancestors.get(r, ()) for r in eqn.ins if isinstance(r, int)))
    keys[i] = key
    out_key = key if classify(eqn) is Kind.TENSOR else key | {i}
    for o in eqn.outs:
      ancestors[o] = out_key
  return keys


def _readers(eqns: list, prog: Program) -> dict:
  """ref -> the eqn indices reading it (-1: a program output)."""
  readers = collections.defaultdict(set)
  for i, eqn in enumerate(eqns):
    for r in eqn.ins:
      if isinstance(r, int):
        readers[r].add(i)
  for r in prog.outvars:
    if isinstance(r, int):
      readers[r].add(-1)
  return readers


def _is_call(eqn: Eqn) -> bool:
  return eqn.primitive in HOST_PRIMITIVES


def _batchable(eqn: Eqn) -> bool:
  p = eqn.params
  return (_is_call(eqn) and p["batch_ndim"] == 0
          and all(isinstance(r, int) for r in eqn.ins)
          and not getattr(p["op"], "vectorized", False))


def batch_sibling_calls(prog: Program) -> Program:
  eqns = live_eqns(prog)
  keys = _ancestor_keys(eqns)
  readers = _readers(eqns, prog)
  groups = collections.defaultdict(list)
  for i, eqn in enumerate(eqns):
    if _batchable(eqn):
      signature = tuple((tuple(prog.avals[r].shape), str(prog.avals[r].dtype))
                        for r in eqn.ins)
      waited_by = frozenset().union(*(readers[o] for o in eqn.outs))
      groups[(eqn.params["op"], signature, keys[i], waited_by)].append(i)
  groups = [g for g in groups.values() if len(g) > 1]
  if not groups:
    return prog

  avals = dict(prog.avals)
  next_id = max(avals) + 1

  def fresh(aval) -> int:
    nonlocal next_id
    avals[next_id] = aval
    next_id += 1
    return next_id - 1

  replaced = set()
  added = []
  for members in groups:
    calls = [eqns[i] for i in members]
    replaced.update(members)
    first = calls[0]
    stacked_ins = []
    for k, r in enumerate(first.ins):
      aval = avals[r]
      s = fresh(compat.ShapedArray((len(calls),) + tuple(aval.shape), aval.dtype))
      added.append(Eqn(STACK, {}, tuple(c.ins[k] for c in calls), (s,)))
      stacked_ins.append(s)
    stacked_outs = []
    for k, o in enumerate(first.outs):
      aval = avals[o]
      stacked_outs.append(fresh(compat.ShapedArray((len(calls),) + tuple(aval.shape),
                                                   aval.dtype)))
    params = dict(first.params, batch_ndim=1, in_batched=(True,) * len(stacked_ins),
                  source=tuple(c.params["source"] for c in calls))
    added.append(Eqn(first.primitive, params, tuple(stacked_ins), tuple(stacked_outs)))
    for k, s in enumerate(stacked_outs):
      added.append(Eqn(UNSTACK, {}, (s,), tuple(c.outs[k] for c in calls)))
  kept = [e for i, e in enumerate(eqns) if i not in replaced]
  return dataclasses.replace(prog, eqns=_topological(kept + added, prog), avals=avals)


def _topological(eqns: list, prog: Program) -> list:
  """`eqns` in an order where every ref is defined before it is read (stable)."""
  defined = set(prog.invars) | set(prog.consts)
  producer = {o: i for i, e in enumerate(eqns) for o in e.outs}
  waiting = {}
  readers = collections.defaultdict(list)
  for i, e in enumerate(eqns):
    needs = {r for r in e.ins if isinstance(r, int) and r not in defined}
    needs = {producer[r] for r in needs}
    waiting[i] = len(needs)
    for p in needs:
      readers[p].append(i)
  ready = [i for i, n in waiting.items() if n == 0]
  heapq.heapify(ready)
  order = []
  while ready:
    i = heapq.heappop(ready)
    order.append(eqns[i])
    for j in readers[i]:
      waiting[j] -= 1
      if waiting[j] == 0:
        heapq.heappush(ready, j)
  assert len(order) == len(eqns), "batch_sibling_calls made a cycle"
  return order
