"""Failures: clear errors eagerly and under jit, timeouts, retries, usage,
fail-fast batches, and no work left running behind the caller's back.

Time bounds here are generous sanity checks that nothing hangs (a sibling
sleeps 20 s; the failure must arrive in a few), not performance claims.
"""
import inspect
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xcs_jax
from xcs_jax import models, text
from xcs_jax._src.providers import base
from xcs_jax._src.providers.fake import FakeProviderError

from conftest import (InFlight, busy_xcs_threads, unique_binding, wait_until,
                      xcs_threads)

HANG_S = 20.0      # latency of calls that must be cut short
FAST_S = 8.0       # "arrives long before HANG_S", with room for a busy machine


def _encoded(prompts, max_len=16):
  return jnp.asarray(text.encode(prompts, max_len))


def _line_after() -> int:
  return inspect.currentframe().f_back.f_lineno + 1


# --- a provider that raises ------------------------------------------------------

def test_failing_call_eagerly_names_op_binding_and_source():
  b = models.bind("fake:echo", fail_on="BAD", output_bytes=32)
  line = _line_after()
  call = lambda x: b(x)  # noqa: E731
  with pytest.raises(xcs_jax.XCSExecutionError) as e:
    call(_encoded(["BAD prompt"])[0])
  err = e.value
  assert isinstance(err.__cause__, FakeProviderError)
  assert err.op == "generate" and err.binding == str(b)
  assert err.source.startswith(f"{__file__}:{line} ")
  msg = str(err)
  for part in ("generate", str(b), f"{__file__}:{line}", "FakeProviderError",
               "injected failure"):
    assert part in msg
  assert "batch item" not in msg


def test_failing_item_in_a_batch_is_named():
  b = models.bind("fake:echo", fail_on="BAD", output_bytes=32)
  with pytest.raises(xcs_jax.XCSExecutionError, match=r"batch item 2"):
    jax.vmap(b)(_encoded(["ok", "fine", "BAD"]))


def test_failing_call_under_jit_carries_the_same_information():
  b = models.bind("fake:echo", fail_on="BAD", output_bytes=32)
  line = _line_after()
  f = jax.jit(jax.vmap(lambda x: b(x)))
  with pytest.raises(RuntimeError) as e:
    f(_encoded(["ok", "BAD"])).block_until_ready()
  msg = str(e.value)
  for part in ("XCSExecutionError", "generate", str(b), f"{__file__}:{line}",
               "FakeProviderError", "injected failure", "batch item 1"):
    assert part in msg
  # The compiled program still works on good input.
  assert text.decode(f(_encoded(["ok", "fine"]))) == ["ok", "fine"]


def test_failing_host_op_eager_and_jit():
  @xcs_jax.host_op(out_spec=jax.ShapeDtypeStruct((), jnp.float32), name="lookup")
  def lookup(x):
    raise KeyError("row 7 not in the table")

  with pytest.raises(xcs_jax.XCSExecutionError) as e:
    lookup(jnp.ones(2))
  assert isinstance(e.value.__cause__, KeyError)
  assert e.value.op == "host_op" and e.value.binding == "lookup"
  assert "host_op call to lookup" in str(e.value)
  assert __file__ in e.value.source
  with pytest.raises(RuntimeError) as e:
    jax.jit(jax.vmap(lookup))(jnp.ones((3, 2))).block_until_ready()
  assert "host_op call to lookup" in str(e.value)
  assert "row 7 not in the table" in str(e.value)


class _BrokenProvider(base.Provider):
  name = "test_broken"

  def generate(self, binding, prompt, seed, ctx):
    raise ConnectionError("connection refused")


base.register_provider("test_broken", _BrokenProvider)


def test_any_provider_exception_is_wrapped():
  b = models.bind("test_broken:m", retries=0)
  with pytest.raises(xcs_jax.XCSExecutionError) as e:
    b(_encoded(["x"])[0])
  assert isinstance(e.value.__cause__, ConnectionError)
  assert "test_broken:m" in str(e.value) and "connection refused" in str(e.value)


# --- timeouts: a clear error, fast ------------------------------------------------

