"""The execution engine: a dataflow scheduler over a plan.

Every node starts the moment its inputs are ready, not level by level, so a
slow call never holds back an unrelated branch. Tensor segments are
dispatched on the scheduler's thread (JAX's async dispatch returns at once;
the values are futures); host calls start as jobs in the run's `Scope` and
report back through a queue, so no thread waits on a host call but the
scheduler's own. Control flow holding host calls runs on a runtime worker,
its sub-plans in the same scope.

When calls wait for slots of a concurrency limit, the one heading the
longest remaining path (measured per call site) goes first (priority.py).

Fail-fast: the first failure cancels the scope (queued calls never start,
running ones are told to stop), and the run raises it at once; calls that
ignore cancellation are abandoned (see scope.py).

The top-level run of a jitted function stamps its steps in a `RunTimeline`
(timeline.py) for the stats; while a trace records, segments, the
scheduler's own work and each node's span show in it too.
"""
from __future__ import annotations

import collections
import functools
import heapq
import itertools
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xcs_jax._src import tracing
from xcs_jax._src.jit import priority
from xcs_jax._src.jit.classify import Kind
from xcs_jax._src.jit.explain import step_labels
from xcs_jax._src.jit.ir import read
from xcs_jax._src.jit.pseudo import run_on_host
from xcs_jax._src.jit.timeline import RunTimeline, StepTimes
from xcs_jax._src.primitives import HostCall
from xcs_jax._src.scope import Scope


class RunLimit:
  """`xcs_jax.jit(..., max_concurrency=k)`: at most k host nodes in flight,
  shared by a run and the sub-plans of its control flow. Nodes over the
  limit wait in the runtime's `Limits` (no thread is held while they wait)."""

  __slots__ = ("key", "limit")

  def __init__(self, limit: int):
    self.key = ("max_concurrency", object())
    self.limit = limit


