"""Structured concurrency for host calls: contexts, scopes and jobs.

- `Scope`: the host work of one run, in the manner of `asyncio.TaskGroup`.
  The first failure cancels the scope: queued calls never start, running
  calls are told to stop (cooperative calls poll their `CallContext`, async
  calls are cancelled), and the waiter raises at once. Calls that ignore
  cancellation are abandoned: they finish in the background, their results
  are discarded, and they hold nothing later runs need (a worker is replaced
  by a new one; an endpoint's slot stays taken until the request really
  ends, since the server still sees it).
- `Job`: one batched host call in a scope: `n` items on at most `limit`
  lanes. A lane is one worker (or one asyncio task) taking the next item
  until none is left, which keeps the per-item cost near a bare
  `ThreadPoolExecutor.map`.
- `CallContext`: what one call sees: cancellation, its deadline, the clock.

Timeouts count a call's own running time: a call's deadline is set when a
lane starts it, never while it waits in a queue.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
import time
from typing import Any, Callable

from xcs_jax._src.errors import XCSCancelledError, XCSTimeoutError
from xcs_jax._src.executor import REAL_CLOCK, Clock

POLL_S = 0.02
"""How often a waiting caller wakes to notice `_thread.interrupt_main()` and
uncancellable calls past their deadline (a real SIGINT wakes it at once)."""

_NEVER = threading.Event()  # waited on by contexts that have no scope


class CallContext:
  """What one host call gets: cancellation, its deadline, a clock.

  Providers poll `check()` or sleep through `sleep()` so that a failing
  sibling, an interrupt or the deadline stops them; async providers are
  cancelled by their task instead. `CallContext()` on its own (no scope, no
  deadline) is fine for calling a provider directly.

  Attributes:
    deadline: a `clock.now()` value past which the call must raise
      `XCSTimeoutError`, or None.
    timeout_s: the timeout the deadline came from (for messages).
  """

  __slots__ = ("scope", "deadline", "timeout_s", "clock", "hard_deadline", "abandoned",
               "index")

  def __init__(self, scope: "Scope | None" = None, *, timeout_s: float | None = None,
               clock: Clock = REAL_CLOCK, hard: bool = False, index: int = 0):
    self.scope = scope
    self.index = index       # the item of its batch
    self.clock = clock
    self.timeout_s = timeout_s
    self.deadline = None if timeout_s is None else clock.now() + float(timeout_s)
    # Calls that cannot stop themselves (a host function) are timed out by the
    # waiter at their deadline.
    self.hard_deadline = self.deadline if hard else None
    self.abandoned = False

  @property
  def cancelled(self) -> bool:
    return self.scope is not None and self.scope.cancelled

  def check(self) -> None:
    """Raises `XCSCancelledError` if the call's run failed or was interrupted."""
    if self.scope is not None and self.scope.cancelled:
      raise XCSCancelledError(f"cancelled: {self.scope.cancel_reason}")

  def remaining(self) -> float | None:
    """Seconds left before the deadline (None without one)."""
    return None if self.deadline is None else self.deadline - self.clock.now()

  def check_deadline(self) -> None:
    """`check()`, then `XCSTimeoutError` if the deadline has passed."""
    self.check()
    if self.deadline is not None and self.clock.now() > self.deadline:
      raise self.timeout_error()

  def timeout_error(self) -> XCSTimeoutError:
    return XCSTimeoutError(f"the call ran past its timeout of {self.timeout_s} s")

  def sleep(self, seconds: float) -> None:
    """Sleeps `seconds`, waking early (and raising) on cancellation or deadline."""
    event = self.scope._cancelled if self.scope is not None else _NEVER
    left = self.remaining()
    if left is not None and left < seconds:
      if self.clock.wait(event, left):
        self.check()
      raise self.timeout_error()
    if self.clock.wait(event, seconds):
      self.check()

  async def asleep(self, seconds: float) -> None:
    """`sleep` for async providers (cancellation arrives as task cancellation)."""
    left = self.remaining()
    if left is not None and left < seconds:
      await asyncio.sleep(max(0.0, left))
      raise self.timeout_error()
    await asyncio.sleep(seconds)