@pytest.mark.parametrize("jit", [False, True])
def test_fake_past_its_deadline(jit):
  """Each attempt stops at `timeout_s` and is retried; the call ends at `deadline_s`."""
  b = unique_binding("fake:echo", latency_s=HANG_S, timeout_s=0.2, deadline_s=0.5,
                     output_bytes=16)
  f = jax.vmap(b)
  if jit:
    f = jax.jit(f)
  start = time.monotonic()
  with pytest.raises((xcs_jax.XCSExecutionError, RuntimeError)) as e:
    f(_encoded(["a", "b", "c", "d"])).block_until_ready()
  assert time.monotonic() - start < FAST_S
  assert "deadline_s=0.5" in str(e.value)
  assert b.usage().retries >= 1     # timed-out attempts were retried
  if not jit:
    assert isinstance(e.value.__cause__, xcs_jax.XCSTimeoutError)
  else:
    assert "XCSTimeoutError" in str(e.value)


def test_host_op_past_its_timeout():
  release = threading.Event()

  @xcs_jax.host_op(out_spec=jax.ShapeDtypeStruct((), jnp.float32), name="stuck",
                   timeout_s=0.2)
  def stuck(x):
    release.wait(HANG_S)  # Python cannot stop it; the test lets it go below
    return np.float32(0)

  try:
    start = time.monotonic()
    with pytest.raises(xcs_jax.XCSExecutionError) as e:
      stuck(jnp.ones(2))
    assert time.monotonic() - start < FAST_S
    assert isinstance(e.value.__cause__, xcs_jax.XCSTimeoutError)
    assert "host_op call to stuck" in str(e.value) and "timeout of 0.2 s" in str(e.value)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="timeout of 0.2 s"):
      jax.jit(stuck)(jnp.ones(2)).block_until_ready()
    assert time.monotonic() - start < FAST_S
  finally:
    release.set()


def test_host_op_within_its_timeout_answers():
  op = xcs_jax.host_op(lambda x: np.float32(x.sum()),
                       out_spec=jax.ShapeDtypeStruct((), jnp.float32), timeout_s=30.0)
  np.testing.assert_array_equal(jax.jit(jax.vmap(op))(jnp.ones((4, 3))), [3.0] * 4)


# --- retries and usage ---------------------------------------------------------

def test_transient_failures_are_retried():
  b = unique_binding(transient_failures=2, retries=2, output_bytes=16)
  out = b(_encoded(["one two"])[0])
  assert text.decode(out) == "one two"
  u = b.usage()
  assert (u.calls, u.retries, u.errors) == (1, 2, 0)
  assert (u.prompt_tokens, u.completion_tokens) == (2, 2)
  snap = xcs_jax.usage()[str(b)]
  assert snap["calls"] == 1 and snap["retries"] == 2 and snap["seconds"] > 0


def test_transient_failures_under_jit_vmap_are_retried_per_item():
  b = unique_binding(transient_failures=1, retries=1, output_bytes=16)
  out = jax.jit(jax.vmap(b))(_encoded(["a", "b", "c"]))
  assert text.decode(out) == ["a", "b", "c"]
  u = b.usage()
  assert (u.calls, u.retries, u.errors) == (3, 3, 0)


def test_retries_run_out():
  b = unique_binding(transient_failures=3, retries=2, output_bytes=16)
  with pytest.raises(xcs_jax.XCSExecutionError) as e:
    b(_encoded(["x"])[0])
  assert isinstance(e.value.__cause__, base.TransientError)
  u = b.usage()
  assert (u.calls, u.retries, u.errors) == (1, 2, 1)


def test_permanent_errors_are_not_retried():
  b = unique_binding(fail_on="BAD", retries=5, output_bytes=16)
  with pytest.raises(xcs_jax.XCSExecutionError):
    b(_encoded(["BAD"])[0])
  u = b.usage()
  assert (u.calls, u.retries, u.errors) == (1, 0, 1)


def test_attempt_timeouts_are_retried_until_the_deadline_or_the_retry_cap():
  # Three attempts of 0.1 s and two backoffs of at most 0.1 + 0.2 s (full
  # jitter) end by 0.6 s: the deadline leaves room for a busy machine.
  b = unique_binding(latency_s=HANG_S, timeout_s=0.1, deadline_s=1.2, output_bytes=16)
  with pytest.raises(xcs_jax.XCSExecutionError) as e:
    b(_encoded(["x"])[0])
  assert isinstance(e.value.__cause__, xcs_jax.XCSTimeoutError)
  assert "deadline_s=1.2" in str(e.value) and b.usage().retries >= 2
  capped = unique_binding(latency_s=HANG_S, timeout_s=0.1, retries=1, output_bytes=16)
  with pytest.raises(xcs_jax.XCSExecutionError) as e:
    capped(_encoded(["x"])[0])
  assert "timeout of 0.1 s" in str(e.value) and capped.usage().retries == 1


