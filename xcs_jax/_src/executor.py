"""The one place with threads.

Host calls run on one thread pool per (provider, concurrency limit): the pool's
size *is* the limit, so however many batches are in flight, a provider never
sees more than `limit` calls at once. Work that only waits on other work (a
batched call gathering its items, a scheduler node) runs on the coordinator
pool, so a waiting task never holds a provider slot (which could deadlock).

Every batch runs inside a `CallContext`: the first failure cancels the
siblings that have not started, tells the running ones to stop (cooperative:
providers sleep and poll through the context) and re-raises after all of them
ended. No call is left running behind the caller's back.
"""
from __future__ import annotations

import concurrent.futures as cf
import itertools
import threading
import time
from typing import Callable, Sequence, TypeVar

from xcs_jax._src.errors import XCSCancelledError, XCSTimeoutError

T = TypeVar("T")

_COORDINATOR_WORKERS = 1024
CANCEL_GRACE_S = 10.0
"""After a failure, how long running siblings may take to notice cancellation."""


class Pool(cf.ThreadPoolExecutor):
  """A thread pool that knows its size, with as many call slots.

  Every provider call holds a slot while it runs, whichever thread makes it
  (a pool worker, an XLA callback thread, a user's thread calling eagerly),
  so the limit holds for unbatched calls too.
  """

  def __init__(self, size: int, name: str):
    super().__init__(max_workers=size, thread_name_prefix=f"xcs-{name}")
    self.size = size
    self.slots = threading.BoundedSemaphore(size)


_pools: dict[tuple[str, int], Pool] = {}
_pools_lock = threading.Lock()


class CallContext:
  """Cancellation shared by the calls of one batch or one scheduled program,
  and the seconds its calls took, summed."""

  __slots__ = ("_cancelled", "_lock", "call_seconds")

  def __init__(self) -> None:
    self._cancelled = threading.Event()
    self._lock = threading.Lock()
    self.call_seconds = 0.0

  def add_call_time(self, seconds: float) -> None:
    with self._lock:
      self.call_seconds += seconds

  def cancel(self) -> None:
    self._cancelled.set()

  @property
  def cancelled(self) -> bool:
    return self._cancelled.is_set()

  def check(self) -> None:
    """Raises `XCSCancelledError` if a sibling call already failed."""
    if self._cancelled.is_set():
      raise XCSCancelledError("cancelled: a sibling call failed first")

  def sleep(self, seconds: float, *, deadline: float | None = None,
            timeout_s: float | None = None) -> None:
    """Sleeps `seconds`, waking early (and raising) on cancellation or deadline.

    Args:
      seconds: how long to sleep.
      deadline: a `time.monotonic()` value; past it, raise `XCSTimeoutError`.
      timeout_s: the timeout the deadline came from, for the message.
    """
    wake = time.monotonic() + seconds
    if deadline is not None and deadline < wake:
      if self._cancelled.wait(max(0.0, deadline - time.monotonic())):
        self.check()
      raise XCSTimeoutError(f"the call ran past its timeout of {timeout_s} s")
    if self._cancelled.wait(max(0.0, wake - time.monotonic())):
      self.check()


def provider_pool(name: str, limit: int) -> Pool:
  """The shared pool of provider `name` with `limit` workers."""
  key = (name, int(limit))
  pool = _pools.get(key)
  if pool is None:
    with _pools_lock:
      pool = _pools.get(key)
      if pool is None:
        pool = Pool(key[1], name)
        _pools[key] = pool
  return pool


def coordinator_pool() -> Pool:
  """The pool for tasks that mostly wait on other tasks."""
  return provider_pool("coordinator", _COORDINATOR_WORKERS)


def wait_all(futures: Sequence[cf.Future], ctx: CallContext) -> list:
  """Results of `futures`, failing fast.

  On the first exception: cancel the context and the futures not yet started,
  wait (at most `CANCEL_GRACE_S`) for the running ones to end, and raise the
  first real error (a sibling's `XCSCancelledError` only when nothing else
  failed).
  """
  try:
    _, pending = cf.wait(futures, return_when=cf.FIRST_EXCEPTION)
  except BaseException:  # KeyboardInterrupt: stop the siblings, then leave
    ctx.cancel()
    for f in futures:
      f.cancel()
    raise
  if pending:
    ctx.cancel()
    for f in pending:
      f.cancel()
    # Cooperative calls stop at once; do not wait forever for one that does not.
    cf.wait(pending, timeout=CANCEL_GRACE_S)
  if any(f.cancelled() for f in futures):
    ctx.cancel()
  errors = [f.exception() for f in futures  # a call past the grace period is left
            if f.done() and not f.cancelled() and f.exception() is not None]
  real = [e for e in errors if not isinstance(e, XCSCancelledError)]
  if real or errors:
    raise (real or errors)[0]
  if ctx.cancelled and any(f.cancelled() for f in futures):
    raise XCSCancelledError("cancelled: a sibling call failed first")
  return [f.result() for f in futures]


def map_concurrent(fn: Callable[[int], T], n: int, *, pool: Pool,
                   ctx: CallContext) -> list[T]:
  """`[fn(0), ..., fn(n-1)]`, run concurrently on `pool`, failing fast.

  Starts `min(n, pool size)` workers that each take the next index until
  none is left (one future per worker, not per item: that is what keeps
  the per-item cost near a bare `ThreadPoolExecutor.map`). After a failure
  the workers stop taking items.
  """
  if n == 1:
    return [fn(0)]
  results: list = [None] * n
  indices = itertools.count()  # next() is atomic under the GIL

  def worker():
    for i in indices:
      if i >= n or ctx.cancelled:
        return
      results[i] = fn(i)

  wait_all([pool.submit(worker) for _ in range(min(n, pool.size))], ctx)
  if ctx.cancelled:  # cancelled from outside: some items never ran
    ctx.check()
  return results
