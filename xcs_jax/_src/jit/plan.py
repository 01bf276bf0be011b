"""From a traced jaxpr to an executable plan: the passes, then compilation.

trace (jax.make_jaxpr) -> expose -> classify -> partition -> analyze ->
batch sibling calls -> vectorize stacks and unstacks -> fold reductions ->
form streams -> partition -> plan.
Each tensor segment is compiled once with `jax.jit` and kept in the plan (a
new callable per call would recompile every time); segments that are the
same computation (a Python loop makes many) share one compiled callable
through the `SegmentCache`. A program without host calls becomes one XLA
executable.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
import threading
from typing import Any, Callable

import numpy as np

import jax

from xcs_jax._src import compat
from xcs_jax._src.jit.analyze import Analysis, analyze
from xcs_jax._src.jit.batch_calls import batch_sibling_calls
from xcs_jax._src.jit.classify import Kind
from xcs_jax._src.jit.control import ControlRunner
from xcs_jax._src.jit.expose import expose_calls
from xcs_jax._src.jit.ir import Lit, Program, eval_eqns
from xcs_jax._src.jit.partition import Graph, partition_segments
from xcs_jax._src.jit.pseudo import bind_pseudo
from xcs_jax._src.jit.rows import fold_reductions, vectorize_stacks, vectorize_unstacks
from xcs_jax._src.jit.streams import StreamRunner, form_streams


@dataclasses.dataclass
class Step:
  """One node of the plan, ready to run."""
  index: int
  kind: Kind
  ins: list
  outs: list
  deps: set
  dependents: list = dataclasses.field(default_factory=list)
  run: Any = None        # tensor: jitted callable; control: ControlRunner; stream: StreamRunner
  eqn: Any = None        # host / control: the eqn
  pre: list = dataclasses.field(default_factory=list)   # host: STACKs run before it
  post: list = dataclasses.field(default_factory=list)  # host: UNSTACKs run after it
  batched: bool = False  # host: more than one example (gathers on the coordinator)
  out_ids: list = dataclasses.field(default_factory=list)  # what `run` returns, in order


@dataclasses.dataclass
class Plan:
  program: Program        # what runs (sibling calls batched, streams formed)
  graph: Graph            # the call-site graph, as written: what the analysis counts
  analysis: Analysis
  steps: dict             # index -> Step, from `program`
  whole: Callable | None  # the one executable of a program without host calls
  run_graph: Graph        # the graph of `program`: what runs, step by step
  host_items: int = 0     # host calls one run makes, outside control flow (progress bars)

  def counts(self) -> dict:
    """What runs, by kind of step (the `plan_*` keys of `get_jit_stats`)."""
    kinds = [s.kind for s in self.steps.values()]
    return dict(
        plan_segments=1 if self.whole is not None else kinds.count(Kind.TENSOR),
        plan_host_calls=kinds.count(Kind.HOST),
        plan_streams=kinds.count(Kind.STREAM),
        plan_control_nodes=kinds.count(Kind.CONTROL))


def _bind_tensor_eqn(eqn, values):
  out = bind_pseudo(eqn, values)
  return out if out is not None else compat.bind_eqn(eqn.primitive, eqn.params, values)


def compile_segment(eqns: list, ins: list, outs: list) -> Callable:
  def segment(*args):
    return eval_eqns(eqns, ins, outs, args, _bind_tensor_eqn)
  return jax.jit(segment)


def _literal_key(value: Any) -> tuple:
  array = np.asarray(value)
  return (type(value).__name__, str(array.dtype), array.shape, array.tobytes())


def segment_signature(eqns: list, ins: list, outs: list, avals: dict) -> tuple | None:
  """What a segment computes, independent of its refs: equal signatures are
  the same computation. None if some param cannot be hashed."""
  local = {r: k for k, r in enumerate(ins)}
  parts: list = [tuple((tuple(avals[r].shape), str(avals[r].dtype),
                        bool(getattr(avals[r], "weak_type", False))) for r in ins)]
  for e in eqns:
    operands = tuple(_literal_key(r.value) if isinstance(r, Lit) else local[r]
                     for r in e.ins)
    for o in e.outs:
      local[o] = len(local)
    parts.append((e.primitive, tuple(sorted(e.params.items())), operands))
  parts.append(tuple(local[o] for o in outs))
  key = tuple(parts)
  try:
    hash(key)
  except TypeError:
    return None
  return key


class SegmentCache:
  """Compiled segments by `segment_signature`, least recently used dropped first.

  Owned by a jitted function: its plans (and their control-flow sub-plans)
  compile each distinct segment once, however many call sites repeat it.
  """

  def __init__(self, size: int = 1024):
    self._size = size
    self._compiled: collections.OrderedDict = collections.OrderedDict()
    self._lock = threading.Lock()
    self.compiled = 0   # segments compiled (distinct signatures met)

  def get(self, eqns: list, ins: list, outs: list, avals: dict) -> Callable:
    key = segment_signature(eqns, ins, outs, avals)
    if key is None:
      return compile_segment(eqns, ins, outs)
    with self._lock:
      fn = self._compiled.get(key)
      if fn is not None:
        self._compiled.move_to_end(key)
        return fn
      fn = self._compiled[key] = compile_segment(eqns, ins, outs)
      self.compiled += 1
      if len(self._compiled) > self._size:
        self._compiled.popitem(last=False)
    return fn


def _batch_size(eqn, program: Program) -> int:
  params = eqn.params
  for r, b in zip(eqn.ins, params["in_batched"]):
    if b and isinstance(r, int):
      return math.prod(program.avals[r].shape[:params["batch_ndim"]])
  return 1


def build_plan(closed_jaxpr: Any, *, batch_calls: bool = True,
               segments: SegmentCache | None = None) -> Plan:
  """The passes and compilation; `batch_calls` runs `batch_sibling_calls` and
  `fold_reductions`; `segments` shares compiled segments (default: a new cache)."""
  segments = segments if segments is not None else SegmentCache()
  program = expose_calls(closed_jaxpr)
  graph = partition_segments(program)
  analysis = analyze(graph)
  whole = None
  if analysis.execution_strategy in ("tensor", "callbacks"):   # one executable
    whole = jax.jit(compat.jaxpr_as_fun(closed_jaxpr))
  elif batch_calls:
    program = batch_sibling_calls(program)
    program = fold_reductions(vectorize_unstacks(vectorize_stacks(program)))
    program = form_streams(program)
  exec_graph = partition_segments(program) if program is not graph.program else graph
  sub_plan = functools.partial(build_plan, batch_calls=batch_calls, segments=segments)
  steps = {}
  for node in exec_graph.nodes:
    step = Step(node.index, node.kind, node.ins, node.outs, set(node.deps))
    if whole is None:
      if node.kind is Kind.TENSOR:
        step.run = segments.get(node.eqns, node.ins, node.outs, program.avals)
        step.out_ids = list(node.outs)
      else:
        step.eqn = node.eqn
        at = node.eqns.index(step.eqn)
        step.pre, step.post = node.eqns[:at], node.eqns[at + 1:]
        step.out_ids = list(step.eqn.outs)  # host calls return every output
        if node.kind is Kind.HOST:
          step.batched = _batch_size(step.eqn, program) > 1
        elif node.kind is Kind.STREAM:
          step.run = StreamRunner(step.eqn.params["spec"],
                                  [program.avals[o] for o in step.eqn.outs])
        else:
          step.run = ControlRunner(step.eqn, [program.avals[o] for o in step.eqn.outs],
                                   sub_plan)
    steps[node.index] = step
  items = 0
  for step in steps.values():
    for d in step.deps:
      steps[d].dependents.append(step.index)
    if step.kind is Kind.HOST:
      items += _batch_size(step.eqn, program)
    elif step.kind is Kind.STREAM:
      spec = step.eqn.params["spec"]
      items += math.prod(spec.batch) * len(spec.stages)
  return Plan(program, graph, analysis, steps, whole, exec_graph, items)
