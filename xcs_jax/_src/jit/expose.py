"""Pass 1, expose: inline nested calls so every host call site is visible.

Nested `jax.jit` (`jit`/`pjit`), `closed_call`, `custom_jvp_call` /
`custom_vjp_call` bodies and `checkpoint` (`remat2`) are inlined when they
contain a host call; calls without one stay whole (one tensor eqn). Control
flow (`cond`, `while`, `scan`) is not inlined: it becomes a control node.
Only the forward computation matters here, so dropping a custom rule while
inlining is safe.
"""
from __future__ import annotations

import itertools
from typing import Any

from xcs_jax._src import compat
from xcs_jax._src.jit.ir import Eqn, Lit, Program
from xcs_jax._src.primitives import HOST_PRIMITIVES

# primitive name -> the param holding the body whose invars are the eqn's invars.
INLINABLE = {
    "jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr", "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr",
    "remat2": "jaxpr", "checkpoint": "jaxpr",
}


def contains_host_call(jaxpr: Any, _memo: dict | None = None) -> bool:
  """Whether a jaxpr (or any jaxpr nested in its params) binds a host primitive."""
  memo = {} if _memo is None else _memo
  j = compat.open_jaxpr(jaxpr)
  key = id(j)
  if key not in memo:
    memo[key] = False
    memo[key] = any(
        eqn.primitive in HOST_PRIMITIVES or any(
            contains_host_call(sub, memo) for _, sub in compat.iter_param_jaxprs(eqn.params))
        for eqn in j.eqns)
  return memo[key]


def eqn_contains_host_call(eqn) -> bool:
  return eqn.primitive in HOST_PRIMITIVES or any(
      contains_host_call(sub) for _, sub in compat.iter_param_jaxprs(eqn.params))


def expose_calls(closed_jaxpr: Any) -> Program:
  """Converts a ClosedJaxpr into a flat `Program`, inlining calls that hold host calls."""
  ids = itertools.count()
  prog = Program(invars=[], outvars=[], eqns=[], consts={}, avals={})

  def fresh(aval) -> int:
    i = next(ids)
    prog.avals[i] = aval
    return i

  def walk(jaxpr: Any, consts: list, in_refs: list) -> list:
    j = compat.open_jaxpr(jaxpr)
    env: dict = {}
    for v, c in zip(j.constvars, consts):
      i = fresh(v.aval)
      prog.consts[i] = c
      env[v] = i
    env.update(zip(j.invars, in_refs))

    def read(a):
      return Lit(a.val) if isinstance(a, compat.Literal) else env[a]

    for eqn in j.eqns:
      ins = [read(a) for a in eqn.invars]
      body_param = INLINABLE.get(eqn.primitive.name)
      body = eqn.params.get(body_param) if body_param else None
      if body is not None and contains_host_call(body):
        outs = walk(body, compat.jaxpr_consts(body), ins)
        for v, r in zip(eqn.outvars, outs):
          if not compat.is_drop_var(v):
            env[v] = r
        continue
      outs = [fresh(v.aval) for v in eqn.outvars]
      for v, o in zip(eqn.outvars, outs):
        if not compat.is_drop_var(v):
          env[v] = o
      prog.eqns.append(Eqn(eqn.primitive, dict(eqn.params), tuple(ins), tuple(outs)))
    return [read(a) for a in j.outvars]

  top = compat.open_jaxpr(closed_jaxpr)
  prog.invars = [fresh(v.aval) for v in top.invars]
  prog.outvars = walk(closed_jaxpr, compat.jaxpr_consts(closed_jaxpr), list(prog.invars))
  return prog
