"""The program form the passes work on: a flat list of equations over integer refs.

A jaxpr is converted once (by `expose.expose_calls`); the passes after it
never touch jax's Var objects, so inlining the same inner function twice, or
renaming across jax versions, needs no fresh jax Vars.
"""
from __future__ import annotations

import collections
import dataclasses
import heapq
from typing import Any, Union


@dataclasses.dataclass(frozen=True)
class Lit:
  """A literal operand (a Python or numpy scalar from the jaxpr)."""
  value: Any


Ref = Union[int, Lit]


@dataclasses.dataclass
class Eqn:
  primitive: Any
  params: dict
  ins: tuple          # Refs
  outs: tuple         # ints (fresh ids; dropped outputs get ids too)

  @property
  def name(self) -> str:
    return self.primitive.name


@dataclasses.dataclass
class Program:
  """A flattened program: `invars` and `consts` feed `eqns`, which feed `outvars`."""
  invars: list
  outvars: list           # Refs
  eqns: list              # Eqn, in a topological order
  consts: dict            # id -> value
  avals: dict             # id -> abstract value


def read(ref: Ref, env: dict) -> Any:
  return ref.value if isinstance(ref, Lit) else env[ref]


def eval_eqns(eqns, in_ids, out_ids, args, bind) -> list:
  """Evaluates `eqns` on `args`; `bind(eqn, values) -> outputs`."""
  env = dict(zip(in_ids, args))
  for eqn in eqns:
    env.update(zip(eqn.outs, bind(eqn, [read(r, env) for r in eqn.ins])))
  return [read(r, env) for r in out_ids]


def sort_eqns(eqns: list, prog: Program) -> list:
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
  assert len(order) == len(eqns), "a pass made a cycle"
  return order
