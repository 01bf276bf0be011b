"""Shared test helpers: in-flight recorders, unique bindings, thread checks."""
from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import inspect
import itertools
import os
import sys
import threading
import time
from typing import Callable

import pytest
from hypothesis import HealthCheck, settings

import xcs_jax
from xcs_jax import extend, models
from xcs_jax._src.executor import WorkerPool

_unique = itertools.count()


class InFlight:
  """Counts calls in flight, and the most that were ever in flight at once.

  Concurrency is checked by construction: tests look at `peak`, never at
  wall time. `parties` (optional) makes every call wait until that many calls
  are in flight together, so a test fails (BrokenBarrierError or TimeoutError
  after `timeout_s`) if the calls were not concurrent. Calls on threads wait
  at a `threading.Barrier`, `async def` calls (all on one event loop) at an
  `asyncio.Barrier`.
  """

  def __init__(self, parties: int | None = None, timeout_s: float = 20.0):
    self._lock = threading.Lock()
    self.now = 0
    self.peak = 0
    self.calls = 0
    self.parties, self.timeout_s = parties, timeout_s
    self.barrier = threading.Barrier(parties, timeout=timeout_s) if parties else None
    self._abarrier = None

  def _enter(self) -> None:
    with self._lock:
      self.now += 1
      self.calls += 1
      self.peak = max(self.peak, self.now)

  def _exit(self) -> None:
    with self._lock:
      self.now -= 1

  @contextlib.contextmanager
  def track(self):
    self._enter()
    try:
      if self.barrier is not None:
        self.barrier.wait()
      yield
    finally:
      self._exit()

  @contextlib.asynccontextmanager
  async def atrack(self):
    self._enter()
    try:
      if self.parties:
        if self._abarrier is None:
          self._abarrier = asyncio.Barrier(self.parties)
        await asyncio.wait_for(self._abarrier.wait(), self.timeout_s)
      yield
    finally:
      self._exit()

  def wrap(self, fn: Callable) -> Callable:
    """`fn`, tracked (an `async def` stays one)."""
    if inspect.iscoroutinefunction(fn):
      async def atracked(*args, **kwargs):
        async with self.atrack():
          return await fn(*args, **kwargs)
      return atracked

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
  provider = xcs_jax.current_runtime().provider("fake")
  original = functools.partial(type(provider).generate, provider)

  def install(parties: int | None = None, timeout_s: float = 20.0) -> InFlight:
    rec = InFlight(parties, timeout_s)
    monkeypatch.setattr(provider, "generate", rec.wrap(original))
    return rec

  return install


class VirtualClock(extend.Clock):
  """A clock that never sleeps: waits advance it, and are recorded."""

  def __init__(self):
    self.t = 1000.0
    self.waits: list[float] = []
    self._lock = threading.Lock()

  def now(self):
    with self._lock:
      return self.t

  def wait(self, event, seconds):
    if event.is_set():
      return True
    with self._lock:
      self.waits.append(seconds)
      self.t += max(0.0, seconds)
    return event.is_set()

  async def sleep(self, seconds):
    with self._lock:
      self.waits.append(seconds)
      self.t += max(0.0, seconds)
    await asyncio.sleep(0)


def xcs_threads() -> list[threading.Thread]:
  """The runtime's worker threads (named `<runtime name>-worker-N`).

  Workers start lazily whenever no worker is idle at the moment of a submit,
  and idle ones end after a while; so a count can change between identical
  runs. To check that nothing is left running, use `busy_xcs_threads`.
  """
  return [t for t in threading.enumerate() if "-worker-" in t.name]


def busy_xcs_threads() -> list[threading.Thread]:
  """The runtime's worker threads that are running a task now (not idle).

  An idle worker waits for its next task inside `WorkerPool._work`, so that
  is its innermost Python frame; a busy one runs something deeper.
  """
  frames = sys._current_frames()
  busy = []
  for t in xcs_threads():
    f = frames.get(t.ident)
    if f is not None and f.f_code is not WorkerPool._work.__code__:
      busy.append(t)
  return busy


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
  """Polls `predicate` until it holds or `timeout_s` passes."""
  end = time.monotonic() + timeout_s
  while time.monotonic() < end:
    if predicate():
      return True
    time.sleep(0.01)
  return predicate()


# --- profiles of the fuzz and fault suites, and their figures ---------------------

STRESS = os.environ.get("XCS_STRESS") == "1"
"""`make stress` sets XCS_STRESS=1: the long profiles (`make test` runs the fast ones)."""

settings.register_profile(
    "fast", deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "stress", deadline=None, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("stress" if STRESS else "fast")


def examples(fast: int, stress: int = 10_000) -> int:
  """Examples per property: `fast` in `make test`, `stress` in `make stress`."""
  return stress if STRESS else fast


FIGURES: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
"""Counts the fuzz and fault suites record (`FIGURES[suite][what] += n`)."""


def pytest_terminal_summary(terminalreporter):
  if not FIGURES:
    return
  terminalreporter.section("figures of the fuzz and fault suites"
                           + (" (stress profile)" if STRESS else " (fast profile)"))
  for name in sorted(FIGURES):
    counts = ", ".join(f"{k}={v:,}" if isinstance(v, int) else f"{k}={v}"
                       for k, v in sorted(FIGURES[name].items()))
    terminalreporter.write_line(f"{name}: {counts}")
