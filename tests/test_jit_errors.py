"""Errors under `xcs_jax.jit`: fail fast, say where, leave nothing running.

Slow siblings use the fake provider's cancellable latency (HANG_S), so a
scheduler that waited for them would take HANG_S; the tests allow FAST_S,
far less. Host ops that ignore cancellation (plain Python sleeps) are waited
for, so that nothing is still running when the error reaches the caller.
"""
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import xcs_jax
from xcs_jax import text
from xcs_jax._src.providers.fake import FakeProviderError

from conftest import busy_xcs_threads, unique_binding, wait_until
from jit_helpers import Recorder

HANG_S = 30.0
FAST_S = 5.0


def encoded(s):
  return jnp.asarray(text.encode(s, 16))


def lines_of(f, *needles):
  """Absolute line numbers of the lines of `f`'s source holding each needle."""
  import inspect
  src, first = inspect.getsourcelines(f)
  return [first + next(i for i, l in enumerate(src) if n in l) for n in needles]


def test_failing_branch_among_slow_siblings_fails_fast(fake_inflight):
  rec = fake_inflight()
  slow = unique_binding("fake:echo", latency_s=HANG_S, output_bytes=16)
  fast = unique_binding("fake:upper", output_bytes=16)
  bad = unique_binding("fake:echo", fail_on="BAD", output_bytes=16)

  def f(p):
    a, b = slow(p), slow(p + 1)
    c = bad(fast(p) + 0)  # fast call -> tensor op -> failing call
    return jnp.stack([a, b, c])

  (line,) = lines_of(f, "bad(fast(p)")
  jf = xcs_jax.jit(f)
  start = time.monotonic()
  with pytest.raises(xcs_jax.XCSExecutionError) as e:
    jf(encoded("BAD"))
  assert time.monotonic() - start < FAST_S  # << HANG_S: siblings were cancelled
  assert rec.now == 0                       # ... and had ended before the raise
  err = e.value
  assert isinstance(err.__cause__, FakeProviderError)
  assert err.binding == str(bad) and str(bad) in str(err)
  assert err.source == f"{__file__}:{line} (f)" and err.source in str(err)
  assert "FakeProviderError" in str(err) and "injected failure" in str(err)


def test_the_real_error_is_reported_not_a_sibling_cancellation():
  slow = unique_binding("fake:echo", latency_s=HANG_S, output_bytes=16)
  bad = unique_binding("fake:echo", fail_on="BAD", latency_s=0.05, output_bytes=16)

  @xcs_jax.jit
  def f(p):
    return jnp.stack([slow(p) for _ in range(8)] + [bad(p)])

  with pytest.raises(xcs_jax.XCSExecutionError) as e:
    f(encoded("BAD"))
  assert not isinstance(e.value, xcs_jax.XCSCancelledError)
  assert isinstance(e.value.__cause__, FakeProviderError)


def test_nodes_after_a_failure_never_start():
  rec = Recorder()
  boom = rec.op("boom", fail_with=ValueError("no such row"))
  after = rec.op("after")
  slow_then = rec.op("slow", 0.2)
  never = rec.op("never")

  @xcs_jax.jit
  def f(x):
    return after(boom(x)), never(slow_then(x))

  with pytest.raises(xcs_jax.XCSExecutionError, match="no such row") as e:
    f(1.0)
  assert isinstance(e.value.__cause__, ValueError)
  # `slow` ignores cancellation (a plain sleep): the error does not wait for it
  # (it is abandoned), and nothing after it or after `boom` ever starts, even
  # once `slow` has ended.
  assert wait_until(lambda: rec.now == 0)
  time.sleep(0.05)
  assert "boom" in rec.names()
  assert set(rec.names()) <= {"boom", "slow"}


def test_a_timeout():
  slow = unique_binding("fake:echo", latency_s=HANG_S, output_bytes=16)
  hung = unique_binding("fake:echo", latency_s=HANG_S, timeout_s=0.2, deadline_s=0.3,
                        output_bytes=16)

  @xcs_jax.jit
  def f(p):
    return jnp.stack([slow(p), hung(p), slow(p + 1)])

  start = time.monotonic()
  with pytest.raises(xcs_jax.XCSExecutionError) as e:
    f(encoded("x"))
  assert time.monotonic() - start < FAST_S
  assert isinstance(e.value.__cause__, xcs_jax.XCSTimeoutError)
  assert "deadline_s=0.3" in str(e.value) and str(hung) in str(e.value)


def test_a_host_op_timeout():
  release = threading.Event()
  stuck = xcs_jax.host_op(lambda x: (release.wait(HANG_S), np.float32(x))[1],
                          out_spec=jax.ShapeDtypeStruct((), jnp.float32), name="stuck",
                          timeout_s=0.2)
  try:
    start = time.monotonic()
    with pytest.raises(xcs_jax.XCSExecutionError) as e:
      xcs_jax.jit(lambda x: stuck(x) + 1.0)(1.0)
    assert time.monotonic() - start < FAST_S
    assert isinstance(e.value.__cause__, xcs_jax.XCSTimeoutError)
  finally:
    release.set()  # Python cannot stop the function: let it end


