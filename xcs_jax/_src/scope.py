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
import collections
import math
import threading
import time
from typing import Any, Awaitable, Callable

from xcs_jax._src import budget as budget_lib
from xcs_jax._src import tracing
from xcs_jax._src.errors import XCSCancelledError, XCSTimeoutError
from xcs_jax._src.executor import REAL_CLOCK, Clock

POLL_S = 0.02
"""How often a waiting caller wakes to notice `_thread.interrupt_main()` and
uncancellable calls past their deadline (a real SIGINT wakes it at once)."""

_NEVER = threading.Event()  # waited on by contexts that have no scope

QUICK_ITEM_S = 200e-6
"""Items faster than this on average run on few thread lanes (see `Job`)."""
LANE_WORK_S = 1e-3
"""About how much work one thread lane gets when items are quick."""


class CallContext:
  """What one host call gets: cancellation, its deadline, a clock.

  Providers poll `check()` or sleep through `sleep()` so that a failing
  sibling, an interrupt or the deadline stops them; async providers are
  cancelled by their task instead. `CallContext()` on its own (no scope, no
  deadline) is fine for calling a provider directly.

  A call made with retries gets one context for the whole call (its deadline
  from the binding's `deadline_s`) and, per attempt, a child from
  `attempt(timeout_s)` whose deadline is `timeout_s` away, never later than
  the call's: that child is what the provider method sees.

  Attributes:
    deadline: a `clock.now()` value past which the call must raise
      `XCSTimeoutError`, or None.
    timeout_s: the timeout the deadline came from (for messages).
    what: the parameter that timeout is (for messages): "timeout_s" or
      "deadline_s".
    retries: retries so far (`retrying` counts them).
    facts: None, or, while a trace records the call, a dict a provider may
      fill with what the trace should show: `prompt_tokens`,
      `completion_tokens`, `cache_hit`, `replica` (`if ctx.facts is not None:
      ctx.facts["cache_hit"] = True`); an attempt's context shares its call's.
    headers: a provider may leave its answer's headers here (rate limits).
  """

  __slots__ = ("scope", "deadline", "timeout_s", "clock", "hard_deadline", "abandoned",
               "index", "what", "headers", "retries", "facts")

  def __init__(self, scope: "Scope | None" = None, *, timeout_s: float | None = None,
               clock: Clock = REAL_CLOCK, hard: bool = False, index: int = 0,
               what: str = "timeout_s"):
    self.scope = scope
    self.index = index       # the item of its batch
    self.clock = clock
    self.timeout_s = timeout_s
    self.what = what
    self.headers = None      # a provider may leave its response's headers here
    self.deadline = None if timeout_s is None else clock.now() + float(timeout_s)
    # Calls that cannot stop themselves (a host function) are timed out by the
    # waiter at their deadline.
    self.hard_deadline = self.deadline if hard else None
    self.abandoned = False
    self.retries = 0
    self.facts = None

  def retrying(self, error: BaseException, delay_s: float) -> None:
    """A retry loop calls this before it waits `delay_s` to retry after
    `error`: the retry counts in the call site's stats and shows in a trace."""
    self.retries += 1
    if self.facts is not None:
      self.facts.setdefault("retry_waits", []).append(
          (time.perf_counter(), delay_s, type(error).__name__))

  @property
  def cancelled(self) -> bool:
    return self.scope is not None and self.scope._cancelled.is_set()

  def check(self) -> None:
    """Raises `XCSCancelledError` if the call's run failed or was interrupted."""
    if self.scope is not None and self.scope._cancelled.is_set():
      raise XCSCancelledError(f"cancelled: {self.scope.cancel_reason}")

  def remaining(self) -> float | None:
    """Seconds left before the deadline (None without one)."""
    return None if self.deadline is None else self.deadline - self.clock.now()

  def check_deadline(self) -> None:
    """`check()`, then `XCSTimeoutError` if the deadline has passed."""
    if self.scope is not None and self.scope._cancelled.is_set():
      raise XCSCancelledError(f"cancelled: {self.scope.cancel_reason}")
    if self.deadline is not None and self.clock.now() > self.deadline:
      raise self.timeout_error()

  def timeout_error(self) -> XCSTimeoutError:
    if self.what == "deadline_s":
      return XCSTimeoutError(f"the call ran past its deadline (deadline_s={self.timeout_s})")
    return XCSTimeoutError(f"the call ran past its timeout of {self.timeout_s} s")

  def attempt(self, timeout_s: float | None) -> "CallContext":
    """A context for one attempt: this call's cancellation and clock, and a
    deadline `timeout_s` from now, or this call's deadline if that is sooner."""
    deadline = None if timeout_s is None else self.clock.now() + timeout_s
    if self.deadline is not None and (deadline is None or self.deadline <= deadline):
      return _context(self.scope, self.clock, self.index, self.what, self.timeout_s,
                      self.deadline, None, self.facts)
    return _context(self.scope, self.clock, self.index, "timeout_s", timeout_s, deadline,
                    None, self.facts)

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

  def asleep(self, seconds: float) -> Awaitable[None]:
    """`await ctx.asleep(s)`: `sleep` for async providers (cancellation arrives
    as task cancellation; past the deadline it raises `XCSTimeoutError`)."""
    left = self.remaining()
    if left is not None and left < seconds:
      return self._sleep_to_deadline(left)
    return self.clock.sleep(seconds)

  async def _sleep_to_deadline(self, left: float) -> None:
    await self.clock.sleep(left)
    raise self.timeout_error()


