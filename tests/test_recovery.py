"""Retries back off, backoff respects the deadline, interrupts stop everything.

Each test here was proven by mutation: it fails when the code it guards is
removed (the backoff sleep in `providers/retry.py`, the deadline check of
`CallContext.sleep`, and the interrupt handling of `Scope.wait`, `run_job`
and `xcs_jax.jit`'s call path). The providers are defined here, one plain
and one `async def`, so the tests do not depend on how `fake` is written.
"""
from __future__ import annotations

import _thread
import threading
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xcs_jax
from xcs_jax import extend, models, text
from xcs_jax._src.providers import base
from xcs_jax._src.providers import retry

from conftest import InFlight, VirtualClock, wait_until

FAILS_BEFORE_SUCCESS = 3
# With each backoff at its upper bound (see `largest_backoff`): the sleeps
# before attempts 2, 3 and 4 of `retry.RetryPolicy` (base delay 0.05 s).
LONGEST_SLEEPS = (0.1, 0.2, 0.4)


class _Flaky(extend.Provider):
  """Fails transiently a given number of times per prompt; records attempt times."""
  name = "test_recovery_flaky"
  attempts: dict[str, list[float]] = {}

  def _attempt(self, binding, prompt):
    times = self.attempts.setdefault(prompt, [])
    times.append(time.monotonic())
    if len(times) <= int(binding.get("max_tokens")) - 1:  # max_tokens - 1 failures
      raise extend.TransientError(f"transient failure {len(times)}")
    return extend.Completion(prompt)

  def generate(self, binding, prompt, seed, ctx):
    return self._attempt(binding, prompt)


class _AsyncFlaky(_Flaky):
  name = "test_recovery_async_flaky"

  async def generate(self, binding, prompt, seed, ctx):
    return self._attempt(binding, prompt)


extend.register_provider(_Flaky.name, _Flaky)
extend.register_provider(_AsyncFlaky.name, _AsyncFlaky)
PROVIDERS = [_Flaky.name, _AsyncFlaky.name]


@pytest.fixture
def largest_backoff(monkeypatch):
  """Every backoff sleeps its upper bound (full jitter drawn at its maximum)."""
  monkeypatch.setattr(retry.random, "uniform", lambda low, high: high)


@pytest.fixture
def rt():
  with xcs_jax.runtime(name="recovery") as r:
    yield r


# --- backoff -----------------------------------------------------------------------

@pytest.mark.parametrize("provider", PROVIDERS)
def test_retries_sleep_their_backoff_between_attempts(rt, largest_backoff, provider):
  prompt = f"backoff-{PROVIDERS.index(provider)}"
  b = models.bind(f"{provider}:m", max_tokens=FAILS_BEFORE_SUCCESS + 1, retries=5,
                  timeout_s=30.0, output_bytes=32)
  assert text.decode(b(text.encode(prompt, 32))) == prompt
  times = _Flaky.attempts[prompt]
  assert len(times) == FAILS_BEFORE_SUCCESS + 1
  gaps = np.diff(times)
  # Sleeps never end early: each gap is at least its backoff.
  assert np.all(gaps >= np.array(LONGEST_SLEEPS) - 0.005), gaps
  assert b.usage().retries == FAILS_BEFORE_SUCCESS


def test_host_op_retries_sleep_their_backoff_too(rt, largest_backoff):
  times = []

  def flaky(x):
    times.append(time.monotonic())
    if len(times) <= FAILS_BEFORE_SUCCESS:
      raise extend.TransientError("flaky service")
    return np.float32(x)

  op = xcs_jax.host_op(flaky, out_spec=jax.ShapeDtypeStruct((), jnp.float32), retries=5)
  assert float(op(2.0)) == 2.0
  assert np.all(np.diff(times) >= np.array(LONGEST_SLEEPS) - 0.005), np.diff(times)


def test_host_op_never_retries_other_errors(rt):
  calls = []

  def broken(x):
    calls.append(x)
    raise KeyError("not transient")

  op = xcs_jax.host_op(broken, out_spec=jax.ShapeDtypeStruct((), jnp.float32), retries=5)
  with pytest.raises(xcs_jax.XCSExecutionError, match="not transient"):
    op(1.0)
  assert len(calls) == 1


