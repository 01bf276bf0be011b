"""Pass 3b, batch sibling calls: call sites that would start together, and whose
results are waited for together, become one batched call, as if the user had
written `vmap`.

Unbatched calls of the same op with the same input shapes and the same set
of host-call ancestors become ready at (almost) the same moment; when their
outputs are also read by the same nodes (one tensor segment, such as the
epilogue that adds them up, or one `stack`), nothing downstream could start
before the slowest of them anyway.
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

from xcs_jax._src import compat
from xcs_jax._src.jit.classify import Kind
from xcs_jax._src.jit.ir import Eqn, Program, sort_eqns
from xcs_jax._src.jit.partition import segment_keys
from xcs_jax._src.jit.pseudo import STACK, UNSTACK
from xcs_jax._src.primitives import HOST_PRIMITIVES


def _is_call(eqn: Eqn) -> bool:
  return eqn.primitive in HOST_PRIMITIVES


def _batchable(eqn: Eqn) -> bool:
  p = eqn.params
  return (_is_call(eqn) and p["batch_ndim"] == 0
          and all(isinstance(r, int) for r in eqn.ins)
          and not getattr(p["op"], "vectorized", False))


def _waited_for_by(k, i: int, outvars: set) -> frozenset:
  """The nodes that read call i's outputs: tensor readers by their segment key
  (one segment waits for all its inputs at once), others by position."""
  nodes = set()
  for o in k.eqns[i].outs:
    if o in outvars:
      nodes.add(("output",))
    for j in k.readers.get(o, ()):
      nodes.add(("segment", k.keys[j]) if k.kinds[j] is Kind.TENSOR else ("node", j))
  return frozenset(nodes)


def batch_sibling_calls(prog: Program) -> Program:
  k = segment_keys(prog)
  eqns = k.eqns
  outvars = {r for r in prog.outvars if isinstance(r, int)}
  groups = collections.defaultdict(list)
  for i, eqn in enumerate(eqns):
    if _batchable(eqn):
      signature = tuple((tuple(prog.avals[r].shape), str(prog.avals[r].dtype))
                        for r in eqn.ins)
      groups[(eqn.params["op"], signature, k.ancestors[i],
              _waited_for_by(k, i, outvars))].append(i)
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
  return dataclasses.replace(prog, eqns=sort_eqns(kept + added, prog), avals=avals)
