"""Shared test helpers: in-flight recorders, unique bindings, thread checks."""
from __future__ import annotations

import contextlib
import itertools
import os
import sys
import threading
import time
from typing import Callable

import pytest

from xcs_jax import models
from xcs_jax._src.providers import base

_unique = itertools.count()


class InFlight:
  """Counts calls in flight, and the most that were ever in flight at once.

  Concurrency is checked by construction: tests look at `peak`, never at
  wall time. `barrier` (optional) makes every call wait until `parties` calls
  are in flight together, so a test fails (BrokenBarrierError after
  `timeout_s`) if the calls were not concurrent.
  """

  def __init__(self, parties: int | None = None, timeout_s: float = 20.0):
    self._lock = threading.Lock()
    self.now = 0
    self.peak = 0
    self.calls = 0
    self.barrier = threading.Barrier(parties, timeout=timeout_s) if parties else None

  @contextlib.contextmanager
  def track(self):
    with self._lock:
      self.now += 1
      self.calls += 1
      self.peak = max(self.peak, self.now)
    try:
      if self.barrier is not None:
        self.barrier.wait()
      yield
    finally:
      with self._lock:
        self.now -= 1

  def wrap(self, fn: Callable) -> Callable:
    def tracked(*args, **kwargs):
      with self.track():
        return fn(*args, **kwargs)
    tracked.__name__ = getattr(fn, "__name__", "tracked")
    return tracked


def unique_binding(spec: str = "fake:echo", **params) -> models.ModelBinding:
  """A binding no other test uses, so its usage counters and its fake
  `transient_failures` attempts start from zero. (`system_prompt` is ignored
  by the fake provider, so it only makes the binding distinct.)"""
  return models.bind(spec, system_prompt=f"test-{next(_unique)}", **params)


@pytest.fixture
def fake_inflight(monkeypatch):
  """Makes the fake provider record its calls in flight.

  Returns a function `(parties=None) -> InFlight` that installs a fresh
  recorder around `FakeProvider.generate` (the whole provider call, latency
  included) and returns it.
  """
  provider = base.get_provider("fake")
  original = type(provider).generate

  def install(parties: int | None = None, timeout_s: float = 20.0) -> InFlight:
    rec = InFlight(parties, timeout_s)
    monkeypatch.setattr(provider, "generate",
                        rec.wrap(lambda *a, **k: original(provider, *a, **k)))
    return rec

  return install


def xcs_threads() -> list[threading.Thread]:
  """The executor's worker threads (all pools name theirs `xcs-...`).

  Pools start threads lazily, up to their size, whenever no worker is idle at
  the moment of a submit; so a count can grow between identical runs until a
  pool is full. Compare counts only for a pool the warm-up filled; to check
  that nothing is left running, use `busy_xcs_threads`.
  """
  return [t for t in threading.enumerate() if t.name.startswith("xcs-")]


_POOL_WORKER_FILE = os.path.join("concurrent", "futures", "thread.py")


def busy_xcs_threads() -> list[threading.Thread]:
  """The executor's threads that are running a work item now (not idle).

  An idle pool worker waits on its queue in `_worker`; a busy one has
  `_WorkItem.run` on its stack.
  """
  frames = sys._current_frames()
  busy = []
  for t in xcs_threads():
    f = frames.get(t.ident)
    while f is not None:
      code = f.f_code
      if code.co_name == "run" and code.co_filename.endswith(_POOL_WORKER_FILE):
        busy.append(t)
        break
      f = f.f_back
  return busy


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
  """Polls `predicate` until it holds or `timeout_s` passes."""
  end = time.monotonic() + timeout_s
  while time.monotonic() < end:
    if predicate():
      return True
    time.sleep(0.01)
  return predicate()