def test_backoff_stops_at_the_deadline():
  """1,000 retries allowed, 1 s of deadline: the sleeps stop before it (the
  call fails as soon as the next sleep would pass it)."""
  clock = VirtualClock()
  with xcs_jax.runtime(name="recovery-clock", clock=clock):
    b = models.bind(f"{_Flaky.name}:m", max_tokens=10**6, retries=1000, deadline_s=1.0,
                    output_bytes=32, system_prompt="deadline")
    with pytest.raises(xcs_jax.XCSTimeoutError) as info:
      b(text.encode("deadline", 32))
  assert isinstance(info.value.__cause__, xcs_jax.XCSTimeoutError)
  assert "deadline_s=1.0" in str(info.value)
  assert 0 < sum(clock.waits) <= 1.0 and len(clock.waits) >= 2
  assert b.usage().retries < 1000


@pytest.mark.parametrize("provider", PROVIDERS)
def test_backoff_never_outlives_the_deadline_in_real_time(rt, largest_backoff, provider):
  # Six backoffs at their bound sleep 5.1 s in all; the deadline is 0.5 s.
  b = models.bind(f"{provider}:m", max_tokens=10**6, retries=6, deadline_s=0.5,
                  output_bytes=32)
  start = time.monotonic()
  with pytest.raises(xcs_jax.XCSTimeoutError):
    b(text.encode(f"real-deadline-{PROVIDERS.index(provider)}", 32))
  assert time.monotonic() - start < 2.5


# --- interrupts ----------------------------------------------------------------------

CONCURRENCY = 2
ITEMS = 10


def _blocked_op(release: threading.Event, rec: InFlight):
  def hang(x):
    with rec.track():
      release.wait(30)
      return np.float32(x)
  return xcs_jax.host_op(hang, out_spec=jax.ShapeDtypeStruct((), jnp.float32),
                         concurrency=CONCURRENCY)


@pytest.mark.parametrize("mode", ["eager", "xcs_jax.jit"])
def test_an_interrupt_stops_the_run_drops_queued_calls_and_abandons_running_ones(
    rt, mode):
  release, rec = threading.Event(), InFlight()
  op = jax.vmap(_blocked_op(release, rec))
  run = xcs_jax.jit(op) if mode == "xcs_jax.jit" else op
  interrupt = threading.Timer(0.3, _thread.interrupt_main)
  safety = threading.Timer(10.0, release.set)   # if the interrupt is never seen
  interrupt.start()
  safety.start()
  start = time.monotonic()
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)
      with pytest.raises(KeyboardInterrupt):
        run(jnp.arange(float(ITEMS)))
    elapsed = time.monotonic() - start
    # Seen within the scope's polling interval, while the calls still hang.
    assert elapsed < 5.0 and not release.is_set(), elapsed
    # The running calls were abandoned when the interrupt arrived.
    assert rt.abandoned_calls == CONCURRENCY
  finally:
    interrupt.cancel()
    safety.cancel()
    release.set()
  assert wait_until(lambda: rec.now == 0)
  time.sleep(0.1)
  # The queued calls never started, even once the running ones ended.
  assert rec.calls == CONCURRENCY


class _Sleeper(extend.Provider):
  """A cooperative provider: sleeps through its context (cancellable)."""
  name = "test_recovery_sleeper"

  def generate(self, binding, prompt, seed, ctx):
    ctx.sleep(30.0)
    return extend.Completion(prompt)


extend.register_provider(_Sleeper.name, _Sleeper)


def test_an_interrupt_cancels_cooperative_calls_and_counts_the_rest(rt):
  b = models.bind(f"{_Sleeper.name}:m", concurrency=CONCURRENCY, output_bytes=8)
  interrupt = threading.Timer(0.3, _thread.interrupt_main)
  interrupt.start()
  try:
    with pytest.raises(KeyboardInterrupt):
      jax.vmap(b)(text.encode([f"p{i}" for i in range(ITEMS)], 8))
  finally:
    interrupt.cancel()
  usage = b.usage()
  # The two running calls were told to stop (and did); the rest never started.
  assert wait_until(lambda: b.usage().calls == CONCURRENCY)
  assert wait_until(lambda: b.usage().cancelled == ITEMS)
  assert usage.errors == 0