class _Lane:
  """One worker (or asyncio task) of a job, and the call it is running."""

  __slots__ = ("job", "ctx", "detached", "task")

  def __init__(self, job: "Job"):
    self.job = job
    self.ctx: CallContext | None = None
    self.detached = False    # abandoned: it releases nothing and reports nothing
    self.task = None         # the asyncio task of an async lane


class Scope:
  """The host work of one run: the first failure cancels all of it.

  Made by whoever runs host calls (an eager call, `xcs_jax.jit`, an XLA
  callback); jobs start in it, `wait(event)` blocks until the event is set or
  the scope fails (times out uncancellable calls, turns an interrupt into
  cancellation), and `finish()` abandons whatever still runs after a failure.

  When several calls fail, the first to fail is the scope's error (a
  cancellation is replaced by a real error that arrives after it).
  """

  def __init__(self, runtime):
    self.runtime = runtime
    self.clock: Clock = runtime.clock
    self._lock = threading.Lock()
    self._cancelled = threading.Event()
    self.error: BaseException | None = None
    self.cancel_reason = ""
    self._lanes: set[_Lane] = set()
    self._lanes_empty = threading.Event()
    self._lanes_empty.set()
    self._waiters: set[threading.Event] = set()
    self._jobs: list[Job] = []
    self.call_seconds = 0.0

  @property
  def cancelled(self) -> bool:
    return self._cancelled.is_set()

  def fail(self, error: BaseException) -> None:
    """Records `error` (the first real one wins) and cancels the scope."""
    with self._lock:
      if self.error is None or (isinstance(self.error, XCSCancelledError)
                                and not isinstance(error, XCSCancelledError)):
        self.error = error
      if self._cancelled.is_set():
        return
      self.cancel_reason = ("interrupted" if isinstance(error, XCSCancelledError)
                            and "interrupt" in str(error) else "a sibling call failed first")
      self._cancelled.set()
      waiters = list(self._waiters)
      tasks = [lane.task for lane in self._lanes if lane.task is not None]
    for w in waiters:
      w.set()
    if tasks:
      loop = self.runtime.event_loop().loop
      for t in tasks:
        loop.call_soon_threadsafe(t.cancel)

  def cancel(self, reason: str = "cancelled") -> None:
    self.fail(XCSCancelledError(reason))

  def check(self) -> None:
    """Raises `XCSCancelledError` if the scope failed or was cancelled."""
    if self._cancelled.is_set():
      raise XCSCancelledError(f"cancelled: {self.cancel_reason}")

  def add_call_time(self, seconds: float) -> None:
    with self._lock:
      self.call_seconds += seconds

  # -- lanes -----------------------------------------------------------------

  def _enter(self, lane: _Lane) -> None:
    with self._lock:
      self._lanes.add(lane)
      self._lanes_empty.clear()

  def _leave(self, lane: _Lane) -> None:
    with self._lock:
      self._lanes.discard(lane)
      if not self._lanes:
        self._lanes_empty.set()

  def _start_job(self, job: "Job") -> None:
    with self._lock:
      self._jobs.append(job)

  # -- waiting ---------------------------------------------------------------

  def wait(self, event: threading.Event) -> None:
    """Blocks until `event` is set or the scope fails.

    Wakes every `POLL_S` (so `_thread.interrupt_main()` is seen in time) or at
    the next deadline of a call that cannot stop itself, which it then times
    out. A `KeyboardInterrupt` cancels the scope and propagates.
    """
    with self._lock:
      self._waiters.add(event)
    try:
      while not event.is_set() and not self._cancelled.is_set():
        timeout = POLL_S
        next_deadline = self._time_out_overdue()
        if next_deadline is not None:
          timeout = min(timeout, max(0.0, next_deadline - self.clock.now()))
        event.wait(timeout)
    except BaseException:
      self.cancel("interrupted")
      raise
    finally:
      with self._lock:
        self._waiters.discard(event)

  def _time_out_overdue(self) -> float | None:
    """Abandons calls past their hard deadline; returns the next one."""
    now = self.clock.now()
    nearest = None
    with self._lock:
      lanes = [lane for lane in self._lanes
               if lane.ctx is not None and lane.ctx.hard_deadline is not None]
    for lane in lanes:
      ctx = lane.ctx
      if ctx is None or ctx.hard_deadline is None:
        continue
      if now >= ctx.hard_deadline:
        lane.job._abandon_timed_out(lane, ctx)
      elif nearest is None or ctx.hard_deadline < nearest:
        nearest = ctx.hard_deadline
    return nearest

  def finish(self, grace_s: float | None = None) -> None:
    """After a failure: lets running calls see the cancellation for up to
    `grace_s` (the runtime's `cancel_grace_s`), then abandons the rest."""
    if not self._cancelled.is_set():
      return
    grace = self.runtime.cancel_grace_s if grace_s is None else grace_s
    if grace > 0:
      self._lanes_empty.wait(grace)
    with self._lock:
      lanes = list(self._lanes)
      jobs = list(self._jobs)
    abandoned = 0
    for lane in lanes:
      abandoned += lane.job._abandon(lane)
    for job in jobs:
      job._account_dropped()
    if abandoned:
      self.runtime._note_abandoned(abandoned)


