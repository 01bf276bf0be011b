"""Pass 3, partition: maximal tensor segments and orchestration nodes, as a DAG.

Dead code is removed first (host calls are pure: an unused call is never
made, as under `jax.jit`). Then every tensor equation is keyed by the set of
orchestration nodes it transitively depends on, and equations with the same
key form one segment. This gives the largest segments that never make work
wait on a call it does not depend on, and it cannot create a cycle: an edge
from segment A to segment B implies key(A) is a subset of key(B), so a cycle
would need equal keys, i.e. one segment.
"""
from __future__ import annotations

import dataclasses

from xcs_jax._src.jit.classify import Kind, classify
from xcs_jax._src.jit.ir import Eqn, Program


@dataclasses.dataclass
class Node:
  index: int
  kind: Kind
  eqns: list                       # one eqn for HOST / CONTROL nodes
  ins: list = dataclasses.field(default_factory=list)    # ref ids read
  outs: list = dataclasses.field(default_factory=list)   # ref ids others read
  deps: set = dataclasses.field(default_factory=set)     # node indices


@dataclasses.dataclass
class Graph:
  program: Program
  nodes: list            # Node, in a topological order
  producer: dict         # ref id -> node index

  def orchestration_nodes(self) -> list:
    return [n for n in self.nodes if n.kind is not Kind.TENSOR]

  def tensor_nodes(self) -> list:
    return [n for n in self.nodes if n.kind is Kind.TENSOR]


def live_eqns(prog: Program) -> list[Eqn]:
  """The equations some program output depends on."""
  needed = {r for r in prog.outvars if isinstance(r, int)}
  live = []
  for eqn in reversed(prog.eqns):
    if any(o in needed for o in eqn.outs):
      live.append(eqn)
      needed.update(r for r in eqn.ins if isinstance(r, int))
  live.reverse()
  return live


def partition_segments(prog: Program) -> Graph:
  nodes: list[Node] = []
  producer: dict[int, int] = {}
  ancestors: dict[int, frozenset] = {}
  segment_by_key: dict[frozenset, int] = {}

  for eqn in live_eqns(prog):
    kind = classify(eqn)
    key = frozenset().union(*(ancestors.get(r, ()) for r in eqn.ins if isinstance(r, int)))
    if kind is Kind.TENSOR:
      index = segment_by_key.get(key)
      if index is None:
        index = segment_by_key[key] = len(nodes)
        nodes.append(Node(index, kind, []))
      nodes[index].eqns.append(eqn)
      out_key = key
    else:
      index = len(nodes)
      nodes.append(Node(index, kind, [eqn]))
      out_key = key | {index}
    for o in eqn.outs:
      producer[o] = index
      ancestors[o] = out_key

  read_by_others: set[int] = {r for r in prog.outvars if isinstance(r, int)}
  for node in nodes:
    inside = {o for e in node.eqns for o in e.outs}
    ins = []
    for e in node.eqns:
      for r in e.ins:
        if isinstance(r, int) and r not in inside and r not in ins:
          ins.append(r)
    node.ins = ins
    node.deps = {producer[r] for r in ins if r in producer}
    read_by_others.update(ins)
  for node in nodes:
    node.outs = [o for e in node.eqns for o in e.outs if o in read_by_others]
  return Graph(prog, _topological(nodes), producer)


def _topological(nodes: list[Node]) -> list[Node]:
  order, state = [], {}

  def visit(n: Node):
    stack = [(n, iter(sorted(n.deps)))]
    state[n.index] = 1
    while stack:
      node, it = stack[-1]
      nxt = next(it, None)
      if nxt is None:
        stack.pop()
        state[node.index] = 2
        order.append(node)
      elif state.get(nxt) is None:
        state[nxt] = 1
        stack.append((nodes[nxt], iter(sorted(nodes[nxt].deps))))
      elif state[nxt] == 1:  # pragma: no cover - impossible by construction
        raise AssertionError("partition produced a cycle")
  for n in nodes:
    if n.index not in state:
      visit(n)
  return order
