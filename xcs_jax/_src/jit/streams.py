"""Pass 3e, streams: a vmapped chain of calls runs item by item.

In `jax.vmap(lambda a: second(first(a)))`, item i of `second` needs item i of
`first` and nothing else, yet as two batched calls `second` would wait for
every item of `first`: the slowest item of each call adds up along the
chain. A *stream* runs such a chain per item instead: the moment item i of
one call is done, item i of the next starts.

The pass finds, in topological order, batched calls whose batched inputs are
rows of one earlier batched call (same batch shape), possibly through tensor
code that is provably rowwise (`rowwise.row_rule`), and whose other inputs
are ready when that earlier call starts (so joining a stream never delays
anything). Such calls become *stages* of one `STREAM` node; the rowwise
tensor code between two stages is compiled once as a function of one row
(`RowFragment`) and runs per item as it arrives. Every stage's full outputs
come out of the node, so code after the chain reads them as before.

The values are exactly the batched calls' (each item is the same call on the
same inputs; the rowwise code computes each row as the whole-batch code
would), and errors are the same errors: the first item to fail fails the run.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import threading
from typing import Any, Callable

import jax
import numpy as np
from jax import lax

from xcs_jax._src.jit.classify import Kind, classify
from xcs_jax._src.jit.ir import Eqn, Lit, Program, sort_eqns
from xcs_jax._src.jit.partition import live_eqns
from xcs_jax._src.jit.pseudo import STREAM
from xcs_jax._src.jit.rowwise import ROW, RowRule, bind_row, row_rule


# -- what a stream is -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ItemInput:
  """Where one input of a stage's item comes from.

  kind: "stage" (row `index` of output `out` of upstream stage `stage`),
  "static_row" (row of the node's input `static`), "whole" (the node's input
  `static`, or the literal `value`), or "fragment" (output `out` of the
  stage's `RowFragment`).
  """
  kind: str
  stage: int = -1
  out: int = -1
  static: int = -1
  value: Any = None


@dataclasses.dataclass
class RowFragment:
  """Rowwise tensor code computing some inputs of a stage from one row."""
  eqns: list            # (Eqn, RowRule) in order
  stage_rows: list      # (ref, stage, out): the upstream rows it reads
  statics: list         # (ref, static index) of the node's inputs it reads
  outs: list            # refs it returns
  batch: tuple
  avals: dict
  fn: Callable | None = None

  def compile(self) -> Callable:
    if self.fn is None:
      self.fn = jax.jit(self._row)
    return self.fn

  def _row(self, index, rows, statics):
    k = len(self.batch)
    env = {ref: v for (ref, _, _), v in zip(self.stage_rows, rows)}
    full = {ref: v for (ref, _), v in zip(self.statics, statics)}

    def operand(r, mode):
      if isinstance(r, Lit):
        return r.value
      if r in env:
        return env[r]
      x = full[r]
      if mode != ROW:
        return x
      starts = list(index) + [0] * (x.ndim - k)
      return lax.dynamic_slice(x, starts, (1,) * k + tuple(x.shape[k:]))

    for eqn, rule in self.eqns:
      values = [operand(r, m) for r, m in zip(eqn.ins, rule.modes)]
      env.update(zip(eqn.outs, bind_row(eqn.primitive, rule, values)))
    return [env[r] for r in self.outs]


@dataclasses.dataclass
class Stage:
  eqn: Eqn                      # the batched host call
  inputs: list                  # ItemInput per input of the call
  upstream: tuple               # stage indices it waits for, per item
  fragment: RowFragment | None = None


@dataclasses.dataclass
class StreamSpec:
  """The params of a `STREAM` eqn (its ins are the node's inputs, `statics`)."""
  stages: list
  batch: tuple

  def describe(self) -> str:
    calls = " -> ".join(f"{s.eqn.params['op'].kind} {s.eqn.params['op'].describe()}"
                        for s in self.stages)
    return f"stream of {len(self.stages)} calls per item ({calls})"


# -- the pass -----------------------------------------------------------------------

def _streamable(eqn: Eqn) -> bool:
  p = eqn.params
  return (classify(eqn) is Kind.HOST and p["batch_ndim"] >= 1
          and getattr(p["op"], "streamable", False) and any(p["in_batched"]))


def _batch_of(eqn: Eqn, avals: dict) -> tuple:
  p = eqn.params
  for r, b in zip(eqn.ins, p["in_batched"]):
    if b:
      return tuple(avals[r].shape[:p["batch_ndim"]])
  return ()


@dataclasses.dataclass(eq=False)
class _Builder:
  root_ancestors: int
  batch: tuple
  stages: list = dataclasses.field(default_factory=list)      # eqn positions
  fragment: dict = dataclasses.field(default_factory=dict)    # eqn position -> RowRule


def form_streams(prog: Program) -> Program:
  """Gathers vmapped chains of calls into `STREAM` nodes (see the module doc)."""
  eqns = live_eqns(prog)
  avals = prog.avals
  ancestors: dict = {}      # ref -> bitmask of orchestration eqns it waits for
  of_stream: dict = {}      # ref -> the _Builder whose rows it holds
  builders: list[_Builder] = []
  bits = 0

  def anc(r) -> int:
    return ancestors.get(r, 0) if isinstance(r, int) else 0

  def ready_at_start(b: _Builder, refs) -> bool:
    return all(anc(r) & ~b.root_ancestors == 0 for r in refs)

  for i, e in enumerate(eqns):
    a = 0
    for r in e.ins:
      a |= anc(r)
    kind = classify(e)
    rows_of = {of_stream[r] for r in e.ins if isinstance(r, int) and r in of_stream}
    if kind is Kind.HOST and _streamable(e):
      batch = _batch_of(e, avals)
      joined = None
      if len(rows_of) == 1:
        b = next(iter(rows_of))
        batched = e.params["in_batched"]
        statics = [r for r in e.ins if not (isinstance(r, int) and r in of_stream)]
        if (b.batch == batch
            and all(bb for r, bb in zip(e.ins, batched) if isinstance(r, int) and r in of_stream)
            and all(avals[r].shape[:len(batch)] == batch
                    for r, bb in zip(e.ins, batched) if bb and isinstance(r, int))
            and ready_at_start(b, statics)):
          joined = b
      if joined is None:
        joined = _Builder(a, batch)
        builders.append(joined)
      joined.stages.append(i)
      for o in e.outs:
        of_stream[o] = joined
    elif kind is Kind.TENSOR and len(rows_of) == 1:
      b = next(iter(rows_of))
      row_in = [isinstance(r, int) and r in of_stream for r in e.ins]
      rule = row_rule(e.name, e.params,
                      [avals[r] if isinstance(r, int) else _lit_aval(r) for r in e.ins],
                      [avals[o] for o in e.outs], row_in, b.batch)
      statics = [r for r, is_row in zip(e.ins, row_in) if not is_row]
      if rule is not None and ready_at_start(b, statics):
        b.fragment[i] = rule
        for o in e.outs:
          of_stream[o] = b
    if kind is not Kind.TENSOR:
      a |= 1 << bits
      bits += 1
    for o in e.outs:
      ancestors[o] = a

  streams = [b for b in builders if len(b.stages) >= 2]
  if not streams:
    return prog
  replaced, added = set(), []
  for b in streams:
    eqn = _stream_eqn(b, eqns, avals)
    added.append(eqn)
    replaced.update(b.stages)
  kept = [e for j, e in enumerate(eqns) if j not in replaced] + added
  out = dataclasses.replace(prog, eqns=kept)
  out = dataclasses.replace(out, eqns=sort_eqns(kept, out))
  return dataclasses.replace(out, eqns=live_eqns(out))


def _lit_aval(lit: Lit):
  return jax.core.ShapedArray(np.shape(lit.value), np.result_type(lit.value))


def _stream_eqn(b: _Builder, eqns: list, avals: dict) -> Eqn:
  stage_of_ref = {}         # ref -> (stage index, out index)
  for s, pos in enumerate(b.stages):
    for k, o in enumerate(eqns[pos].outs):
      stage_of_ref[o] = (s, k)
  producer = {o: j for j, e in enumerate(eqns) for o in e.outs}
  statics: list = []
  static_index: dict = {}

  def static(r) -> int:
    if r not in static_index:
      static_index[r] = len(statics)
      statics.append(r)
    return static_index[r]

  stages = []
  for s, pos in enumerate(b.stages):
    e = eqns[pos]
    inputs, frag_outs, upstream = [], [], set()
    for r, batched in zip(e.ins, e.params["in_batched"]):
      if isinstance(r, Lit):
        inputs.append(ItemInput("whole", value=r.value))
      elif r in stage_of_ref and s > 0:
        t, k = stage_of_ref[r]
        inputs.append(ItemInput("stage", stage=t, out=k))
        upstream.add(t)
      elif s > 0 and producer.get(r) in b.fragment:
        inputs.append(ItemInput("fragment", out=len(frag_outs)))
        frag_outs.append(r)
      else:
        inputs.append(ItemInput("static_row" if batched else "whole", static=static(r)))
    fragment = None
    if frag_outs:
      fragment, frag_upstream = _fragment(b, frag_outs, eqns, producer, stage_of_ref,
                                          static, avals)
      upstream |= frag_upstream
    stages.append(Stage(e, inputs, tuple(sorted(upstream)), fragment))
  for st in stages:
    if st.fragment is not None:
      st.fragment.statics = [(r, static_index[r]) for r, _ in st.fragment.statics]
  spec = StreamSpec(stages, b.batch)
  outs = tuple(o for pos in b.stages for o in eqns[pos].outs)
  return Eqn(STREAM, {"spec": spec}, tuple(statics), outs)


def _fragment(b, frag_outs, eqns, producer, stage_of_ref, static, avals):
  """The fragment eqns `frag_outs` need, in order, and what they read."""
  needed, todo = set(), list(frag_outs)
  while todo:
    j = producer[todo.pop()]
    if j in needed:
      continue
    needed.add(j)
    for r in eqns[j].ins:
      if isinstance(r, int) and producer.get(r) in b.fragment:
        todo.append(r)
  order = sorted(needed)
  inside = {o for j in order for o in eqns[j].outs}
  stage_rows, statics, upstream, seen = [], [], set(), set()
  for j in order:
    for r in eqns[j].ins:
      if not isinstance(r, int) or r in inside or r in seen:
        continue
      seen.add(r)
      if r in stage_of_ref:
        t, k = stage_of_ref[r]
        stage_rows.append((r, t, k))
        upstream.add(t)
      else:
        static(r)
        statics.append((r, None))
  frag = RowFragment([(eqns[j], b.fragment[j]) for j in order], stage_rows, statics,
                     list(frag_outs), b.batch, avals)
  return frag, upstream


# -- running a stream ----------------------------------------------------------------

class StreamRunner:
  """Runs one `STREAM` node: a job per stage, items fed downstream as they finish."""

  def __init__(self, spec: StreamSpec, out_avals: list):
    self.spec = spec
    self.out_avals = out_avals
    for stage in spec.stages:
      if stage.fragment is not None:
        stage.fragment.compile()

  def start(self, scope, statics: list, report: Callable[[Any, BaseException | None], None],
            priority: float = 0.0) -> "_StreamRun":
    """Starts a run of the stream (its calls at `priority`; see `scope.Job`)."""
    run = _StreamRun(self, scope, statics, report, priority)
    run.start()
    return run


class _StreamRun:
  def __init__(self, runner: StreamRunner, scope, statics: list, report, priority: float):
    self.priority = priority
    self.spec = runner.spec
    self.out_avals = runner.out_avals
    self.scope = scope
    self.statics = [np.asarray(x) for x in statics]
    self.report = report
    self.batch = self.spec.batch
    self.n = math.prod(self.batch)
    self.lock = threading.Lock()
    self.jobs: list = []
    self.inputs: list = []     # per stage: the inputs of each item, once known
    self.waiting: list = []    # per stage: upstream stages still to finish, per item
    self.downstream = [[] for _ in self.spec.stages]
    for s, stage in enumerate(self.spec.stages):
      for t in stage.upstream:
        self.downstream[t].append(s)
    self.left = len(self.spec.stages)
    self.reported = False
    self.static_rows = [x.reshape((self.n,) + x.shape[len(self.batch):])
                        if x.shape[:len(self.batch)] == self.batch else None
                        for x in self.statics]
    self.jax_statics = None

  def start(self) -> None:
    if self.n == 0:
      self.report(self._empty_outputs(), None)
      return
    for s, stage in enumerate(self.spec.stages):
      p = stage.eqn.params
      self.inputs.append([None] * self.n)
      self.waiting.append(np.full(self.n, len(stage.upstream), np.int64))
      # A stage with no upstream stage reads only the node's inputs: its
      # items' inputs are made as they run; the others' as upstream items end.
      example = (functools.partial(self._item_inputs, s) if not stage.upstream
                 else self.inputs[s].__getitem__)
      self.jobs.append(p["op"].make_job(self.scope, self.n, example, p["source"],
                                        on_done=self._job_done,
                                        on_item=self._item_done_fn(s),
                                        priority=self.priority))
    for stage, job in zip(self.spec.stages, self.jobs):
      job.start(fed=not stage.upstream)

  # -- per item ---------------------------------------------------------------

  def _item_inputs(self, s: int, i: int) -> list:
    stage = self.spec.stages[s]
    frag = None
    if stage.fragment is not None:
      frag = self._run_fragment(stage.fragment, i)
    values = []
    for inp in stage.inputs:
      if inp.kind == "stage":
        values.append(self.jobs[inp.stage].results[i][inp.out])
      elif inp.kind == "static_row":
        values.append(self.static_rows[inp.static][i])
      elif inp.kind == "whole":
        values.append(inp.value if inp.static < 0 else self.statics[inp.static])
      else:
        values.append(frag[inp.out])
    return values

  def _run_fragment(self, frag: RowFragment, i: int) -> list:
    k = len(self.batch)
    index = tuple(np.int32(j) for j in np.unravel_index(i, self.batch))
    rows = [np.asarray(self.jobs[t].results[i][out]).reshape((1,) * k + tuple(
        np.shape(self.jobs[t].results[i][out]))) for _, t, out in frag.stage_rows]
    if self.jax_statics is None:
      self.jax_statics = [jax.numpy.asarray(x) for x in self.statics]
    statics = [self.jax_statics[j] for _, j in frag.statics]
    outs = frag.fn(index, rows, statics)
    return [np.asarray(o).reshape(np.shape(o)[k:]) for o in outs]

  def _item_done_fn(self, t: int) -> Callable[[int, Any], None]:
    downstream = self.downstream[t]

    def item_done(i: int, result: Any) -> None:
      for s in downstream:
        with self.lock:
          self.waiting[s][i] -= 1
          ready = self.waiting[s][i] == 0
        if not ready:
          continue
        try:
          self.inputs[s][i] = self._item_inputs(s, i)
        except BaseException as e:  # a bug in rowwise code: fail the run with it
          self.scope.fail(e)
          self._report(None, e)
          return
        self.jobs[s].feed((i,))
    return item_done

  # -- completion -------------------------------------------------------------

  def _job_done(self, job) -> None:
    if job.error is not None:
      self._report(None, job.error)
      return
    with self.lock:
      self.left -= 1
      last = self.left == 0
    if last:
      try:
        outs = self._outputs()
      except BaseException as e:  # a stacking error would be a bug: report it
        self._report(None, e)
        return
      self._report(outs, None)

  def _report(self, outs, error) -> None:
    with self.lock:
      if self.reported:
        return
      self.reported = True
    self.report(outs, error)

  def _outputs(self) -> list:
    outs = []
    for stage, job in zip(self.spec.stages, self.jobs):
      for o in stage.eqn.params["op"].collect(job):
        outs.append(o.reshape(self.batch + o.shape[1:]))
    return outs

  def _empty_outputs(self) -> list:
    return [np.zeros(a.shape, a.dtype) for a in self.out_avals]