def _context(scope, clock, index, what, timeout_s, deadline, hard_deadline,
             facts) -> CallContext:
  """A `CallContext` from its fields (on the hot path: twice per call)."""
  ctx = _new(CallContext)
  ctx.scope, ctx.clock, ctx.index, ctx.what = scope, clock, index, what
  ctx.timeout_s, ctx.deadline, ctx.hard_deadline, ctx.facts = (timeout_s, deadline,
                                                              hard_deadline, facts)
  ctx.headers, ctx.abandoned, ctx.retries = None, False, 0
  return ctx


_new = object.__new__


class _Lane:
  """One worker (or asyncio task) of a job, and the call it is running."""

  __slots__ = ("job", "ctx", "detached", "task", "deadline", "timed_out", "counted_out")

  def __init__(self, job: "Job"):
    self.job = job
    self.ctx: CallContext | None = None
    self.detached = False    # abandoned: it releases nothing and reports nothing
    self.task = None         # the asyncio task of an async lane
    self.deadline = None     # async lanes: loop time the running call must end by
    self.timed_out = False   # async lanes: cancelled by the deadline watchdog
    self.counted_out = False  # no longer counted in its job's lanes


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
    self.budgets = budget_lib.scoped_budgets()   # `xcs_jax.budget` blocks open here
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
    self.progress = None     # a progress bar `wait` keeps up to date (progress.py)

  @property
  def jobs(self) -> list["Job"]:
    """The jobs started in this scope so far (control-flow bodies and streams too)."""
    with self._lock:
      return list(self._jobs)

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
        if self.progress is not None:
          self.progress.tick()
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

  Items are fed to the job (`start()` feeds all of them; `start(fed=False)`
  leaves them to `feed`, which a stream calls as the items of an upstream call
  finish). Each lane takes the next fed item until none is left; a lane that
  finds none ends, and a later feed starts a new one.

  Thread lanes start at once, up to the limit, unless the call site's items
  are known to be quick (`typical_item_s`, measured on earlier jobs and kept
  in the runtime's `call_times`): then only
  enough lanes start to share about `LANE_WORK_S` of work each, since every
  lane costs a thread wake-up; a lane whose item turns out slow starts more
  (doubling). Async lanes grow: one starts,
  and whenever every lane is waiting inside a call while items are queued,
  as many again start (1, 2, 4, ...), so calls that wait get all the
  concurrency they need within a few loop turns, and calls that never wait
  (a zero-latency fake, a cache hit) run one after another on one task.

  Lanes request their slots at the job's `priority`; a lane that finishes an
  item while a request of higher priority waits for the same limit hands
  its slot over (the job queues again for one), so the call heading the
  longest remaining path is not held up by a long batch of less urgent ones.

  Every item run is logged (when it started and ended, in `starts` and
  `ends`; retries and failures counted) for the per-call-site statistics,
  and shown in a trace when one records.

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
    on_item: called (from any thread) with `(i, result)` as each item succeeds.
    deadline_name: the parameter `timeout_s` comes from, for messages.
    eager_lanes: start a lane per item at once (up to the limit) instead of
      growing them: for calls that only wait (sent to a Ray cluster), whose
      requests are best sent together in one turn of the loop.
    op: the `HostCallOp` it runs, or None: its usage hooks
      (`record_abandoned(runtime, k)`, `record_dropped(runtime, k)`) and,
      with `source`, the call site its times are kept for.
    source: the user's line, or a tuple of lines (one per item) for call
      sites batched together.
    priority: how urgent its calls are when they wait for a slot of their
      limit (the scheduler's longest remaining path; higher goes first).
  """

  def __init__(self, scope: Scope, n: int, run_item: Callable, *,
               limit_key: Any = None, limit: int | None = None,
               timeout_s: float | None = None, hard_timeout: bool = False,
               release_on_abandon: bool = False, is_async: bool = False,
               wrap_error: Callable[[BaseException, int], BaseException] = lambda e, i: e,
               on_done: Callable[["Job"], None] | None = None,
               on_item: Callable[[int, Any], None] | None = None, op: Any = None,
               source: Any = None, priority: float = 0.0, deadline_name: str = "timeout_s",
               eager_lanes: bool = False):
    self.scope = scope
    self._limits = scope.runtime.limits
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
    self.on_item = on_item
    self.op = op
    self.source = source
    self.line = source[0] if isinstance(source, tuple) and source else source
    self.priority = priority
    self.typical_item_s = (None if op is None
                           else scope.runtime.call_times.get(op, self.line))
    # Per item: perf_counter() when it started and ended (None: never ran).
    self.starts: list = [None] * n
    self.ends: list = [None] * n
    self.retries = 0         # over all items
    self.failures = 0        # items that failed (not cancelled)
    # Its calls queued for slots of the limit: the batch is larger than the
    # limit, or a lane had to wait for a slot other calls held.
    self.limited = limit is not None and n > limit
    self.started_at = 0.0    # perf_counter() when started
    self._fed_at: dict | None = None   # item -> when fed, for items fed after the start
    self.trace: tracing.ItemTrace | None = None   # while a trace records
    self.deadline_name = deadline_name
    self.eager_lanes = eager_lanes
    self._seconds = 0.0      # run by lanes that ended
    self._items_run = 0
    self.results: list = [None] * n
    self.error: BaseException | None = None
    self.done = threading.Event()
    self._queue: collections.deque = collections.deque()  # fed, not yet taken
    self._fed = 0
    self._lanes = 0          # lanes started or waiting for a slot of the limit
    self._max_lanes = n if limit is None else min(n, limit)
    self._lock = threading.Lock()
    self._left = n
    self._finished = False
    self._dropped_counted = False
    self._to_start = 0       # async lanes granted, not yet created on the loop
    self._running: set[_Lane] = set()   # async lanes (for the deadline watchdog)
    self._watchdog = None
    self._started = False
    self.resolved = 0        # items completed without running (cache hits)
    self._busy = 0           # async lanes inside a call (read and written on the loop)
    self._grow_scheduled = False

  @property
  def finished_items(self) -> int:
    """Items that ran to completion so far."""
    return self.n - self._left

  def start(self, *, fed: bool = True) -> "Job":
    """Registers the job in its scope and feeds it every item (unless `fed=False`)."""
    if self._started:
      raise RuntimeError("xcs_jax internal error: a job was started twice")
    self._started = True
    self.started_at = time.perf_counter()
    if tracing.listening():
      self.trace = tracing.ItemTrace(self.op, self.source)
    self.scope._start_job(self)
    if self.n == 0:
      self._finish()
    elif fed:
      self.feed(range(self.n))
    else:
      self._fed_at = {}
    return self

  def feed(self, items) -> None:
    """Makes items ready to run (each once), starting lanes for them."""
    with self._lock:
      if self._finished:
        return
      before = len(self._queue)
      if self._fed_at is not None:
        now = time.perf_counter()
        items = list(items)
        self._fed_at.update((i, now) for i in items)
      self._queue.extend(items)
      self._fed += len(self._queue) - before
      if self.is_async and not self.eager_lanes:
        grow, self._grow_scheduled = not self._grow_scheduled, True
      else:
        want = min(self._max_lanes - self._lanes,
                   len(self._queue) if self.eager_lanes
                   else self._thread_lanes_for(len(self._queue)))
        self._lanes += want
    if self.is_async and not self.eager_lanes:
      if grow:
        self.scope.runtime.event_loop().loop.call_soon_threadsafe(self._grow)
    else:
      self._request_lanes(want)

  def _thread_lanes_for(self, queued: int) -> int:
    t = self.typical_item_s
    if t is None or t >= QUICK_ITEM_S or queued == 0:
      return queued
    return max(1, min(queued, math.ceil(queued * t / LANE_WORK_S)))

  def _grow_threads(self) -> None:
    """A thread lane met a slow item: as many lanes again, for what is queued."""
    with self._lock:
      want = max(0, min(self._max_lanes - self._lanes, len(self._queue), self._lanes))
      self._lanes += want
    self._request_lanes(want)

  def _request_lanes(self, want: int) -> None:
    if want <= 0:
      return
    if self.limit_key is None:
      for _ in range(want):
        self._grant()
    else:
      limits = self.scope.runtime.limits
      for _ in range(want):
        if limits.request(self.limit_key, self.limit, self._grant, self.priority,
                          self._label):
          self.limited = True

  def _grow(self) -> None:
    """On the loop: more async lanes when every lane is inside a waiting call
    and items are queued (as many as are busy: the lanes double)."""
    with self._lock:
      self._grow_scheduled = False
      free = self._lanes - self._busy     # alive between calls: they take items
      want = min(self._max_lanes - self._lanes, len(self._queue) - free,
                 max(1, self._busy))
      want = max(0, want)
      self._lanes += want
    self._request_lanes(want)

  def _maybe_grow(self) -> None:
    """Called by an async lane about to wait in a call (while items are queued)."""
    if self._lanes < self._max_lanes and not self._grow_scheduled:
      self._grow_scheduled = True
      asyncio.get_running_loop().call_soon(self._grow)

  # -- lanes -----------------------------------------------------------------

  def _grant(self) -> bool:
    if self.scope.cancelled or self._finished:
      self._lane_gone(None, 0.0, 0)   # declined: never started
      return False
    if not self.is_async:
      self.scope.runtime.pool.submit(self._thread_lane)
      return True
    with self._lock:  # one loop wake-up starts every lane granted meanwhile
      self._to_start += 1
      wake = self._to_start == 1
    if wake:
      self.scope.runtime.event_loop().loop.call_soon_threadsafe(self._start_async_lanes)
    return True

  def _release(self, lane: _Lane) -> None:
    """Gives the lane's limit slot back as it ends (unless its abandonment
    already did: a host function's slot is free once it is abandoned, a
    request's only when it really ends, since the server still sees it)."""
    if self.limit_key is not None and not (lane.detached and self.release_on_abandon):
      self.scope.runtime.limits.release(self.limit_key)

  def _take(self, lane: _Lane) -> int | None:
    """The next fed item for a lane, or None: the lane ends."""
    if self._finished or self.scope._cancelled.is_set():
      return None
    if self.limit_key is not None and self._queue and self._limits.capped and \
        self._limits.over_cap(self.limit_key):
      # The endpoint's adaptive concurrency went down: give this slot back, and
      # wait in line for a new one for the items left.
      with self._lock:
        lane.counted_out = True
      self._request_lanes(1)
      return None
    try:
      return self._queue.popleft()
    except IndexError:
      pass
    with self._lock:  # `feed` starts a new lane unless this one takes the item
      if self._queue:
        return self._queue.popleft()
      self._lanes -= 1
      lane.counted_out = True
      return None

  def _context(self, i: int) -> CallContext:
    timeout_s, clock = self.timeout_s, self.scope.clock
    deadline = None if timeout_s is None else clock.now() + timeout_s
    return _context(self.scope, clock, i, self.deadline_name, timeout_s, deadline,
                    deadline if self.hard_timeout else None,
                    None if self.trace is None else {})

  def fed_at(self, i: int) -> float:
    """When item i was ready to run (fed)."""
    return self.started_at if self._fed_at is None else self._fed_at.get(i, self.started_at)

  def _waiting_for_limit(self) -> list:
    """The live heap of requests waiting for this job's limit (a lane holding a
    slot keeps it alive; see `Limits.waiting`), or an empty list."""
    if self.limit_key is None:
      return []
    return self.scope.runtime.limits.waiting(self.limit_key)

  def _hand_over(self, lane: _Lane, waiting: list) -> bool:
    """After an item: gives the lane's slot to a more urgent request waiting
    for the same limit; the job queues again for a slot at its own priority.
    Whether the lane ends."""
    if not (waiting and -waiting[0][0] > self.priority and self._queue):
      return False
    lane.counted_out = True   # the new request stands in for this lane in `_lanes`
    self.limited = True
    self.scope.runtime.limits.request(self.limit_key, self.limit, self._grant,
                                      self.priority, self._label)
    return True

  def _label(self) -> str:
    """What the job runs, for a trace."""
    return "host call" if self.op is None else f"{self.op.kind} {self.op.describe()}"

  def _count(self, ctx: CallContext, error: BaseException | None) -> None:
    """Counts an item's retries and failure (rare: most items have neither)."""
    with self._lock:
      self.retries += ctx.retries
      if error is not None and not isinstance(error, XCSCancelledError):
        self.failures += 1

  def _thread_lane(self) -> None:
    scope = self.scope
    lane = _Lane(self)
    scope._enter(lane)
    token = scope.runtime._make_current()
    seconds, items = 0.0, 0
    quick = self.typical_item_s is not None and self.typical_item_s < QUICK_ITEM_S
    trace, starts, ends = self.trace, self.starts, self.ends
    waiting = self._waiting_for_limit()
    track = trace.thread_track() if trace is not None else None
    try:
      while (i := self._take(lane)) is not None:
        ctx = lane.ctx = self._context(i)
        span = trace.begin(i, track) if trace is not None else None
        start = time.perf_counter()
        try:
          result, error = self.run_item(i, ctx), None
        except BaseException as e:  # reported through the scope
          result, error = None, e
        starts[i] = start
        ends[i] = end = time.perf_counter()
        took = end - start
        seconds += took
        items += 1
        if ctx.retries or error is not None:
          self._count(ctx, error)
        if span is not None:
          trace.end(span, i, ctx, error, start - self.fed_at(i))
        if not self._item_ended(lane, i, result, error):
          return
        if quick and took >= QUICK_ITEM_S and self._queue:
          quick = False   # not so quick after all: more lanes, once per lane
          self._grow_threads()
        if waiting and self._hand_over(lane, waiting):
          return
    finally:
      scope.runtime._reset_current(token)
      self._lane_ended(lane, seconds, items)

  def _start_async_lanes(self) -> None:
    with self._lock:
      k, self._to_start = self._to_start, 0
    loop = asyncio.get_running_loop()
    for _ in range(k):
      lane = _Lane(self)
      self.scope._enter(lane)
      lane.task = loop.create_task(self._async_lane(lane))
      if self.scope.cancelled:
        lane.task.cancel()

  async def _async_lane(self, lane: _Lane) -> None:
    scope = self.scope
    loop = asyncio.get_running_loop()
    seconds, items = 0.0, 0
    self._running.add(lane)
    trace, starts, ends = self.trace, self.starts, self.ends
    waiting = self._waiting_for_limit()
    track = trace.lane_track() if trace is not None else None
    try:
      while (i := self._take(lane)) is not None:
        ctx = lane.ctx = self._context(i)
        span = trace.begin(i, track) if trace is not None else None
        start = time.perf_counter()
        if self.timeout_s is not None:
          lane.deadline = loop.time() + self.timeout_s
          if self._watchdog is None:
            self._watchdog = loop.call_at(lane.deadline, self._time_out_lanes)
        self._busy += 1
        if self._queue and not self._grow_scheduled:
          self._maybe_grow()
        try:
          result, error = await self.run_item(i, ctx), None
        except asyncio.CancelledError:
          if lane.timed_out:   # the watchdog: this call ran past its deadline
            asyncio.current_task().uncancel()
            result, error = None, ctx.timeout_error()
          else:
            result, error = None, XCSCancelledError(f"cancelled: {scope.cancel_reason}")
        except Exception as e:  # reported through the scope
          result, error = None, e
        self._busy -= 1
        starts[i] = start
        ends[i] = end = time.perf_counter()
        seconds += end - start
        items += 1
        lane.deadline = None
        if ctx.retries or error is not None:
          self._count(ctx, error)
        if span is not None:
          trace.end(span, i, ctx, error, start - self.fed_at(i))
        if not self._item_ended(lane, i, result, error):
          return
        if waiting and self._hand_over(lane, waiting):
          return
    finally:
      self._running.discard(lane)
      if track is not None:
        trace.free_lane_track(track)
      self._lane_ended(lane, seconds, items)

  def _time_out_lanes(self) -> None:
    """On the loop: cancels async calls past their deadline (providers are meant
    to stop themselves at `ctx.deadline`; this catches those that do not),
    then waits for the next deadline. One timer per job, not one per call."""
    loop = asyncio.get_running_loop()
    now = loop.time()
    nearest = None
    for lane in list(self._running):
      deadline = lane.deadline
      if deadline is None:
        continue
      if deadline <= now:
        lane.timed_out = True
        lane.deadline = None
        lane.task.cancel()
      elif nearest is None or deadline < nearest:
        nearest = deadline
    self._watchdog = None if nearest is None else loop.call_at(nearest, self._time_out_lanes)

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
    self.results[i] = result
    if self.on_item is not None:
      self.on_item(i, result)
    with self._lock:
      self._left -= 1
      last = self._left == 0 and not self._finished
    if last:
      self._finish()
    return True

  def _lane_ended(self, lane: _Lane, seconds: float, items: int) -> None:
    self.scope.add_call_time(seconds)
    self.scope._leave(lane)
    self._release(lane)
    self._lane_gone(lane, seconds, items)

  def _lane_gone(self, lane: _Lane | None, seconds: float, items: int) -> None:
    """A lane ended (or was declined before it started); the last one of a
    job that succeeded records the time per item in the runtime's
    `call_times` (the next job's `typical_item_s`, the scheduler's priorities)."""
    with self._lock:
      if lane is None or not lane.counted_out:
        self._lanes -= 1
      self._seconds += seconds
      self._items_run += items
      report = (self._lanes == 0 and self._finished and self.error is None
                and self.op is not None and self._items_run > 0)
      total, count = self._seconds, self._items_run
      if report:
        self._items_run = 0   # reported once
    if report:
      self.scope.runtime.call_times.record(self.op, self.line, total / count)

  # -- completion ------------------------------------------------------------

  def resolve_many(self, results) -> None:
    """Completes items without running them: `(i, result)` pairs (answers from
    the response cache). Call between `start(fed=False)` and `feed`."""
    results = list(results)
    for i, result in results:
      self.results[i] = result
    with self._lock:
      self.resolved += len(results)
      self._left -= len(results)
      last = self._left == 0 and not self._finished
    if last:
      self._finish()

  def fail_item(self, i: int, error: Exception) -> None:
    """Fails the job with item i's `error` without running it (an answer from
    the response cache that this call cannot use), as if the item had raised it."""
    self._fail(self.wrap_error(error, i))

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
    watchdog = self._watchdog
    if watchdog is not None:
      watchdog.cancel()   # thread-safe enough: a stale timer finds no lane to time out
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
    if self.op is not None and ctx is not None:
      self.op.record_abandoned(self.scope.runtime, 1)
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
      never_started = self.n - self._fed + len(self._queue)
    if self.op is not None and never_started > 0:
      self.op.record_dropped(self.scope.runtime, never_started)


def wait_for_job(job: Job) -> list:
  """Waits for a started `job` in its scope; raises its scope's error."""
  scope = job.scope
  try:
    scope.wait(job.done)
  except BaseException:  # an interrupt: cancelled by `wait`
    scope.finish()
    raise
  if scope.error is not None:
    scope.finish()
    raise scope.error
  return job.results
