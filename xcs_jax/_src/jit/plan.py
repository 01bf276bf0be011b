"""From a traced jaxpr to an executable plan: the passes, then compilation.

trace (jax.make_jaxpr) -> expose -> classify -> partition -> analyze -> plan.
Each tensor segment is compiled once with `jax.jit` and kept in the plan (a
new callable per call would recompile every time). A program without host
calls becomes one XLA executable.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax

from xcs_jax._src import compat
from xcs_jax._src.jit.analyze import Analysis, analyze
from xcs_jax._src.jit.batch_calls import batch_sibling_calls, bind_pseudo
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
  batched: bool = False  # host: more than one example (gathers on the coordinator)
  out_ids: list = dataclasses.field(default_factory=list)  # what `run` returns, in order


@dataclasses.dataclass
class Plan:
  program: Program        # what runs (sibling calls batched)
  graph: Graph            # the call-site graph, as written: what analysis and explain show
  analysis: Analysis
  steps: dict             # index -> Step, from `program`
  whole: Callable | None  # the one executable of a program without host calls


def _bind_tensor_eqn(eqn, values):
  out = bind_pseudo(eqn, values)
  return out if out is not None else compat.bind_eqn(eqn.primitive, eqn.params, values)


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


def build_plan(closed_jaxpr: Any, *, batch_calls: bool = True) -> Plan:
  """The passes and compilation; `batch_calls` runs `batch_sibling_calls`."""
  program = expose_calls(closed_jaxpr)
  graph = partition_segments(program)
  analysis = analyze(graph)
  whole = None
  if analysis.execution_strategy == "tensor":
    whole = jax.jit(compat.jaxpr_as_fun(closed_jaxpr))
  elif batch_calls:
    program = batch_sibling_calls(program)
  exec_graph = partition_segments(program) if program is not graph.program else graph
  sub_plan = functools.partial(build_plan, batch_calls=batch_calls)
  steps = {}
  for node in exec_graph.nodes:
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
                                   sub_plan)
    steps[node.index] = step
  for step in steps.values():
    for d in step.deps:
      steps[d].dependents.append(step.index)
  return Plan(program, graph, analysis, steps, whole)
