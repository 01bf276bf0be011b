"""Pass 3, partition: tensor segments and orchestration nodes, as a DAG.

Dead code is removed first (host calls are pure: an unused call is never
made, as under `jax.jit`). Then each tensor equation gets a *key*, the set
of orchestration nodes (host calls, control flow, streams) that must have
finished before it runs, and equations with the same key form one segment:

- a cheap equation runs as late as it can without delaying any node: its key
  is the intersection of what its readers wait for (a node reader: that
  node's host ancestors; a tensor reader: that reader's key). Work that only
  feeds the program's outputs therefore lands in one epilogue, and the
  partial sums of `sum(op(x + i) for i in ...)` are one segment, not one per
  call;
- an expensive equation (see `is_expensive`) runs as early as it can: its
  key is its own host ancestors, so heavy tensor work overlaps the calls it
  does not depend on.

Either way no node waits on work it does not need (a segment becomes ready
no later than the nodes reading it could start), and the graph cannot have
a cycle: keys only grow along every edge, and a node's readers all have it
in their key while its inputs do not.

A `STACK` read only by a host call and an `UNSTACK` of a host call's output
(what `batch_sibling_calls` leaves when `rows.py` found no whole array to
use) join that call's node and run on the host in numpy: in XLA, a segment
of many small values into or out of one stack compiles very slowly.
"""
from __future__ import annotations

import collections
import dataclasses
import math

from xcs_jax._src import compat
from xcs_jax._src.jit.classify import Kind, classify
from xcs_jax._src.jit.ir import Eqn, Program
from xcs_jax._src.jit.pseudo import STACK, UNSTACK

EXPENSIVE_COST = 1 << 16
"""Estimated element operations above which tensor work runs as early as it
can (about 10-50 us on a CPU core); cheaper work is deferred and fused."""


@dataclasses.dataclass
class Node:
  index: int
  kind: Kind
  eqns: list                       # one eqn for orchestration nodes
  ins: list = dataclasses.field(default_factory=list)    # ref ids read
  outs: list = dataclasses.field(default_factory=list)   # ref ids others read
  deps: set = dataclasses.field(default_factory=set)     # node indices

  @property
  def eqn(self) -> Eqn:
    """The call (or control) eqn of an orchestration node, beside the `STACK`s
    before it and `UNSTACK`s after it that run with it on the host."""
    return next(e for e in self.eqns if e.primitive not in (STACK, UNSTACK))


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


# -- cost --------------------------------------------------------------------------

def _size(aval) -> int:
  return math.prod(getattr(aval, "shape", ()))


def _jaxpr_cost(jaxpr, repeat: int = 1) -> float:
  j = compat.open_jaxpr(jaxpr)
  return repeat * sum(_eqn_cost(e.primitive.name, e.params, [v.aval for v in e.invars],
                                [v.aval for v in e.outvars]) for e in j.eqns)


def _eqn_cost(name: str, params: dict, in_avals: list, out_avals: list) -> float:
  out = sum(_size(a) for a in out_avals)
  if name == "dot_general":
    (contract, _), _ = params["dimension_numbers"]
    lhs = in_avals[0].shape
    return out * math.prod(lhs[d] for d in contract)
  if name == "conv_general_dilated":
    return out * _size(in_avals[1])
  if name == "while":
    return math.inf          # trip count unknown: treat as heavy
  subs = list(compat.iter_param_jaxprs(params))
  if subs:
    repeat = int(params.get("length", 1)) if name == "scan" else 1
    if name == "cond":       # one branch runs: the costliest bounds it
      return max(_jaxpr_cost(j) for _, j in subs)
    return sum(_jaxpr_cost(j, repeat) for _, j in subs)
  return max(out, sum(_size(a) for a in in_avals))


def is_expensive(eqn: Eqn, avals: dict) -> bool:
  """Whether a tensor eqn is worth running as early as possible."""
  in_avals = [avals[r] if isinstance(r, int) else compat.get_aval(r.value) for r in eqn.ins]
  out_avals = [avals[o] for o in eqn.outs]
  return _eqn_cost(eqn.name, eqn.params, in_avals, out_avals) > EXPENSIVE_COST


# -- keys ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Keys:
  """Per live eqn: its kind, its host ancestors and, for tensor eqns, its key.

  Sets of orchestration nodes are int bitmasks (bit k: the k-th one). An eqn
  that runs beside a host call (`attached`) has that call's ancestors.
  """
  eqns: list
  kinds: list
  ancestors: list          # eqn position -> bitmask of the nodes it waits for
  keys: list               # eqn position -> segment key (tensor eqns) or None
  readers: dict            # ref -> eqn positions reading it
  attached: dict           # eqn position -> position of the host call it runs beside


