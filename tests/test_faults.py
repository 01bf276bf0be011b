"""The fault suite: calls at 10% injected transient faults, and permanent ones.

Through `xcs_jax.jit` and plain `jax.jit`, on the fake provider and on a
`host_op`: every call is answered exactly once (0 lost, 0 duplicated: each
request's successful attempts are counted where it is served), the results
are identical to a fault-free run, retries equal the faults injected, and
threads and memory stay flat over repeats. A permanent failure among them
surfaces within one timeout. Retries are set explicitly (`retries=8`): with
10% faults, 9 failures in a row have odds of 1e-9 per call.

`make test` runs 2,000 calls; `make stress` 100,000 (XCS_STRESS=1).
"""
from __future__ import annotations

import collections
import hashlib
import inspect
import os
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xcs_jax
from xcs_jax import models, text
from xcs_jax.extend import TransientError

from conftest import FIGURES, STRESS, busy_xcs_threads, wait_until

TOTAL_CALLS = 100_000 if STRESS else 2_000
REPEATS = 5 if STRESS else 2   # each repeat makes TOTAL_CALLS / 4 calls per path
BATCH = 1_000 if STRESS else 250
RATE = 0.10
RETRIES = 8
MAX_LEN = 16
# Workers the calls may use: the fake provider's and host_op's default
# concurrency (256 lanes), plus a few that start while a finishing lane's
# worker has not yet gone idle (the pool is elastic; idle workers end later).
MAX_WORKERS = 256 + 16


class FaultInjector:
  """Fails a fixed 10% of attempts (a hash of request and attempt number, so a
  run is reproducible) and counts each request's successful attempts."""

  def __init__(self, rate: float):
    self.rate = rate
    self.enabled = True
    self._lock = threading.Lock()
    self.attempts: collections.Counter = collections.Counter()
    self.successes: collections.Counter = collections.Counter()
    self.faults = 0

  def reset(self, salt: str) -> None:
    with self._lock:
      self.attempts.clear()
      self.successes.clear()
      self.faults = 0
      self.salt = salt

  def _attempt(self, key) -> None:
    with self._lock:
      self.attempts[key] += 1
      n = self.attempts[key]
    digest = hashlib.blake2b(f"{self.salt}:{key}:{n}".encode(), digest_size=8).digest()
    if self.enabled and int.from_bytes(digest, "little") / 2**64 < self.rate:
      with self._lock:
        self.faults += 1
      raise TransientError(f"injected transient fault on attempt {n}")

  def _succeeded(self, key) -> None:
    with self._lock:
      self.successes[key] += 1

  def wrap(self, fn, key_of):
    """`fn` (sync or async) with faults injected before it and success counted after."""
    if inspect.iscoroutinefunction(fn):
      async def wrapped(*args):
        self._attempt(key_of(*args))
        out = await fn(*args)
        self._succeeded(key_of(*args))
        return out
    else:
      def wrapped(*args):
        self._attempt(key_of(*args))
        out = fn(*args)
        self._succeeded(key_of(*args))
        return out
    return wrapped


def _rss_mb() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _check_exactly_once(injector: FaultInjector, keys) -> tuple[int, int]:
  lost = sum(1 for k in keys if injector.successes[k] == 0)
  duplicated = sum(1 for k in keys if injector.successes[k] > 1)
  return lost, duplicated


@pytest.fixture
def rt():
  with xcs_jax.runtime(name="faults") as r:
    yield r


def _provider_path(rt, injector, jit):
  provider = rt.provider("fake")
  provider.generate = injector.wrap(provider.generate, lambda b, prompt, *_: prompt)
  binding = models.bind("fake:echo", retries=RETRIES, output_bytes=MAX_LEN, cache=None)
  f = jit(jax.vmap(binding))

  def run(ids):
    prompts = text.encode([f"call-{i:07d}" for i in ids], MAX_LEN)
    return np.asarray(f(prompts)), prompts, [f"call-{i:07d}" for i in ids]
  return run, binding


def _host_op_path(rt, injector, jit):
  def triple_plus_one(x):
    return np.int32(3 * int(x) + 1)
  op = xcs_jax.host_op(injector.wrap(triple_plus_one, int),
                       out_spec=jax.ShapeDtypeStruct((), jnp.int32), retries=RETRIES,
                       name="triple_plus_one")
  f = jit(jax.vmap(op))

  def run(ids):
    xs = np.asarray(ids, np.int32)
    return np.asarray(f(xs)), 3 * xs + 1, [int(i) for i in ids]
  return run, None


PATHS = {"fake provider": _provider_path, "host_op": _host_op_path}
JITS = {"xcs_jax.jit": xcs_jax.jit, "jax.jit": jax.jit}