def test_a_provider_error_inside_a_vmap(fake_inflight):
  rec = fake_inflight()
  b = unique_binding("fake:echo", latency_s=HANG_S, fail_on="BAD", output_bytes=16)
  other = unique_binding("fake:upper", latency_s=HANG_S, output_bytes=16)

  def f(ps):
    return jax.vmap(lambda p: jnp.stack([b(p), other(p)]))(ps)

  (line,) = lines_of(f, "b(p)")
  prompts = encoded([f"slow {i}" for i in range(7)] + ["BAD"])
  start = time.monotonic()
  with pytest.raises(xcs_jax.XCSExecutionError) as e:
    xcs_jax.jit(f)(prompts)
  assert time.monotonic() - start < FAST_S
  assert rec.now == 0
  assert "batch item 7" in str(e.value) and isinstance(e.value.__cause__, FakeProviderError)
  assert e.value.source.startswith(f"{__file__}:{line} ")


def test_a_provider_error_inside_a_cond(fake_inflight):
  rec = fake_inflight()
  bad = unique_binding("fake:echo", fail_on="BAD", output_bytes=16)
  slow = unique_binding("fake:echo", latency_s=HANG_S, output_bytes=16)

  @xcs_jax.jit
  def f(i, p):
    answer = lax.cond(i > 0, lambda q: bad(q), lambda q: q, p)
    return answer, slow(p)

  # The branch not taken makes no call, so it cannot fail.
  fast = xcs_jax.jit(lambda i, p: lax.cond(i > 0, lambda q: bad(q), lambda q: q, p))
  assert text.decode(fast(0, encoded("BAD"))) == "BAD"
  start = time.monotonic()
  with pytest.raises(xcs_jax.XCSExecutionError) as e:
    f(1, encoded("BAD"))
  assert time.monotonic() - start < FAST_S
  assert rec.now == 0 and isinstance(e.value.__cause__, FakeProviderError)
  assert str(bad) in str(e.value)


def test_an_error_inside_a_scan_stops_later_iterations():
  rec = Recorder()
  picky = rec.op("picky", fn=lambda x: x if x < 2 else 1 / 0)

  @xcs_jax.jit
  def f(xs):
    return lax.scan(lambda c, x: (c + picky(x), None), 0.0, xs)[0]

  with pytest.raises(xcs_jax.XCSExecutionError) as e:
    f(jnp.arange(6.0))
  assert isinstance(e.value.__cause__, ZeroDivisionError)
  assert [v for _, v in rec.args] == [0.0, 1.0, 2.0]


def test_the_function_still_works_after_an_error():
  b = unique_binding("fake:upper", fail_on="BAD", output_bytes=16)
  f = xcs_jax.jit(lambda p: jnp.stack([b(p), b(p)]))
  with pytest.raises(xcs_jax.XCSExecutionError):
    f(encoded("BAD"))
  assert text.decode(f(encoded("ok"))) == ["OK", "OK"]
  assert xcs_jax.get_jit_stats(f)["cache_misses"] == 1


def test_under_an_outer_jax_jit_the_error_text_survives():
  b = unique_binding("fake:echo", fail_on="BAD", output_bytes=16)
  f = jax.jit(xcs_jax.jit(lambda p: b(p)))
  with pytest.raises(RuntimeError) as e:
    f(encoded("BAD")).block_until_ready()
  assert str(b) in str(e.value) and "FakeProviderError" in str(e.value)


def test_no_work_left_running_after_errors(fake_inflight):
  rec = fake_inflight()
  slow = unique_binding("fake:echo", latency_s=HANG_S, output_bytes=16)
  bad = unique_binding("fake:echo", fail_on="BAD", output_bytes=16)
  ops_rec = Recorder()
  sleeper = ops_rec.op("sleeper", 0.1)

  @xcs_jax.jit
  def f(ps, x):
    return (jax.vmap(slow)(ps), bad(ps[-1]), sleeper(x),
            lax.scan(lambda c, p: (c + jnp.sum(slow(p)), None), 0, ps)[0])

  prompts = encoded([f"p{i}" for i in range(5)] + ["BAD"])

  def fail_once():
    with pytest.raises(xcs_jax.XCSExecutionError):
      f(prompts, 1.0)
    # Cooperative calls stop at once; `sleeper` (a plain sleep) is abandoned
    # and ends by itself, without delaying the error.
    assert wait_until(lambda: rec.now == 0, 1.0)
    assert wait_until(lambda: ops_rec.now == 0, 1.0)

  for _ in range(3):
    fail_once()
  # Nothing in flight a while later either, and nothing started after the raise.
  calls = (rec.calls, ops_rec.calls)
  time.sleep(0.3)
  assert rec.now == 0 and ops_rec.now == 0
  assert (rec.calls, ops_rec.calls) == calls
  # No pool worker is running a work item.
  assert wait_until(lambda: not busy_xcs_threads())