def test_retries_until_no_deadline_is_an_error_at_bind():
  # A call that keeps timing out would otherwise retry forever.
  with pytest.raises(ValueError, match="retry forever.*retries=3.*deadline_s=600"):
    models.bind("fake:echo", deadline_s=None)
  assert models.bind("fake:echo", deadline_s=None, retries=2).get("deadline_s") is None
  assert models.bind("fake:echo", retries=None).get("deadline_s") == 600.0


def test_reset_usage():
  b = unique_binding()
  b(_encoded(["x"])[0])
  assert str(b) in xcs_jax.usage()
  xcs_jax.reset_usage()
  assert xcs_jax.usage() == {} and b.usage().calls == 0


# --- fail fast, leave nothing running ------------------------------------------

@pytest.mark.parametrize("jit", [False, True])
def test_one_failure_cancels_slow_siblings(fake_inflight, jit):
  rec = fake_inflight()
  b = models.bind("fake:echo", latency_s=HANG_S, fail_on="BAD", output_bytes=16)
  f = jax.jit(jax.vmap(b)) if jit else jax.vmap(b)
  prompts = [f"slow {i}" for i in range(15)] + ["BAD"]
  start = time.monotonic()
  with pytest.raises((xcs_jax.XCSExecutionError, RuntimeError)) as e:
    f(_encoded(prompts)).block_until_ready()
  assert time.monotonic() - start < FAST_S  # << HANG_S
  # The real failure is reported, not a sibling's cancellation.
  assert "FakeProviderError" in str(e.value) and "batch item 15" in str(e.value)
  assert rec.now == 0  # every sibling had ended before the error was raised
  assert wait_until(lambda: not busy_xcs_threads())


def test_failing_host_op_item_stops_unstarted_siblings():
  rec = InFlight()

  @xcs_jax.host_op(out_spec=jax.ShapeDtypeStruct((), jnp.float32), name="first_fails",
                   concurrency=1)
  @rec.wrap
  def first_fails(i):
    if int(i) == 0:
      raise ValueError("item 0 is bad")
    time.sleep(0.5)
    return np.float32(i)

  with pytest.raises(xcs_jax.XCSExecutionError, match="item 0 is bad"):
    jax.vmap(first_fails)(jnp.arange(8.0))
  # One worker: item 0 fails; at most the item already picked up runs.
  assert rec.calls <= 2 and rec.now == 0


def test_busy_thread_check_sees_running_work():
  """The helper the checks below rely on: it sees a call in flight."""
  release = threading.Event()

  @xcs_jax.host_op(out_spec=jax.ShapeDtypeStruct((), jnp.float32), name="held")
  def held(x):
    release.wait(HANG_S)
    return np.float32(0)

  t = threading.Thread(target=lambda: jax.vmap(held)(jnp.ones((3, 2))))
  t.start()
  try:
    assert wait_until(lambda: len(busy_xcs_threads()) >= 3)
  finally:
    release.set()
    t.join(timeout=HANG_S)
  assert wait_until(lambda: not busy_xcs_threads())


def test_no_threads_left_running_after_errors(fake_inflight):
  rec = fake_inflight()
  b = models.bind("fake:echo", latency_s=HANG_S, fail_on="BAD", output_bytes=16,
                  concurrency=32)
  f = jax.jit(jax.vmap(b))
  x = _encoded([f"slow {i}" for i in range(31)] + ["BAD"])

  def fail_once():
    with pytest.raises(RuntimeError):
      f(x).block_until_ready()
    assert rec.now == 0  # no provider call outlived the error

  fail_once()  # warms up (fills) the binding's 32-thread pool
  warm = len(xcs_threads())
  for _ in range(3):
    fail_once()
  # Every worker is idle again (not sleeping out its 20 s), and no threads
  # were added: the full pool cannot grow.
  assert wait_until(lambda: not busy_xcs_threads())
  assert len(xcs_threads()) == warm
  assert rec.now == 0
