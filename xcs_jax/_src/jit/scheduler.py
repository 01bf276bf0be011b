"""The execution engine: a dataflow scheduler over a plan.

Every node starts the moment its inputs are ready, not level by level, so a
slow call never holds back an unrelated branch. Tensor segments are
dispatched on the calling thread (JAX's async dispatch returns at once; the
values are futures); host calls and control nodes run on the executor's
pools and report back through a queue.

Fail-fast: the first failure cancels the plan's `CallContext` (running calls
stop at their next cancellation point), cancels what has not started, waits
at most `CANCEL_GRACE_S` for running calls to end, and raises that failure.
"""
from __future__ import annotations

import collections
import queue
import time
from typing import Any

import jax.numpy as jnp
import numpy as np

from xcs_jax._src.errors import XCSCancelledError
from xcs_jax._src.executor import CallContext, coordinator_pool
from xcs_jax._src.jit.classify import Kind
from xcs_jax._src.jit.ir import read
from xcs_jax._src.primitives import run_host_call

CANCEL_GRACE_S = 10.0


class RunRecord:
  """What one run measured: summed host-call seconds."""

  __slots__ = ("host_seconds",)

  def __init__(self) -> None:
    self.host_seconds = 0.0


def _run_host_step(step, values, ctx):
  start = time.perf_counter()
  p = step.eqn.params
  outs = run_host_call(p["op"], p["batch_ndim"], p["in_batched"], p["source"], *values,
                       ctx=ctx)
  return outs, time.perf_counter() - start


def _run_control_step(step, values, ctx, max_concurrency, record):
  def run_sub(plan, args, sub_ctx):
    return run_plan(plan, list(args), ctx=sub_ctx, max_concurrency=max_concurrency,
                    record=record)
  return step.run(values, ctx, run_sub), 0.0  # sub-plans count their host time


def run_plan(plan, args: list, *, ctx: CallContext | None = None,
             max_concurrency: int | None = None, record: RunRecord | None = None) -> list:
  """Runs `plan` on flat `args`; returns its flat outputs."""
  if plan.whole is not None:
    return list(plan.whole(*args))
  ctx = ctx or CallContext()
  record = record or RunRecord()
  env: dict = dict(plan.program.consts)
  env.update(zip(plan.program.invars, args))
  steps = plan.steps
  waiting = {i: len(s.deps) for i, s in steps.items()}
  ready = collections.deque(i for i, n in waiting.items() if n == 0)
  done: queue.SimpleQueue = queue.SimpleQueue()
  in_flight: dict = {}
  error: BaseException | None = None

  def finish(step, outs):
    env.update(zip(step.outs, outs))
    for d in step.dependents:
      waiting[d] -= 1
      if waiting[d] == 0:
        ready.append(d)

  def submit(step):
    values = [read(r, env) for r in step.eqn.ins]  # in eqn order, literals too
    if step.kind is Kind.HOST:
      pool = coordinator_pool() if step.batched else step.eqn.params["op"].pool()
      future = pool.submit(_run_host_step, step, values, ctx)
    else:
      future = coordinator_pool().submit(_run_control_step, step, values, ctx,
                                         max_concurrency, record)
    in_flight[step.index] = future
    future.add_done_callback(lambda f, i=step.index: done.put((i, f)))

  def fail(e):
    nonlocal error
    if error is None or (isinstance(error, XCSCancelledError)
                         and not isinstance(e, XCSCancelledError)):
      error = e
    ctx.cancel()
    for f in in_flight.values():
      f.cancel()

  grace_deadline = None
  while True:
    while ready and error is None and (max_concurrency is None
                                       or len(in_flight) < max_concurrency):
      step = steps[ready.popleft()]
      if step.kind is Kind.TENSOR:
        try:
          outs = step.run(*[env[r] for r in step.ins])
        except Exception as e:  # a shape or runtime error in tensor code
          fail(e)
          break
        finish(step, outs)
      else:
        submit(step)
    if not in_flight:
      break
    try:
      timeout = None if grace_deadline is None else max(0.0, grace_deadline - time.monotonic())
      index, future = done.get(timeout=timeout)
    except queue.Empty:
      break  # calls that ignore cancellation: do not wait for them forever
    del in_flight[index]
    if future.cancelled():
      continue
    exc = future.exception()
    if exc is not None:
      fail(exc)
      grace_deadline = grace_deadline or time.monotonic() + CANCEL_GRACE_S
      continue
    if error is None:
      outs, seconds = future.result()
      record.host_seconds += seconds
      finish(steps[index], outs)
  if error is not None:
    raise error
  if any(waiting.values()):  # pragma: no cover - would be a scheduler bug
    raise RuntimeError("xcs_jax scheduler stopped with nodes not run")
  return [_as_jax(read(r, env)) for r in plan.program.outvars]


def _as_jax(x: Any) -> Any:
  return jnp.asarray(x) if isinstance(x, np.ndarray) else x
