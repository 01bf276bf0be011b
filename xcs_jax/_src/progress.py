"""A progress bar for long runs, with tqdm (`tqdm.auto`: a widget in notebooks).

A run (a call of a jitted function, an eager batched call) that has lasted
`DELAY_S` gets a bar counting its finished host calls, kept up to date by
its scope's `wait`. No bar at all when

- the environment variable `XCS_JAX_PROGRESS` is `0` (or `false`, `no`, `off`);
- the jitted function was made with `xcs_jax.jit(..., progress=False)`;
- stderr is neither a terminal nor a notebook (a log file, CI, a server).

The bar is transient (`leave=False`): tqdm places it below any bar already
shown, such as an outer loop's, and removes it when the run ends.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

import tqdm.auto

ENV = "XCS_JAX_PROGRESS"
DELAY_S = 3.0
"""A run shows a bar once it has lasted this long."""
REFRESH_S = 0.25


def enabled_by_env() -> bool:
  """False when `XCS_JAX_PROGRESS` turns bars off."""
  return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def output_shows_bars() -> bool:
  """Whether a bar would be seen: a notebook, or stderr on a terminal."""
  if getattr(tqdm.auto.tqdm, "__module__", "") == "tqdm.notebook":   # tqdm.auto chose
    return True                                                       # the widget
  stream = sys.stderr
  try:
    return stream is not None and stream.isatty()
  except (AttributeError, ValueError):     # no isatty, or closed
    return False


class RunProgress:
  """The bar of one run: made once the run has lasted `DELAY_S`."""

  def __init__(self, scope, desc, total: int = 0):
    self.scope, self.desc, self.total_hint = scope, desc, total
    self.next_tick = time.perf_counter() + DELAY_S
    self.bar = None
    self._lock = threading.Lock()   # control-flow bodies wait on workers too

  def tick(self) -> None:
    """Updates the bar (at most every `REFRESH_S`; cheap before `DELAY_S`)."""
    now = time.perf_counter()
    if now < self.next_tick or not self._lock.acquire(blocking=False):
      return
    try:
      self.next_tick = now + REFRESH_S
      if self.bar is None:
        if not output_shows_bars():
          self.next_tick = float("inf")   # nobody would see it
          return
        desc = self.desc() if callable(self.desc) else self.desc
        self.bar = tqdm.auto.tqdm(desc=desc, total=self.total_hint, unit="call",
                                  leave=False, dynamic_ncols=True)
      jobs = self.scope.jobs
      done = sum(j.finished_items for j in jobs)
      self.bar.total = max(self.total_hint, sum(j.n for j in jobs))
      self.bar.n = done
      self.bar.refresh()
    finally:
      self._lock.release()

  def close(self) -> None:
    with self._lock:
      if self.bar is not None:
        self.bar.close()
        self.bar = None
      self.next_tick = float("inf")


@contextlib.contextmanager
def shown(scope, desc, total: int = 0, enabled: bool = True):
  """A bar for the run of `scope` inside the block (if it runs long enough);
  `desc` is its label, or a function that makes it (called only for a bar)."""
  if not (enabled and enabled_by_env()):
    yield
    return
  progress = scope.progress = RunProgress(scope, desc, total)
  try:
    yield
  finally:
    scope.progress = None
    progress.close()