def _attachments(eqns: list, kinds: list, readers: dict, outvars: set) -> dict:
  producer = {o: i for i, e in enumerate(eqns) for o in e.outs}
  attached = {}
  for i, e in enumerate(eqns):
    if e.primitive is STACK:
      rs = readers.get(e.outs[0], ())
      if len(rs) == 1 and kinds[rs[0]] is Kind.HOST and e.outs[0] not in outvars:
        attached[i] = rs[0]
    elif e.primitive is UNSTACK and isinstance(e.ins[0], int):
      j = producer.get(e.ins[0])
      if j is not None and kinds[j] is Kind.HOST:
        attached[i] = j
  return attached


def segment_keys(prog: Program) -> Keys:
  eqns = live_eqns(prog)
  kinds = [classify(e) for e in eqns]
  readers = collections.defaultdict(list)
  for i, e in enumerate(eqns):
    for r in e.ins:
      if isinstance(r, int):
        readers[r].append(i)
  attached = _attachments(eqns, kinds, readers, {r for r in prog.outvars
                                                 if isinstance(r, int)})
  by_ref: dict[int, int] = {}
  ancestors = [0] * len(eqns)
  before_call = collections.defaultdict(int)   # host position -> its STACKs' ancestors
  n_nodes = 0
  for i, (e, kind) in enumerate(zip(eqns, kinds)):
    a = 0
    for r in e.ins:
      if isinstance(r, int):
        a |= by_ref.get(r, 0)
    host = attached.get(i)
    if host is not None and host > i:        # a STACK: part of its call's inputs
      before_call[host] |= a
      continue
    if host is not None:                     # an UNSTACK: as the call's outputs
      ancestors[i] = ancestors[host]
      a = by_ref[e.ins[0]]
    else:
      a |= before_call.get(i, 0)
      ancestors[i] = a
      if kind is not Kind.TENSOR:
        a |= 1 << n_nodes
        n_nodes += 1
    for o in e.outs:
      by_ref[o] = a
  for i, host in attached.items():
    ancestors[i] = ancestors[host]
    kinds[i] = Kind.HOST
  everything = (1 << n_nodes) - 1
  keys: list = [None] * len(eqns)
  for i in reversed(range(len(eqns))):
    if kinds[i] is not Kind.TENSOR:
      continue
    if is_expensive(eqns[i], prog.avals):
      keys[i] = ancestors[i]
      continue
    k = everything
    for o in eqns[i].outs:
      for j in readers.get(o, ()):
        k &= keys[j] if kinds[j] is Kind.TENSOR else ancestors[j]
    keys[i] = k
  return Keys(eqns, kinds, ancestors, keys, readers, attached)


def partition_segments(prog: Program) -> Graph:
  k = segment_keys(prog)
  nodes: list[Node] = []
  producer: dict[int, int] = {}
  segment_by_key: dict[int, int] = {}
  node_of_call: dict[int, int] = {}
  pending: dict[int, list] = collections.defaultdict(list)  # STACKs before their call
  for i, (eqn, kind, key) in enumerate(zip(k.eqns, k.kinds, k.keys)):
    host = k.attached.get(i)
    if host is not None and host > i:
      pending[host].append(eqn)
      continue
    if host is not None:
      index = node_of_call[host]
      nodes[index].eqns.append(eqn)
    elif kind is Kind.TENSOR:
      index = segment_by_key.get(key)
      if index is None:
        index = segment_by_key[key] = len(nodes)
        nodes.append(Node(index, kind, []))
      nodes[index].eqns.append(eqn)
    else:
      index = node_of_call[i] = len(nodes)
      nodes.append(Node(index, kind, pending.pop(i, []) + [eqn]))
    for o in eqn.outs:
      producer[o] = index
  for i, host in k.attached.items():
    if host > i:
      for o in k.eqns[i].outs:
        producer[o] = node_of_call[host]

  read_by_others: set[int] = {r for r in prog.outvars if isinstance(r, int)}
  for node in nodes:
    inside = {o for e in node.eqns for o in e.outs}
    ins = []
    seen = set()
    for e in node.eqns:
      for r in e.ins:
        if isinstance(r, int) and r not in inside and r not in seen:
          seen.add(r)
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
