"""From a traced jaxpr to an executable plan: the passes, then compilation.

trace (jax.make_jaxpr) -> expose -> classify -> partition -> analyze -> plan.
Each tensor segment is compiled once with `jax.jit` and kept in the plan (a
new callable per call would recompile every time). A program without host
calls becomes one XLA executable.
"""
from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Callable

import jax

from xcs_jax._src import compat
from xcs_jax._src.jit.analyze import Analysis, analyze
from xcs_jax._src.jit.classify import Kind
from xcs_jax._src.jit.control import ControlRunner
from xcs_jax._src.jit.expose import expose_calls
from xcs_jax._src.jit.ir import Program, eval_eqns
from xcs_jax._src.jit.partition import Graph, partition_segments


@dataclasses.dataclass
class Step:
  """One node of the plan, ready to run."""
  index: int
  kind: Kind
  ins: list
  outs: list
  deps: set
  dependents: list = dataclasses.field(default_factory=list)
  run: Any = None        # tensor: jitted callable; control: ControlRunner
  eqn: Any = None        # host / control: the eqn
  members: list = dataclasses.field(default_factory=list)  # a fused group's eqns
  batched: bool = False  # host: several calls (gathers on the coordinator)
  out_ids: list = dataclasses.field(default_factory=list)  # what `run` returns, in order


@dataclasses.dataclass
class Plan:
  program: Program
  graph: Graph
  analysis: Analysis
  steps: dict            # index -> Step
  whole: Callable | None  # the one executable of a program without host calls


def _bind_tensor_eqn(eqn, values):
  return compat.bind_eqn(eqn.primitive, eqn.params, values)


def compile_segment(eqns: list, ins: list, outs: list) -> Callable:
  def segment(*args):
    return eval_eqns(eqns, ins, outs, args, _bind_tensor_eqn)
  return jax.jit(segment)


def _batch_size(eqn, program: Program) -> int:
  params = eqn.params
  for r, b in zip(eqn.ins, params["in_batched"]):
    if b and isinstance(r, int):
      return math.prod(program.avals[r].shape[:params["batch_ndim"]])
  return 1


def build_plan(closed_jaxpr: Any) -> Plan:
  program = expose_calls(closed_jaxpr)
  graph = partition_segments(program)
  analysis = analyze(graph)
  whole = None
  if analysis.execution_strategy == "tensor":
    whole = jax.jit(compat.jaxpr_as_fun(closed_jaxpr))
  steps = {}
  for node in graph.nodes:
    step = Step(node.index, node.kind, node.ins, node.outs, set(node.deps))
    if whole is None:
      if node.kind is Kind.TENSOR:
        step.run = compile_segment(node.eqns, node.ins, node.outs)
        step.out_ids = list(node.outs)
      else:
        step.eqn = node.eqns[0]
        step.out_ids = list(step.eqn.outs)  # host calls return every output
        if node.kind is Kind.HOST:
          step.batched = _batch_size(step.eqn, program) > 1
        else:
          step.run = ControlRunner(step.eqn, [program.avals[o] for o in step.eqn.outs],
                                   build_plan)
    steps[node.index] = step
  if whole is None:
    steps = fuse_sibling_calls(steps)
  for step in steps.values():
    for d in step.deps:
      steps[d].dependents.append(step.index)
  return Plan(program, graph, analysis, steps, whole)


def fuse_sibling_calls(steps: dict) -> dict:
  """Unbatched calls of one op that have the same dependencies become one step.

  They become ready at the same moment anyway; as one step they are handed
  to the pool and reported back once, which is most of a call's scheduling
  cost when calls are many and quick. The step still makes each call on its
  own (concurrently, with its own source line in errors). The analysis and
  `explain` keep showing every call.
  """
  groups = collections.defaultdict(list)
  for step in steps.values():
    if (step.kind is Kind.HOST and step.eqn.params["batch_ndim"] == 0
        and all(isinstance(r, int) for r in step.eqn.ins)):
      groups[(step.eqn.params["op"], frozenset(step.deps))].append(step)
  renamed = {}
  next_index = max(steps, default=-1) + 1
  for members in groups.values():
    if len(members) < 2:
      continue
    fused = Step(next_index, Kind.HOST, sorted({r for m in members for r in m.ins}),
                 [o for m in members for o in m.outs], set(members[0].deps),
                 members=[m.eqn for m in members], batched=True,
                 out_ids=[o for m in members for o in m.out_ids])
    for m in members:
      del steps[m.index]
      renamed[m.index] = next_index
    steps[next_index] = fused
    next_index += 1
  if renamed:
    for step in steps.values():
      step.deps = {renamed.get(d, d) for d in step.deps}
  return steps
