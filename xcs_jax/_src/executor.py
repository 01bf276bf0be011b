"""The one place that starts threads: warm workers, limits, the event loop.

- `WorkerPool`: warm, elastic worker threads owned by a runtime. It has no
  fixed size that hung work could exhaust: a task that finds no idle worker
  gets a new one, and idle workers end after a while.
- `Limits`: concurrency limits by key (an endpoint, a host op), granted
  by priority (the call heading the longest remaining path first), then
  first come, first served. A key exists only while something holds or waits
  for it, so ops made anew on every call leave nothing behind.
- `EventLoopThread`: the runtime's one asyncio loop, for async providers.
- `Clock`: time as the runtime sees it (tests inject one).

What runs on them, and how a failure cancels it, is `scope.py`.
"""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import heapq
import itertools
import math
import queue
import threading
import time
import weakref
from typing import Any, Awaitable, Callable

from xcs_jax._src import tracing


class Clock:
  """Time as the runtime sees it; tests inject one that does not sleep.

  `now()` is a `time.monotonic()`-like reading; `wait(event, seconds)` waits
  up to `seconds` for `event` and says whether it was set; `await
  sleep(seconds)` sleeps on the event loop (async providers, which are
  cancelled by their task instead of an event).
  """

  def now(self) -> float:
    return time.monotonic()

  def wait(self, event: threading.Event, seconds: float) -> bool:
    return event.wait(max(0.0, seconds))

  def sleep(self, seconds: float) -> Awaitable[None]:
    loop = asyncio.get_running_loop()
    timers = _TIMERS.get(loop)
    if timers is None:
      timers = _TIMERS[loop] = _CoalescedTimers(loop)
    return timers.sleep(max(0.0, seconds))


TIMER_RESOLUTION_S = 0.001
"""Async sleeps end on the next multiple of this (never early)."""


class _CoalescedTimers:
  """Sleeps of one event loop that end within the same `TIMER_RESOLUTION_S`
  share one timer: a thousand calls sleeping at once (simulated latency,
  retry backoff) cost a thousand futures but only a few loop timers, whose
  heap would otherwise cost a Python comparison per level per sleep."""

  def __init__(self, loop: asyncio.AbstractEventLoop):
    self._loop = loop
    self._due: dict[int, list] = {}

  def sleep(self, seconds: float) -> asyncio.Future:
    """A future set once `seconds` have passed (cancel it to stop waiting)."""
    tick = math.ceil((self._loop.time() + seconds) / TIMER_RESOLUTION_S)
    future = self._loop.create_future()
    waiting = self._due.get(tick)
    if waiting is None:
      waiting = self._due[tick] = []
      self._loop.call_at(tick * TIMER_RESOLUTION_S, self._wake, tick)
    waiting.append(future)
    return future

  def _wake(self, tick: int) -> None:
    for future in self._due.pop(tick, ()):
      if not future.done():
        future.set_result(None)


_TIMERS: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _CoalescedTimers]" = (
    weakref.WeakKeyDictionary())


REAL_CLOCK = Clock()


