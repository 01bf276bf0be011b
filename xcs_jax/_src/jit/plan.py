"""From a traced jaxpr to an executable plan: the passes, then compilation.

trace (jax.make_jaxpr) -> expose -> classify -> partition -> analyze -> plan.
Each tensor segment is compiled once with `jax.jit` and kept in the plan (a
new callable per call would recompile every time). A program without host
calls becomes one XLA executable.
"""
from __future__ import annotations

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
  eqn: Any = None        # host: the host-call eqn
  batched: bool = False  # host: more than one example (gathers on the coordinator)


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
      elif node.kind is Kind.HOST:
        step.eqn = node.eqns[0]
        step.batched = _batch_size(step.eqn, program) > 1
      else:
        eqn = node.eqns[0]
        step.run = ControlRunner(eqn, [program.avals[o] for o in eqn.outs], build_plan)
        step.eqn = eqn
    steps[node.index] = step
  for step in steps.values():
    for d in step.deps:
      steps[d].dependents.append(step.index)
  return Plan(program, graph, analysis, steps, whole)
