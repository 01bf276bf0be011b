"""The execution engine: a dataflow scheduler over a plan.

Every node starts the moment its inputs are ready, not level by level, so a
slow call never holds back an unrelated branch. Tensor segments are
dispatched on the calling thread (JAX's async dispatch returns at once; the
values are futures); host calls and control nodes run on the executor's
pools and report back through a queue.

Fail-fast: the first failure cancels the plan's `CallContext` (running calls
stop at their next cancellation point), drops what has not started, waits at
most `CANCEL_GRACE_S` for running calls to end, and raises that failure.
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp

from xcs_jax._src.errors import XCSCancelledError
from xcs_jax._src.executor import CANCEL_GRACE_S, CallContext, coordinator_pool
from xcs_jax._src.jit.classify import Kind
from xcs_jax._src.jit.ir import read
from xcs_jax._src.primitives import run_host_call



def _run_host_step(step, values, ctx, limit):
  if limit is not None:
    with limit:
      return _run_host_step(step, values, ctx, None)
  p = step.eqn.params
  return run_host_call(p["op"], p["batch_ndim"], p["in_batched"], p["source"], *values,
                       ctx=ctx)


def _run_control_step(step, values, ctx, limit):
  def run_sub(plan, args, sub_ctx):
    return run_plan(plan, list(args), ctx=sub_ctx, limit=limit)
  return step.run(values, ctx, run_sub)


class _Lane:
  """The host work of one run that goes to one pool.

  Workers (at most the pool's size) take the next queued node until the
  queue is empty: one pool task per worker rather than per node, which keeps
  the per-call cost close to a bare ThreadPoolExecutor.
  """

  __slots__ = ("pool", "queue", "workers", "lock")

  def __init__(self, pool):
    self.pool = pool
    self.queue = collections.deque()
    self.workers = 0
    self.lock = threading.Lock()


def run_plan(plan, args: list, *, ctx: CallContext | None = None,
             limit: threading.Semaphore | None = None) -> list:
  """Runs `plan` on flat `args`; returns its flat outputs.

  `limit`, shared with the sub-plans of control flow, bounds how many host
  calls run at once (`xcs_jax.jit(..., max_concurrency=...)`).
  """
  if plan.whole is not None:
    return list(plan.whole(*args))
  ctx = ctx or CallContext()
  env: dict = dict(plan.program.consts)
  env.update(zip(plan.program.invars, args))
  steps = plan.steps
  waiting = {i: len(s.deps) for i, s in steps.items()}
  ready = collections.deque(i for i, n in waiting.items() if n == 0)
  # Reports from workers. A worker wakes the scheduler only when it is not
  # already awake: per-report wake-ups would make the scheduler and the
  # workers trade the GIL once per call.
  done: collections.deque = collections.deque()
  has_reports = threading.Event()
  lanes: dict = {}
  in_flight = 0
  error: BaseException | None = None

  def work(lane):
    while True:
      with lane.lock:
        if not lane.queue:
          lane.workers -= 1
          return
        step, values = lane.queue.popleft()
      try:
        if step.kind is Kind.HOST:
          result = _run_host_step(step, values, ctx, limit)
        else:
          result = _run_control_step(step, values, ctx, limit)
        done.append((step.index, result, None))
      except BaseException as e:  # reported to the scheduler thread
        done.append((step.index, None, e))
      if not has_reports.is_set():
        has_reports.set()

  def enqueue(step):
    values = [read(r, env) for r in step.eqn.ins]  # in eqn order, literals too
    if step.kind is Kind.HOST and not step.batched:
      pool = step.eqn.params["op"].pool()
    else:  # waits on other work: never hold a provider slot
      pool = coordinator_pool()
    lane = lanes.get(id(pool))
    if lane is None:
      lane = lanes[id(pool)] = _Lane(pool)
    with lane.lock:
      lane.queue.append((step, values))
    return lane

  def start_workers(lane):
    with lane.lock:
      # Busy workers may hold slow calls: count only what the queue needs,
      # within the pool's size (a spare worker finds the queue empty and ends).
      spawn = min(len(lane.queue), lane.pool.size - lane.workers)
      if spawn > 0:
        lane.workers += spawn
    for _ in range(spawn):
      lane.pool.submit(work, lane)

  def finish(step, outs):
    env.update(zip(step.out_ids, outs))
    for d in step.dependents:
      waiting[d] -= 1
      if waiting[d] == 0:
        ready.append(d)

  def fail(e):
    nonlocal error, in_flight
    if error is None or (isinstance(error, XCSCancelledError)
                         and not isinstance(e, XCSCancelledError)):
      error = e
    ctx.cancel()
    for lane in lanes.values():  # what has not started never will
      with lane.lock:
        in_flight -= len(lane.queue)
        lane.queue.clear()

  try:
    grace_deadline = None
    while True:
      touched = set()
      while ready and error is None:
        step = steps[ready.popleft()]
        if step.kind is Kind.TENSOR:
          try:
            outs = step.run(*[env[r] for r in step.ins])
          except Exception as e:  # a shape or runtime error in tensor code
            fail(e)
            break
          finish(step, outs)
        else:
          in_flight += 1
          touched.add(enqueue(step))
      for lane in touched:  # all ready work queued first, then the workers
        start_workers(lane)
      if in_flight == 0:
        break
      if error is not None and grace_deadline is None:
        grace_deadline = time.monotonic() + CANCEL_GRACE_S
      timeout = None if grace_deadline is None else max(0.0, grace_deadline - time.monotonic())
      if not has_reports.wait(timeout):
        break  # calls that ignore cancellation: do not wait for them forever
      has_reports.clear()  # before draining: a report after this sets it again
      reports = []
      while done:
        reports.append(done.popleft())
      for index, result, exc in reports:
        in_flight -= 1
        if exc is not None:
          fail(exc)
        elif error is None:
          finish(steps[index], result)
  except BaseException:  # KeyboardInterrupt, or a bug here: stop what was started
    fail(XCSCancelledError("interrupted"))
    raise
  if error is not None:
    raise error
  if any(waiting.values()):  # pragma: no cover - would be a scheduler bug
    raise RuntimeError("xcs_jax scheduler stopped with nodes not run")
  return [_as_jax(read(r, env)) for r in plan.program.outvars]


def _as_jax(x: Any) -> Any:
  return x if isinstance(x, jax.Array) else jnp.asarray(x)  # like jax.jit's outputs
