"""Pass 4, analyze: parallel groups, critical path, estimated speedup, strategy.

A tensor op whose body makes host calls the passes do not split (`pmap`,
`shard_map`, ...) stays in its segment: its calls run inside XLA through
`io_callback`. Such ops are counted apart (`xla_call_ops`); a function whose
only calls are there has strategy ``"callbacks"``.

Every orchestration node costs one unit (its latency is unknown before it
runs; a vmapped call is one batched call and also one unit); tensor segments
cost nothing. A node's level is the number of orchestration nodes on the
longest path before it; nodes of one level can run together.
"""
from __future__ import annotations

import collections
import dataclasses

from xcs_jax._src.jit.classify import Kind
from xcs_jax._src.jit.expose import eqn_contains_host_call
from xcs_jax._src.jit.partition import Graph

STRATEGIES = ("tensor", "callbacks", "sequential", "parallel", "hybrid")


@dataclasses.dataclass(frozen=True)
class Analysis:
  levels: dict                  # node index -> level (orchestration nodes only)
  parallel_groups: tuple        # tuples of node indices (> 1 node) that can run together
  max_parallelism: int
  critical_path: tuple          # node indices of one longest chain of calls
  estimated_speedup: float      # calls / critical path length
  execution_strategy: str
  tensor_ops: int               # tensor segments
  orchestration_ops: int        # host calls and control nodes
  xla_call_ops: int = 0         # tensor ops making host calls inside XLA (pmap, ...)


def analyze(graph: Graph) -> Analysis:
  nodes = {n.index: n for n in graph.nodes}
  depth: dict[int, int] = {}      # calls on the longest path up to and including the node
  best_pred: dict[int, int | None] = {}
  for n in graph.nodes:            # topological order
    own = 0 if n.kind is Kind.TENSOR else 1
    pred = max(n.deps, key=lambda d: depth[d], default=None)
    depth[n.index] = own + (depth[pred] if pred is not None else 0)
    best_pred[n.index] = pred

  calls = graph.orchestration_nodes()
  levels = {n.index: depth[n.index] - 1 for n in calls}
  by_level = collections.defaultdict(list)
  for i, lvl in levels.items():
    by_level[lvl].append(i)
  groups = tuple(tuple(sorted(g)) for _, g in sorted(by_level.items()) if len(g) > 1)
  max_par = max((len(g) for g in by_level.values()), default=0)

  path = []
  if calls:
    end = max(graph.nodes, key=lambda n: depth[n.index]).index
    while end is not None:
      if nodes[end].kind is not Kind.TENSOR:
        path.append(end)
      end = best_pred[end]
    path.reverse()
  speedup = len(calls) / len(path) if path else 1.0

  n_tensor = len(graph.tensor_nodes())
  in_xla = sum(eqn_contains_host_call(e) for n in graph.tensor_nodes() for e in n.eqns)
  if not calls:
    strategy = "callbacks" if in_xla else "tensor"
  elif n_tensor >= 2:
    strategy = "hybrid"
  elif max_par > 1:
    strategy = "parallel"
  else:
    strategy = "sequential"
  return Analysis(levels, groups, max_par, tuple(path), speedup, strategy, n_tensor,
                  len(calls), in_xla)