class Job:
  """One batched host call: `n` items on at most `limit` lanes, in a scope.

  Args:
    scope: the run it belongs to.
    n: number of items.
    run_item: `run_item(i, ctx)` runs item i (sync) and returns its result;
      or, with `is_async`, an `async def` doing the same on the event loop.
    limit_key, limit: the concurrency limit its calls hold (None: no limit).
    timeout_s: each item's timeout, from when it starts.
    hard_timeout: items cannot stop themselves: the waiter times them out.
    release_on_abandon: an abandoned item gives its limit slot back at once
      (a host function); otherwise when it really ends (a network request).
    wrap_error: `wrap_error(error, i)` is the error raised for item i.
    on_done: called (from any thread) once the job completed or failed.
    hooks: the op's usage hooks (`record_abandoned(runtime, k)`,
      `record_dropped(runtime, k)`), or None.
  """

  def __init__(self, scope: Scope, n: int, run_item: Callable, *,
               limit_key: Any = None, limit: int | None = None,
               timeout_s: float | None = None, hard_timeout: bool = False,
               release_on_abandon: bool = False, is_async: bool = False,
               wrap_error: Callable[[BaseException, int], BaseException] = lambda e, i: e,
               on_done: Callable[["Job"], None] | None = None, hooks: Any = None):
    self.scope = scope
    self.n = n
    self.run_item = run_item
    self.limit_key = limit_key
    self.limit = limit
    self.timeout_s = timeout_s
    self.hard_timeout = hard_timeout
    self.release_on_abandon = release_on_abandon
    self.is_async = is_async
    self.wrap_error = wrap_error
    self.on_done = on_done
    self.hooks = hooks
    self.results: list = [None] * n
    self.error: BaseException | None = None
    self.done = threading.Event()
    self._next = itertools.count()
    self._lock = threading.Lock()
    self._left = n
    self._finished = False
    self._dropped_counted = False

  def start(self) -> "Job":
    scope = self.scope
    scope._start_job(self)
    if self.n == 0:
      self._finish()
      return self
    lanes = self.n if self.limit is None else min(self.n, self.limit)
    limits = scope.runtime.limits
    for _ in range(lanes):
      if self.limit_key is None:
        self._grant()
      else:
        limits.request(self.limit_key, self.limit, self._grant)
    return self

  # -- lanes -----------------------------------------------------------------

  def _grant(self) -> bool:
    if self.scope.cancelled or self._finished:
      return False
    if self.is_async:
      loop = self.scope.runtime.event_loop().loop
      loop.call_soon_threadsafe(self._start_async_lane)
    else:
      self.scope.runtime.pool.submit(self._thread_lane)
    return True

  def _release(self, lane: _Lane) -> None:
    """Gives the lane's limit slot back as it ends (unless its abandonment
    already did: a host function's slot is free once it is abandoned, a
    request's only when it really ends, since the server still sees it)."""
    if self.limit_key is not None and not (lane.detached and self.release_on_abandon):
      self.scope.runtime.limits.release(self.limit_key)

  def _take(self) -> int | None:
    if self.scope.cancelled or self._finished:
      return None
    i = next(self._next)
    return i if i < self.n else None

  def _context(self, i: int) -> CallContext:
    return CallContext(self.scope, timeout_s=self.timeout_s, clock=self.scope.clock,
                       hard=self.hard_timeout, index=i)

  def _thread_lane(self) -> None:
    scope = self.scope
    lane = _Lane(self)
    scope._enter(lane)
    token = scope.runtime._make_current()
    seconds = 0.0
    try:
      while (i := self._take()) is not None:
        ctx = lane.ctx = self._context(i)
        start = time.perf_counter()
        try:
          result, error = self.run_item(i, ctx), None
        except BaseException as e:  # reported through the scope
          result, error = None, e
        seconds += time.perf_counter() - start
        if not self._item_ended(lane, i, result, error):
          return
    finally:
      scope.runtime._reset_current(token)
      self._lane_ended(lane, seconds)

  def _start_async_lane(self) -> None:
    lane = _Lane(self)
    self.scope._enter(lane)
    lane.task = asyncio.get_running_loop().create_task(self._async_lane(lane))
    if self.scope.cancelled:
      lane.task.cancel()

  async def _async_lane(self, lane: _Lane) -> None:
    scope = self.scope
    seconds = 0.0
    try:
      while (i := self._take()) is not None:
        ctx = lane.ctx = self._context(i)
        start = time.perf_counter()
        try:
          async with asyncio.timeout(ctx.remaining()):
            result, error = await self.run_item(i, ctx), None
        except TimeoutError as e:
          result, error = None, (e if isinstance(e, XCSTimeoutError) else ctx.timeout_error())
        except asyncio.CancelledError:
          result, error = None, XCSCancelledError(f"cancelled: {scope.cancel_reason}")
        except Exception as e:  # reported through the scope
          result, error = None, e
        seconds += time.perf_counter() - start
        if not self._item_ended(lane, i, result, error):
          return
    finally:
      self._lane_ended(lane, seconds)

  def _item_ended(self, lane: _Lane, i: int, result: Any,
                  error: BaseException | None) -> bool:
    """Records item i's outcome (unless its lane was abandoned); whether the
    lane goes on to the next item."""
    lane.ctx = None
    if lane.detached:
      return False
    if error is not None:
      self._fail(error if isinstance(error, XCSCancelledError)
                 else self.wrap_error(error, i))
      return False
    self._complete(i, result)
    return True

  def _lane_ended(self, lane: _Lane, seconds: float) -> None:
    self.scope.add_call_time(seconds)
    self.scope._leave(lane)
    self._release(lane)

  # -- completion ------------------------------------------------------------

  def _complete(self, i: int, result: Any) -> None:
    self.results[i] = result
    with self._lock:
      self._left -= 1
      last = self._left == 0 and not self._finished
    if last:
      self._finish()

  def _fail(self, error: BaseException) -> None:
    with self._lock:
      if self._finished:
        return
      self.error = error
    self.scope.fail(error)
    self._finish()

  def _finish(self) -> None:
    with self._lock:
      if self._finished:
        return
      self._finished = True
    self.done.set()
    if self.on_done is not None:
      self.on_done(self)

  def _abandon(self, lane: _Lane) -> int:
    """Detaches a lane still running after its scope ended; 1 if it was."""
    with self._lock:
      if lane.detached:
        return 0
      lane.detached = True
      ctx = lane.ctx
    if ctx is not None:
      ctx.abandoned = True
    if self.release_on_abandon and self.limit_key is not None:
      self.scope.runtime.limits.release(self.limit_key)
    if self.hooks is not None and ctx is not None:
      self.hooks.record_abandoned(self.scope.runtime, 1)
    return 1 if ctx is not None else 0

  def _abandon_timed_out(self, lane: _Lane, ctx: CallContext) -> None:
    """A call that cannot stop itself ran past its deadline: fail it now."""
    if lane.ctx is not ctx or not self._abandon(lane):
      return
    self.scope.runtime._note_abandoned(1)
    self._fail(self.wrap_error(ctx.timeout_error(), ctx.index))

  def _account_dropped(self) -> None:
    """Counts the items that never started because the scope failed."""
    with self._lock:
      if self._dropped_counted or self._left == 0:
        return
      self._dropped_counted = True
    started = min(self.n, next(self._next))
    if self.hooks is not None and started < self.n:
      self.hooks.record_dropped(self.scope.runtime, self.n - started)


def run_job(job: Job) -> list:
  """Starts `job` in its scope and waits for it; raises its scope's error."""
  scope = job.scope
  job.start()
  try:
    scope.wait(job.done)
  except BaseException:  # an interrupt: cancelled by `wait`
    scope.finish()
    raise
  if scope.error is not None:
    scope.finish()
    raise scope.error
  return job.results