class WorkerPool:
  """Warm, elastic worker threads; the one kind of thread the library starts.

  `submit(fn)` runs `fn()` on an idle worker, or on a new one when none is
  idle, so a worker stuck in a call that never returns never delays other
  work. Idle workers end after `idle_s`.
  """

  def __init__(self, name: str = "xcs", idle_s: float = 30.0):
    self._name = name
    self._idle_s = idle_s
    self._tasks: queue.SimpleQueue = queue.SimpleQueue()
    self._lock = threading.Lock()
    self._idle = 0           # workers waiting for a task that no one claimed
    self._threads: set[threading.Thread] = set()
    self._ids = itertools.count()
    self._closed = False

  def submit(self, fn: Callable[[], Any]) -> None:
    with self._lock:
      if self._closed:
        raise RuntimeError("this xcs_jax runtime is closed: make a new one with "
                           "`xcs_jax.runtime()`, or use the default runtime.")
      spawn = self._idle == 0
      if not spawn:
        self._idle -= 1      # this task is that idle worker's
    self._tasks.put(fn)
    if spawn:
      t = threading.Thread(target=self._work, name=f"{self._name}-worker-{next(self._ids)}",
                           daemon=True)
      with self._lock:
        self._threads.add(t)
      t.start()

  def submit_future(self, fn: Callable[[], Any]) -> cf.Future:
    """`fn()` on a worker, as a `concurrent.futures.Future`."""
    future: cf.Future = cf.Future()

    def run():
      if not future.set_running_or_notify_cancel():
        return
      try:
        future.set_result(fn())
      except BaseException as e:  # handed to whoever waits on the future
        future.set_exception(e)
    self.submit(run)
    return future

  def _work(self) -> None:
    me = threading.current_thread()
    try:
      while True:
        try:
          fn = self._tasks.get(timeout=self._idle_s)
        except queue.Empty:
          with self._lock:
            if self._idle > 0:   # no task is on its way to this worker
              self._idle -= 1
              return
          continue
        if fn is None:           # close()
          return
        fn()
        del fn
        with self._lock:
          if self._closed:
            return
          self._idle += 1
    finally:
      with self._lock:
        self._threads.discard(me)

  @property
  def threads(self) -> int:
    with self._lock:
      return len(self._threads)

  def close(self, timeout_s: float = 1.0) -> int:
    """Stops idle workers; returns how many workers were still busy."""
    with self._lock:
      self._closed = True
      idle, self._idle = self._idle, 0
      threads = list(self._threads)
    for _ in range(idle):
      self._tasks.put(None)
    end = time.monotonic() + timeout_s
    for t in threads:
      if t is not threading.current_thread():
        t.join(max(0.0, end - time.monotonic()))
    return sum(t.is_alive() for t in threads)


class _Limit:
  __slots__ = ("held", "waiting")

  def __init__(self):
    self.held = 0
    self.waiting: list = []   # heap of (-priority, arrival, grant, limit)


