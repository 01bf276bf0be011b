"""Helpers shared by the `xcs_jax.jit` tests: recording host ops.

Concurrency is checked by construction: a `Recorder` counts calls in flight
(and the most ever in flight at once) and logs when each call started and
ended; with `parties`, every call waits at a barrier until that many calls are
in flight together, so a schedule that is not concurrent fails the test
(BrokenBarrierError) instead of only being slower.
"""
from __future__ import annotations

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

import xcs_jax

from conftest import InFlight

F32 = jax.ShapeDtypeStruct((), jnp.float32)


class Recorder(InFlight):
  """`InFlight` that also logs `(name, "start" | "end", time.monotonic())`."""

  def __init__(self, parties: int | None = None, timeout_s: float = 10.0):
    super().__init__(parties, timeout_s)
    self.log: list = []
    self.args: list = []

  def op(self, name: str, latency_s: float = 0.0, *, fn=lambda x: x + 1.0,
         fail_with: BaseException | None = None, wait_for: threading.Event | None = None,
         concurrency: int = 256):
    """A float32 scalar host op named `name` that records its calls.

    It sleeps `latency_s` (not cancellable, like most user host code), or, with
    `wait_for`, waits (at most 10 s) for that event; then it raises `fail_with`
    or returns `fn(x)`.
    """
    def host(x):
      with self._lock:
        self.log.append((name, "start", time.monotonic()))
        self.args.append((name, float(x)))
      try:
        with self.track():
          if wait_for is not None:
            wait_for.wait(10.0)
          elif latency_s:
            time.sleep(latency_s)
          if fail_with is not None:
            raise fail_with
          return np.float32(fn(float(x)))
      finally:
        with self._lock:
          self.log.append((name, "end", time.monotonic()))

    return xcs_jax.host_op(host, out_spec=F32, name=name, concurrency=concurrency)

  def times(self, name: str, event: str) -> list[float]:
    with self._lock:
      return [t for n, e, t in self.log if n == name and e == event]

  def names(self) -> list[str]:
    """The names of the calls made, in the order they started."""
    with self._lock:
      return [n for n, e, _ in self.log if e == "start"]


class TraceCounter:
  """Wraps a Python function and counts how often JAX traces it."""

  def __init__(self, fn):
    self.fn = fn
    self.count = 0

  def __call__(self, *args, **kwargs):
    self.count += 1  # a Python side effect: runs once per trace, never per call
    return self.fn(*args, **kwargs)
