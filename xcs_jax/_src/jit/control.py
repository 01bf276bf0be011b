"""Control flow whose body makes host calls, run by the scheduler.

`cond`/`switch` run only the taken branch; `while` and `scan` run their
iterations in order, each iteration's body as a plan of its own, so the host
calls inside one iteration run concurrently. Values match `jax.jit`'s.
"""
from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import numpy as np

from xcs_jax._src import compat
from xcs_jax._src.jit.ir import Eqn


class ControlRunner:
  """Runs one control eqn; `run_plan(plan, args, scope)` runs a sub-plan."""

  def __init__(self, eqn: Eqn, out_avals: list, build_plan: Callable):
    self.name = eqn.name
    self.params = eqn.params
    self.out_avals = out_avals
    p = eqn.params
    if self.name == "cond":
      self.branches = [build_plan(b) for b in p["branches"]]
    elif self.name == "while":
      self.cond = build_plan(p["cond_jaxpr"])
      self.body = build_plan(p["body_jaxpr"])
    elif self.name == "scan":
      self.body = build_plan(p["jaxpr"])
      self.num_consts, self.num_carry = compat.scan_layout(p)
    else:  # pragma: no cover - classify only sends these three
      raise NotImplementedError(self.name)

  def sub_plans(self) -> list:
    if self.name == "cond":
      return list(self.branches)
    if self.name == "while":
      return [self.cond, self.body]
    return [self.body]

  def __call__(self, args: list, scope, run_plan: Callable) -> list:
    return getattr(self, "_run_" + self.name)(args, scope, run_plan)

  def _run_cond(self, args, scope, run_plan):
    index = int(np.asarray(args[0]))
    index = min(max(index, 0), len(self.branches) - 1)  # as lax.switch clamps
    return run_plan(self.branches[index], args[1:], scope)

  def _run_while(self, args, scope, run_plan):
    nc, nb = self.params["cond_nconsts"], self.params["body_nconsts"]
    cond_consts, body_consts, carry = args[:nc], args[nc:nc + nb], list(args[nc + nb:])
    while True:
      pred = np.asarray(run_plan(self.cond, cond_consts + carry, scope)[0])
      if not pred.any():
        return carry
      scope.check()
      new = list(run_plan(self.body, body_consts + carry, scope))
      if pred.ndim == 0:
        carry = new
      else:
        # A vmapped loop (batched predicate): as jax lowers it, every element
        # runs the body until all are done, and done elements keep their value.
        carry = [jnp.where(pred.reshape(pred.shape + (1,) * (n.ndim - pred.ndim)), n, c)
                 for n, c in zip(new, carry)]

  def _run_scan(self, args, scope, run_plan):
    consts = args[:self.num_consts]
    carry = list(args[self.num_consts:self.num_consts + self.num_carry])
    xs = args[self.num_consts + self.num_carry:]
    length = self.params["length"]
    steps = range(length - 1, -1, -1) if self.params["reverse"] else range(length)
    ys = []
    for i in steps:
      scope.check()
      outs = run_plan(self.body, consts + carry + [x[i] for x in xs], scope)
      carry = list(outs[:self.num_carry])
      ys.append(outs[self.num_carry:])
    if self.params["reverse"]:
      ys.reverse()
    y_avals = self.out_avals[self.num_carry:]
    stacked = [jnp.stack([y[k] for y in ys]) if ys else jnp.zeros(a.shape, a.dtype)
               for k, a in enumerate(y_avals)]
    return carry + stacked
