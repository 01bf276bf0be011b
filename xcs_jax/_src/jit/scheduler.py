"""The execution engine: a dataflow scheduler over a plan.

Every node starts the moment its inputs are ready, not level by level, so a
slow call never holds back an unrelated branch. Tensor segments are
dispatched on the scheduler's thread (JAX's async dispatch returns at once;
the values are futures); host calls start as jobs in the run's `Scope` and
report back through a queue, so no thread waits on a host call but the
scheduler's own. Control flow holding host calls runs on a runtime worker,
its sub-plans in the same scope.

Fail-fast: the first failure cancels the scope (queued calls never start,
running ones are told to stop), and the run raises it at once; calls that
ignore cancellation are abandoned (see scope.py).
"""
from __future__ import annotations

import collections
import threading
from typing import Any

import jax
import jax.numpy as jnp

from xcs_jax._src.jit.classify import Kind
from xcs_jax._src.jit.ir import read
from xcs_jax._src.jit.pseudo import run_on_host
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

  def __init__(self, plan, args: list, scope: Scope, run_limit: RunLimit | None):
    self.plan = plan
    self.scope = scope
    self.run_limit = run_limit
    self.env: dict = dict(plan.program.consts)
    self.env.update(zip(plan.program.invars, args))
    self.waiting = {i: len(s.deps) for i, s in plan.steps.items()}
    self.ready = collections.deque(i for i, n in self.waiting.items() if n == 0)
    # Reports from host work. A report wakes the scheduler only when it is not
    # already awake: per-report wake-ups would make the scheduler and the
    # workers trade the GIL once per call.
    self.reports: collections.deque = collections.deque()
    self.has_reports = threading.Event()
    self.in_flight = 0

  # -- starting nodes ----------------------------------------------------------

  def _report(self, index: int, result: Any, error: BaseException | None) -> None:
    self.reports.append((index, result, error))
    if not self.has_reports.is_set():
      self.has_reports.set()

  def _start_host(self, step, values: list) -> bool:
    if self.scope.cancelled:
      return False
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
      call.start(self.scope, on_done=done)
    return True

  def _start_control(self, step, values: list) -> None:
    def run():
      try:
        result = step.run(values, self.scope, self._run_sub)
      except BaseException as e:  # reported to the scheduler thread
        self._report(step.index, None, e)
      else:
        self._report(step.index, result, None)
    self.scope.runtime.pool.submit(run)

  def _run_sub(self, plan, args, scope):
    return run_plan(plan, list(args), scope=scope, run_limit=self.run_limit)

  def _start(self, step) -> None:
    env = self.env
    if step.pre:  # STACKs of the call's inputs, in numpy (see partition.py)
      env = dict(env)
      for e in step.pre:
        env.update(zip(e.outs, run_on_host(e, [read(r, env) for r in e.ins])))
    values = [read(r, env) for r in step.eqn.ins]  # in eqn order, literals too
    self.in_flight += 1
    if step.kind is Kind.STREAM:
      step.run.start(self.scope, values,
                     lambda outs, error: self._report(step.index, outs, error))
    elif step.kind is not Kind.HOST:
      self._start_control(step, values)
    elif self.run_limit is None:
      self._start_host(step, values)
    else:
      self.scope.runtime.limits.request(self.run_limit.key, self.run_limit.limit,
                                        lambda: self._start_host(step, values))

  def _finish(self, step, outs) -> None:
    self.env.update(zip(step.out_ids, outs))
    for e in step.post:  # UNSTACKs of the call's outputs, in numpy
      self.env.update(zip(e.outs, run_on_host(e, [read(r, self.env) for r in e.ins])))
    for d in step.dependents:
      self.waiting[d] -= 1
      if self.waiting[d] == 0:
        self.ready.append(d)

  # -- the loop ----------------------------------------------------------------

  def run(self) -> list:
    steps, scope = self.plan.steps, self.scope
    while True:
      while self.ready and not scope.cancelled:
        step = steps[self.ready.popleft()]
        if step.kind is Kind.TENSOR:
          try:
            outs = step.run(*[self.env[r] for r in step.ins])
          except Exception as e:  # a shape or runtime error in tensor code
            scope.fail(e)
            break
          self._finish(step, outs)
        else:
          self._start(step)
      if scope.cancelled or self.in_flight == 0:
        break
      scope.wait(self.has_reports)
      self.has_reports.clear()  # before draining: a report after this sets it again
      while self.reports:
        index, result, error = self.reports.popleft()
        self.in_flight -= 1
        if error is not None:
          scope.fail(error)
        elif not scope.cancelled:
          self._finish(steps[index], result)
    if scope.error is not None:
      raise scope.error
    if any(self.waiting.values()):  # pragma: no cover - would be a scheduler bug
      raise RuntimeError("xcs_jax scheduler stopped with nodes not run")
    return [_as_jax(read(r, self.env)) for r in self.plan.program.outvars]


def run_plan(plan, args: list, *, scope: Scope, run_limit: RunLimit | None = None) -> list:
  """Runs `plan` on flat `args` in `scope`; returns its flat outputs.

  The caller owns the scope (and calls `scope.finish()` after a failure).
  """
  if plan.whole is not None:
    return list(plan.whole(*args))
  return _PlanRun(plan, args, scope, run_limit).run()


def _as_jax(x: Any) -> Any:
  return x if isinstance(x, jax.Array) else jnp.asarray(x)  # like jax.jit's outputs