class _PlanRun:
  """One run of a plan: an environment, readiness counts, reports."""

  def __init__(self, plan, args: list, scope: Scope, run_limit: RunLimit | None,
               timeline: RunTimeline | None, base_priority: float):
    self.plan = plan
    self.scope = scope
    self.run_limit = run_limit
    self.env: dict = dict(plan.program.consts)
    self.env.update(zip(plan.program.invars, args))
    self.waiting = {i: len(s.deps) for i, s in plan.steps.items()}
    # Reports from host work. A report wakes the scheduler only when it is not
    # already awake: per-report wake-ups would make the scheduler and the
    # workers trade the GIL once per call.
    self.reports: collections.deque = collections.deque()
    self.has_reports = threading.Event()
    self.in_flight = 0
    self.priority = (priority.remaining_paths(plan, scope.runtime.call_times, base_priority)
                     if priority.CRITICAL_PATH_FIRST else None)
    # Ready steps, the one heading the longest remaining path first (then in
    # the order they became ready).
    self.ready: list = []
    self.arrivals = itertools.count()
    self.timeline = timeline
    now = time.perf_counter()
    if timeline is not None:
      timeline.plan_start = now
      timeline.steps = {i: StepTimes() for i in plan.steps}
    for i, n in self.waiting.items():
      if n == 0:
        self._make_ready(i, now)
    self.listening = tracing.listening()
    self.labels = step_labels(plan) if self.listening else None
    self.spans: dict = {}    # step index -> async span id, while a trace records

  def _priority(self, index: int) -> float:
    return self.priority[index] if self.priority is not None else 0.0

  def _make_ready(self, index: int, now: float) -> None:
    heapq.heappush(self.ready, (-self._priority(index), next(self.arrivals), index))
    if self.timeline is not None:
      self.timeline.steps[index].ready = now

  # -- starting nodes ----------------------------------------------------------

  def _report(self, index: int, result: Any, error: BaseException | None) -> None:
    self.reports.append((index, result, error, time.perf_counter()))
    if not self.has_reports.is_set():
      self.has_reports.set()

  def _start_host(self, step, values: list) -> bool:
    if self.scope.cancelled:
      return False
    if self.timeline is not None and self.run_limit is not None:
      self.timeline.steps[step.index].granted = time.perf_counter()
    p = step.eqn.params
    call = HostCall(p["op"], p["batch_ndim"], p["in_batched"], p["source"], values)

    def done(job):
      if self.run_limit is not None:
        self.scope.runtime.limits.release(self.run_limit.key)
      if job.error is not None:
        self._report(step.index, None, job.error)
        return
      try:
        self._report(step.index, call.outputs(job), None)
      except BaseException as e:  # a stacking error would be a bug: report it
        self._report(step.index, None, e)

    if call.n == 0:
      self._report(step.index, call.outputs(None), None)
      if self.run_limit is not None:
        self.scope.runtime.limits.release(self.run_limit.key)
    else:
      job = call.start(self.scope, on_done=done, priority=self._priority(step.index))
      if self.timeline is not None:
        self.timeline.steps[step.index].jobs.append(job)
    return True

  def _start_control(self, step, values: list) -> None:
    run_sub = functools.partial(self._run_sub, base_priority=self._priority(step.index))

    def run():
      try:
        result = step.run(values, self.scope, run_sub)
      except BaseException as e:  # reported to the scheduler thread
        self._report(step.index, None, e)
      else:
        self._report(step.index, result, None)
    self.scope.runtime.pool.submit(run)

  def _run_sub(self, plan, args, scope, base_priority=0.0):
    return run_plan(plan, list(args), scope=scope, run_limit=self.run_limit,
                    base_priority=base_priority)

  def _read_inputs(self, step) -> list:
    """The step's inputs as numpy (a host call's or stream's): with JAX's
    asynchronous dispatch, this is where the segments computing them are
    waited for."""
    env = self.env
    if step.pre:  # STACKs of the call's inputs, in numpy (see partition.py)
      env = dict(env)
      for e in step.pre:
        env.update(zip(e.outs, run_on_host(e, [read(r, env) for r in e.ins])))
    # in eqn order, literals too
    return [np.asarray(read(r, env)) for r in step.eqn.ins]

  def _start(self, step) -> None:
    tl = self.timeline.steps[step.index] if self.timeline is not None else None
    start = time.perf_counter()
    rec = tracing.recorder
    if rec is not None and self.listening:   # nodes overlap: async slices, ours only
      self.spans[step.index] = rec.begin_async(self.labels[step.index], "node", start,
                                               {"step": step.index})
    if step.kind is Kind.CONTROL:
      values = [read(r, self.env) for r in step.eqn.ins]
    else:
      values = self._read_inputs(step)
    if tl is not None:
      tl.start = start
      tl.inputs_s = time.perf_counter() - start
    self.in_flight += 1
    if step.kind is Kind.STREAM:
      run = step.run.start(self.scope, values,
                           lambda outs, error: self._report(step.index, outs, error),
                           priority=self._priority(step.index))
      if tl is not None:
        tl.jobs.extend(run.jobs)
    elif step.kind is not Kind.HOST:
      self._start_control(step, values)
    elif self.run_limit is None:
      self._start_host(step, values)
    else:
      self.scope.runtime.limits.request(self.run_limit.key, self.run_limit.limit,
                                        lambda: self._start_host(step, values),
                                        self._priority(step.index),
                                        lambda: step_labels(self.plan)[step.index])

  def _run_tensor(self, step) -> bool:
    """Dispatches a tensor segment; False if it failed (the scope is failed)."""
    span = tracing.Span(self.labels[step.index], "segment", {"step": step.index}) \
        if self.listening else None
    start = time.perf_counter()
    try:
      outs = step.run(*[self.env[r] for r in step.ins])
    except Exception as e:  # a shape or runtime error in tensor code
      self.scope.fail(e)
      return False
    finally:
      end = span.end() if span is not None else time.perf_counter()
    if self.timeline is not None:
      tl = self.timeline.steps[step.index]
      tl.start, tl.end = start, end
    self._finish(step, outs, end)
    return True

  def _finish(self, step, outs, now: float) -> None:
    self.env.update(zip(step.out_ids, outs))
    for e in step.post:  # UNSTACKs of the call's outputs, in numpy
      self.env.update(zip(e.outs, run_on_host(e, [read(r, self.env) for r in e.ins])))
    if self.timeline is not None:
      self.timeline.steps[step.index].released = now
    for d in step.dependents:
      self.waiting[d] -= 1
      if self.waiting[d] == 0:
        self._make_ready(d, now)

  def _drain_reports(self) -> None:
    steps, scope = self.plan.steps, self.scope
    now = time.perf_counter()
    while self.reports:
      index, result, error, ended = self.reports.popleft()
      self.in_flight -= 1
      if self.timeline is not None:
        self.timeline.steps[index].end = ended
      ident = self.spans.pop(index, None)
      if ident is not None and tracing.recorder is not None:
        tracing.recorder.end_async(self.labels[index], "node", now, ident)
      if error is not None:
        scope.fail(error)
      elif not scope.cancelled:
        self._finish(steps[index], result, now)

  def _end_spans(self) -> None:
    rec, now = tracing.recorder, time.perf_counter()
    for index, ident in self.spans.items():
      if rec is not None:
        rec.end_async(self.labels[index], "node", now, ident)
    self.spans.clear()

  def _start_ready(self) -> None:
    steps, scope = self.plan.steps, self.scope
    while self.ready and not scope.cancelled:
      step = steps[heapq.heappop(self.ready)[2]]
      if step.kind is Kind.TENSOR:
        if not self._run_tensor(step):
          break
      else:
        self._start(step)

  # -- the loop ----------------------------------------------------------------

  def run(self) -> list:
    scope = self.scope
    try:
      while True:
        span = tracing.Span("scheduler", "scheduler") if self.listening else None
        self._drain_reports()
        self._start_ready()
        if span is not None:
          span.end()
        if scope.cancelled or self.in_flight == 0:
          break
        scope.wait(self.has_reports)
        self.has_reports.clear()  # before draining: a report after this sets it again
    finally:
      if self.spans:   # nodes cut short by a failure: their slices end here
        self._end_spans()
    if scope.error is not None:
      raise scope.error
    if any(self.waiting.values()):  # pragma: no cover - would be a scheduler bug
      raise RuntimeError("xcs_jax scheduler stopped with nodes not run")
    return [_as_jax(read(r, self.env)) for r in self.plan.program.outvars]


def run_plan(plan, args: list, *, scope: Scope, run_limit: RunLimit | None = None,
             timeline: RunTimeline | None = None, base_priority: float = 0.0) -> list:
  """Runs `plan` on flat `args` in `scope`; returns its flat outputs.

  The caller owns the scope (and calls `scope.finish()` after a failure).
  `timeline` (the top-level run of a jitted function) is stamped as the
  steps run; `base_priority` is the remaining path after this plan (a
  control-flow body's).
  """
  if plan.whole is not None:
    return list(plan.whole(*args))
  return _PlanRun(plan, args, scope, run_limit, timeline, base_priority).run()


def _as_jax(x: Any) -> Any:
  return x if isinstance(x, jax.Array) else jnp.asarray(x)  # like jax.jit's outputs