@pytest.mark.parametrize("jit_name", sorted(JITS))
@pytest.mark.parametrize("path", sorted(PATHS))
def test_transient_faults_lose_and_duplicate_nothing(rt, path, jit_name):
  injector = FaultInjector(RATE)
  run, binding = PATHS[path](rt, injector, JITS[jit_name])
  per_repeat = TOTAL_CALLS // (len(PATHS) * len(JITS) * REPEATS)
  figures = FIGURES[f"faults {path} via {jit_name}"]
  threads, rss = [], []
  for repeat in range(REPEATS):
    injector.reset(f"{path}-{jit_name}-{repeat}")
    ids = range(repeat * per_repeat, (repeat + 1) * per_repeat)
    # The fault-free run, then the same calls at 10% faults.
    injector.enabled = False
    batches = [ids[s:s + BATCH] for s in range(0, len(ids), BATCH)]
    clean = [run(b)[0] for b in batches]
    injector.reset(f"{path}-{jit_name}-{repeat}")
    injector.enabled = True
    retries_before = binding.usage().retries if binding is not None else 0
    keys = []
    for batch, reference in zip(batches, clean):
      out, expected, batch_keys = run(batch)
      keys += batch_keys
      np.testing.assert_array_equal(out, reference)   # identical to the fault-free run
      np.testing.assert_array_equal(out, expected)
    lost, duplicated = _check_exactly_once(injector, keys)
    assert (lost, duplicated) == (0, 0)
    assert injector.faults > 0.05 * len(keys)        # faults really were injected
    if binding is not None:  # every fault was retried, once
      assert binding.usage().retries - retries_before == injector.faults
      assert binding.usage().errors == 0
    figures["calls"] += len(keys)
    figures["faults injected"] += injector.faults
    figures["lost"] += lost
    figures["duplicated"] += duplicated
    # Nothing is left running, and the workers stay within the calls' limit
    # (the pool is elastic: it grows to the lanes in use, never past them).
    assert wait_until(lambda: not busy_xcs_threads())
    threads.append(rt.pool.threads)
    assert threads[-1] <= MAX_WORKERS, threads
    rss.append(_rss_mb())
  assert max(rss[1:], default=rss[0]) - rss[0] < 64, rss   # MB: flat after the first
  figures["threads first/last repeat"] = f"{threads[0]}/{threads[-1]}"
  figures["rss growth MB"] = f"{rss[-1] - rss[0]:.1f}"


# --- permanent failures surface within one timeout -------------------------------------

TIMEOUT_S = 5.0


@pytest.mark.parametrize("jit_name", sorted(JITS))
def test_a_permanent_provider_failure_among_faults_surfaces_within_one_timeout(
    rt, jit_name):
  injector = FaultInjector(RATE)
  provider = rt.provider("fake")
  provider.generate = injector.wrap(provider.generate, lambda b, prompt, *_: prompt)
  injector.reset("permanent")
  # Siblings wait 4 timeouts each; one call fails for good at once.
  b = models.bind("fake:echo", retries=RETRIES, output_bytes=MAX_LEN, fail_on="BAD",
                  latency_s=4 * TIMEOUT_S, timeout_s=TIMEOUT_S)
  prompts = text.encode([f"slow-{i}" for i in range(63)] + ["BAD"], MAX_LEN)
  start = time.monotonic()
  with pytest.raises((xcs_jax.XCSExecutionError, RuntimeError), match="BAD"):
    jax.block_until_ready(JITS[jit_name](jax.vmap(b))(prompts))
  elapsed = time.monotonic() - start
  assert elapsed < TIMEOUT_S, elapsed
  FIGURES["faults permanent failure"][f"seconds to surface via {jit_name}"] = (
      f"{elapsed:.3f}")


@pytest.mark.parametrize("jit_name", sorted(JITS))
def test_a_hung_host_call_with_retries_fails_at_its_timeout_not_after_them(rt, jit_name):
  release = threading.Event()

  def hangs(x):
    release.wait(60)
    return np.float32(x)

  op = xcs_jax.host_op(hangs, out_spec=jax.ShapeDtypeStruct((), jnp.float32),
                       retries=RETRIES, timeout_s=0.5)
  try:
    start = time.monotonic()
    with pytest.raises((xcs_jax.XCSTimeoutError, RuntimeError), match="timeout of 0.5 s"):
      jax.block_until_ready(JITS[jit_name](op)(1.0))
    elapsed = time.monotonic() - start
  finally:
    release.set()
  assert elapsed < TIMEOUT_S, elapsed   # one timeout (0.5 s), never 1 + 8 of them
