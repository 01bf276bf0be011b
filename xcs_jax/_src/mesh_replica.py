"""What a mesh's router knows of one replica: its load, health and latencies.

Health is a circuit breaker: `eject_after` transient failures in a row eject
the replica for `cooldown_s`; after that, one attempt at a time may probe
it: a success brings it back, a transient failure ejects it again. The
router holds its lock around every method here.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any

import numpy as np

from xcs_jax._src.binding_ops import GenerateOp, provider_of
from xcs_jax._src.providers import base

LATENCY_WINDOW = 256
"""Latencies kept per replica and per kind of call (the most recent)."""
P95_MIN_SAMPLES = 20
"""`hedge_after_s="p95"` hedges once this many latencies were measured."""
_P95_REFRESH = 16   # new latencies before the hedging percentile is computed again


def replica_embedding_dim(provider: base.Provider, binding) -> int | None:
  """The width of `binding`'s embeddings, or None where it cannot embed."""
  try:
    return int(provider.embedding_dim(binding))
  except (NotImplementedError, ValueError):
    return None


@dataclasses.dataclass(frozen=True)
class ReplicaStats:
  """What a mesh's router knows of one replica, in one runtime.

  Attributes:
    replica: the replica's binding.
    calls: attempts sent to it (failovers and hedges included).
    failures: attempts that failed (cancelled ones not counted).
    hedges: attempts sent to it as a hedge (a second replica for a slow call).
    wins: hedged calls it answered first.
    outstanding: its attempts in flight now.
    p50_s, p95_s: latency of its last `LATENCY_WINDOW` successful attempts
      (None before the first).
    ejected: out of rotation after failing (until a probe succeeds).
    ejections: times it was ejected.
  """
  replica: Any
  calls: int
  failures: int
  hedges: int
  wins: int
  outstanding: int
  p50_s: float | None
  p95_s: float | None
  ejected: bool
  ejections: int


class LatencyWindow:
  """The most recent latencies, and their 95th percentile (recomputed now and
  then, not on every read: hedging reads it on every attempt)."""

  __slots__ = ("values", "_new", "_p95")

  def __init__(self):
    self.values: collections.deque = collections.deque(maxlen=LATENCY_WINDOW)
    self._new = 0
    self._p95 = None

  def add(self, seconds: float) -> None:
    self.values.append(seconds)
    self._new += 1

  def p95(self) -> float | None:
    if len(self.values) < P95_MIN_SAMPLES:
      return None
    if self._p95 is None or self._new >= _P95_REFRESH:
      self._p95, self._new = float(np.percentile(self.values, 95)), 0
    return self._p95


class Replica:
  """One replica of a mesh in one runtime: its binding, provider and limits,
  and its load, health and latencies.

  Attributes:
    limit_key, limit: its endpoint's concurrency limit, as its bindings use it.
    limiter: its endpoint's rate limiter.
    methods: the calls it can make ("generate", "score_options", "embed").
    outstanding: attempts in flight from the mesh (picked, not yet ended).
    ejected_until: the router clock's time its cool-down ends, or None.
  """

  def __init__(self, index: int, binding, runtime, weight: float):
    self.index, self.binding, self.weight = index, binding, float(weight)
    self.provider = provider_of(binding, runtime)
    self.limit_key, self.limit = GenerateOp(binding).limit(runtime)
    self.limiter = runtime.limiter(self.provider.limit_scope(binding))
    self.methods = {"generate"}
    if type(self.provider).score_options is not base.Provider.score_options:
      self.methods.add("score_options")
    if replica_embedding_dim(self.provider, binding) is not None:
      self.methods.add("embed")
    self.current = 0.0           # smooth weighted round robin
    self.outstanding = self.calls = self.failures = self.hedges = self.wins = 0
    self.in_a_row = 0            # transient failures since the last success
    self.ejected_until: float | None = None
    self.probing = False         # an attempt is probing it after its cool-down
    self.ejections = 0
    self.latencies = LatencyWindow()

  @property
  def load(self) -> float:
    return self.outstanding / self.limit

  @property
  def has_room(self) -> bool:
    """Fewer attempts in flight than its concurrency."""
    return self.outstanding < self.limit

  @property
  def healthy(self) -> bool:
    return self.ejected_until is None

  def usable(self, now: float, wall: float) -> bool:
    """Not resting after failures (or probed by another attempt now), and not
    paused by its endpoint's rate limiter (`wall`: `time.monotonic()`)."""
    if self.ejected_until is not None and (now < self.ejected_until or self.probing):
      return False
    return self.limiter.paused_until <= wall

  def picked(self, hedge: bool) -> None:
    """An attempt goes to it (a probe, if it is ejected)."""
    if self.ejected_until is not None:
      self.probing = True
    self.outstanding += 1
    self.calls += 1
    self.hedges += hedge

  def succeeded(self, seconds: float) -> None:
    self.outstanding -= 1
    self.latencies.add(seconds)
    self.in_a_row, self.ejected_until, self.probing = 0, None, False

  def won(self) -> None:
    """It answered a hedged call first."""
    self.wins += 1

  def cancelled(self) -> None:
    """An attempt was cancelled (or never sent): no news of its health."""
    self.outstanding -= 1
    self.probing = False

  def failed(self, transient: bool, now: float, eject_after: int,
             cooldown_s: float) -> None:
    self.outstanding -= 1
    self.failures += 1
    if not transient:
      return                     # the request's fault, not the replica's
    self.in_a_row += 1
    if self.probing or (self.ejected_until is None and self.in_a_row >= eject_after):
      self.ejected_until = now + cooldown_s
      self.ejections += 1
    self.probing = False

  def snapshot(self) -> tuple:
    """Its counters, as `stats` needs them (taken under the router's lock)."""
    return (list(self.latencies.values), self.calls, self.failures, self.hedges, self.wins,
            self.outstanding, self.ejected_until is not None, self.ejections)

  def stats(self, snapshot: tuple) -> ReplicaStats:
    latencies, *counts, ejected, ejections = snapshot
    p50, p95 = (np.percentile(latencies, [50, 95]).tolist() if latencies else (None, None))
    return ReplicaStats(self.binding, *counts, p50, p95, ejected, ejections)