class Limits:
  """Concurrency limits by key, granted by priority, then first come, first served.

  `request(key, limit, grant, priority, label)` calls `grant()` now if fewer
  than `limit` holders have `key`, else when a holder releases it: the waiting
  request with the highest `priority` goes first (the scheduler gives the
  call heading the longest remaining path the highest), equal priorities in
  arrival order. `grant()` returns False to decline (its run was cancelled
  meanwhile); the slot then goes to the next in line. One lock for every
  key, so a key can be dropped the moment nothing holds or awaits it. While
  a trace records, a request that has to wait shows as a slice named by
  `label()` (what waits).

  A key may also have a *cap* (`set_cap`), lower than the limits its
  requesters ask for: an endpoint's adaptive concurrency after rate-limit
  answers. Holders over a lowered cap keep their slots until they give them
  back (`over_cap` tells a lane to give its slot back between items).
  """

  def __init__(self):
    self._lock = threading.Lock()
    self._by_key: dict[Any, _Limit] = {}
    self._caps: dict[Any, int] = {}
    self.capped = self._caps     # truthy when any key has a cap (read without the lock)
    self._arrivals = itertools.count()

  def _room(self, key: Any, entry: _Limit, limit: int) -> bool:
    cap = self._caps.get(key)
    return entry.held < (limit if cap is None else min(limit, cap))

  def request(self, key: Any, limit: int, grant: Callable[[], bool],
              priority: float = 0.0, label: Callable[[], str] | None = None) -> bool:
    """Asks for a slot of `key`; True if the request has to wait for one."""
    with self._lock:
      entry = self._by_key.get(key)
      if entry is None:
        entry = self._by_key[key] = _Limit()
      if not self._room(key, entry, limit):
        if tracing.recorder is not None:
          grant = _traced_wait(key, limit, grant, label)
        heapq.heappush(entry.waiting, (-priority, next(self._arrivals), grant, limit))
        return True
      entry.held += 1
    if not grant():
      self.release(key)
    return False

  def release(self, key: Any) -> None:
    with self._lock:
      entry = self._by_key[key]
      entry.held -= 1
      granted = self._take_waiters(key, entry)
    self._grant_all(key, granted)

  def _take_waiters(self, key: Any, entry: _Limit) -> list:
    granted = []
    while entry.waiting and self._room(key, entry, entry.waiting[0][3]):
      granted.append(heapq.heappop(entry.waiting)[2])
      entry.held += 1
    if entry.held == 0 and not entry.waiting:
      del self._by_key[key]
    return granted

  def _grant_all(self, key: Any, granted: list) -> None:
    for grant in granted:
      if not grant():
        self.release(key)

  def set_cap(self, key: Any, cap: int | None) -> None:
    """Caps `key` at `cap` holders (None: no cap); a raised cap grants waiters."""
    with self._lock:
      if cap is None:
        self._caps.pop(key, None)
      else:
        self._caps[key] = max(1, int(cap))
      entry = self._by_key.get(key)
      granted = self._take_waiters(key, entry) if entry is not None else []
    self._grant_all(key, granted)

  def cap(self, key: Any) -> int | None:
    with self._lock:
      return self._caps.get(key)

  def over_cap(self, key: Any) -> bool:
    """Whether more hold `key` than its cap allows (a lane should give one back)."""
    cap = self._caps.get(key)
    if cap is None:
      return False
    with self._lock:
      entry = self._by_key.get(key)
      return entry is not None and entry.held > cap

  def waiting(self, key: Any) -> list:
    """The requests waiting for `key`: a heap of `(-priority, arrival, grant,
    limit)`, live while anyone holds `key` (so a holder may read it after each
    call, without the lock: a stale read only moves a hand-over by one call);
    an empty list if nobody holds it."""
    with self._lock:
      entry = self._by_key.get(key)
      return entry.waiting if entry is not None else []

  def held(self, key: Any) -> int:
    with self._lock:
      entry = self._by_key.get(key)
      return entry.held if entry is not None else 0

  def __len__(self) -> int:
    with self._lock:
      return len(self._by_key)


def _traced_wait(key: Any, limit: int, grant: Callable[[], bool],
                 label: Callable[[], str] | None) -> Callable[[], bool]:
  """`grant`, with the wait for a slot shown in the trace being recorded."""
  rec = tracing.recorder
  what = f"{label()} " if label is not None else ""
  name = f"wait for a slot: {what}({tracing.describe_limit(key, limit)})"
  ident = rec.begin_async(name, "limit", time.perf_counter())

  def traced() -> bool:
    rec.end_async(name, "limit", time.perf_counter(), ident)
    return grant()
  return traced


class EventLoopThread:
  """One asyncio event loop on a thread of its own, for async providers."""

  def __init__(self, name: str = "xcs"):
    self.loop = asyncio.new_event_loop()
    self._thread = threading.Thread(target=self.loop.run_forever, name=f"{name}-loop",
                                    daemon=True)
    self._thread.start()

  def run(self, coro, timeout_s: float | None = None) -> Any:
    """Runs `coro` on the loop and waits for its result (not from the loop)."""
    return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

  def close(self, timeout_s: float = 1.0) -> None:
    async def cancel_all():
      tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
      for t in tasks:
        t.cancel()
      await asyncio.wait(tasks, timeout=timeout_s) if tasks else None
      await self.loop.shutdown_asyncgens()
    if self.loop.is_running():
      try:
        self.run(cancel_all(), timeout_s + 1.0)
      except Exception:  # noqa: BLE001 - closing: nothing left to report to
        pass
      self.loop.call_soon_threadsafe(self.loop.stop)
      self._thread.join(timeout_s)
    if not self._thread.is_alive():
      self.loop.close()
