"""The runtime: scopes, cancellation, abandonment, timeouts, interrupts, async.

Deterministic by construction: uncancellable calls wait on events the test
sets at the end, so "the error arrived while they still ran" is a fact, not
a timing; clocks that do not sleep stand in for backoff and deadlines.
"""
from __future__ import annotations

import _thread
import ast
import asyncio
import os
import pathlib
import subprocess
import sys
import threading
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xcs_jax
from xcs_jax import extend, models, text
from xcs_jax._src.binding_ops import GenerateOp
from conftest import InFlight, VirtualClock, unique_binding, wait_until

F32 = jax.ShapeDtypeStruct((), jnp.float32)
SRC = pathlib.Path(xcs_jax.__file__).parent


def blocked_op(release: threading.Event, rec: InFlight, **kw):
  """A host op that ignores cancellation: it returns only once `release` is set."""
  def hang(x):
    with rec.track():
      release.wait(30)
      return np.float32(x)
  return xcs_jax.host_op(hang, out_spec=F32, **kw)


@pytest.fixture
def release():
  event = threading.Event()
  yield event
  event.set()  # let every abandoned call end


@pytest.fixture
def rt():
  with xcs_jax.runtime(name="t-rt") as r:
    yield r


# -- structured concurrency -----------------------------------------------------

def test_an_error_beside_uncancellable_siblings_surfaces_while_they_run(release, rt):
  rec = InFlight()
  hang = blocked_op(release, rec)

  def fail_once_both_run(x):
    assert wait_until(lambda: rec.now == 2)
    raise ValueError("BAD")
  bad = xcs_jax.host_op(fail_once_both_run, out_spec=F32)

  @xcs_jax.jit
  def f(x):
    return hang(x), hang(x + 1), bad(x)

  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    start = time.monotonic()
    with pytest.raises(xcs_jax.XCSExecutionError, match="BAD"):
      f(1.0)
    elapsed = time.monotonic() - start
  # The error did not wait for the siblings: both are still blocked.
  assert wait_until(lambda: rec.now == 2, 2.0) and not release.is_set()
  assert elapsed < 5.0  # far below the siblings' 30 s
  # A later, unrelated run is not held up by them.
  echo = jax.vmap(unique_binding("fake:echo", output_bytes=8))
  assert text.decode(xcs_jax.jit(echo)(text.encode(["a", "b"], 8))) == ["a", "b"]
  assert rt.abandoned_calls == 2


def test_hung_host_functions_never_starve_later_calls(release, rt):
  """The starvation repro: 4 x 256 calls that never return, each timed out."""
  rec = InFlight()
  hang = blocked_op(release, rec, timeout_s=0.2, concurrency=256)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(4):
      with pytest.raises(xcs_jax.XCSExecutionError) as e:
        xcs_jax.jit(jax.vmap(hang))(jnp.zeros(256))
      assert isinstance(e.value.__cause__, xcs_jax.XCSTimeoutError) or (
          "XCSTimeoutError" in str(e.value))
  # Warned once, counted every time.
  assert sum("did not stop" in str(w.message) for w in caught) == 1
  assert rt.abandoned_calls >= 4 * 256 - 3   # all but a few that had not started
  echo = unique_binding("fake:echo", output_bytes=8)
  out = xcs_jax.jit(jax.vmap(echo))(text.encode(["a", "b", "c"], 8))
  assert text.decode(out) == ["a", "b", "c"]
  # The abandoned calls gave their op's slots back: the op itself works again.
  release.set()
  assert wait_until(lambda: rec.now == 0)
  ok = xcs_jax.host_op(lambda x: np.float32(x), out_spec=F32, timeout_s=5.0)
  assert float(xcs_jax.jit(ok)(2.0)) == 2.0


def test_a_queued_call_never_starts_after_its_scope_failed(rt):
  started = []

  def one(x):
    started.append(float(x))
    if x == 0:
      raise ValueError("first item fails")
    return np.float32(x)

  op = xcs_jax.host_op(one, out_spec=F32, concurrency=1)
  with pytest.raises(xcs_jax.XCSExecutionError, match="first item fails"):
    xcs_jax.jit(jax.vmap(op))(jnp.arange(8.0))
  time.sleep(0.05)
  assert started == [0.0]


def test_usage_tells_errors_from_cancelled_siblings(rt):
  b = unique_binding("fake:echo", fail_on="BAD", latency_s=0.5, concurrency=8,
                     output_bytes=8)
  prompts = text.encode([f"p{i}" for i in range(99)] + ["BAD"], 8)
  with pytest.raises(xcs_jax.XCSExecutionError):
    xcs_jax.jit(jax.vmap(b))(prompts)
  assert wait_until(lambda: b.usage().calls + b.usage().cancelled >= 100 - 8)
  u = b.usage()
  assert u.errors == 1
  assert u.cancelled >= 1 and u.abandoned == 0
  assert u.errors + u.cancelled <= 100


def test_timeouts_count_running_time_not_time_in_a_queue(rt):
  # 6 calls of 0.15 s, 2 at a time (0.45 s in all), each with a 0.3 s timeout.
  b = unique_binding("fake:echo", latency_s=0.15, timeout_s=0.3, deadline_s=0.3,
                     concurrency=2, output_bytes=8)
  out = jax.jit(jax.vmap(b))(text.encode([f"p{i}" for i in range(6)], 8))
  assert len(text.decode(out)) == 6
  assert b.usage().errors == 0


def test_backoff_sleeps_count_against_the_deadline():
  clock = VirtualClock()
  with xcs_jax.runtime(clock=clock):
    b = unique_binding("fake:echo", transient_failures=1000, deadline_s=1.0, output_bytes=8)
    with pytest.raises(xcs_jax.XCSExecutionError) as e:
      b(text.encode("x", 8))
    assert isinstance(e.value.__cause__, xcs_jax.XCSTimeoutError)
    assert "deadline_s=1.0" in str(e.value) and "TransientError" in str(e.value)
    # The backoff slept, and stopped as soon as the next sleep would pass the
    # deadline (it fails then, rather than sleep to the deadline for nothing).
    assert len(clock.waits) > 1 and sum(clock.waits) <= 1.0
    u = b.usage()
    assert u.retries == len(clock.waits) and u.errors == 1


# -- interrupts -------------------------------------------------------------------

@pytest.mark.parametrize("under_jit", [True, False])
def test_an_interrupt_reaches_the_caller_while_calls_run(release, rt, under_jit):
  rec = InFlight()
  hang = blocked_op(release, rec, concurrency=4)
  slow = unique_binding("fake:echo", latency_s=30.0, output_bytes=8)

  def f(xs, ps):
    return jax.vmap(hang)(xs), jax.vmap(slow)(ps)
  run = xcs_jax.jit(f) if under_jit else f
  xs, ps = jnp.arange(16.0), text.encode([f"p{i}" for i in range(8)], 8)
  timer = threading.Timer(0.3, _thread.interrupt_main)
  timer.start()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    with pytest.raises(KeyboardInterrupt):
      try:
        run(xs, ps)
      finally:
        timer.cancel()
  # Arrived while the uncancellable calls still ran; queued ones never start.
  assert not release.is_set() and rec.now <= 4
  if under_jit:  # the cancellable calls ran beside them, and were cancelled
    assert wait_until(lambda: slow.usage().cancelled >= 1, 2.0)
  else:          # eagerly they come next, and never start
    assert slow.usage().calls == 0
  release.set()
  assert wait_until(lambda: rec.now == 0)
  time.sleep(0.05)
  assert rec.calls <= 4


# -- limits ----------------------------------------------------------------------

def test_limits_are_keyed_by_op_identity_not_name(release, rt):
  rec = InFlight()
  slow = blocked_op(release, rec, concurrency=1)
  instant = xcs_jax.host_op(lambda x: np.float32(x + 1), out_spec=F32, concurrency=1)
  t = threading.Thread(target=lambda: xcs_jax.jit(slow)(1.0), daemon=True)
  t.start()
  assert wait_until(lambda: rec.now == 1)
  assert float(xcs_jax.jit(instant)(1.0)) == 2.0   # never waits behind `slow`
  release.set()
  t.join(5)


def test_ops_made_anew_on_every_call_leave_no_limit_behind(rt):
  for i in range(50):
    op = xcs_jax.host_op(lambda x, i=i: np.float32(x + i), out_spec=F32)
    assert float(jax.jit(op)(1.0)) == 1.0 + i
  assert len(rt.limits) == 0


def test_max_concurrency_holds_no_thread_per_waiting_call(rt):
  gate = threading.Event()
  rec = InFlight()

  def slow(x):
    with rec.track():
      gate.wait(0.05)
      return np.float32(x)
  op = xcs_jax.host_op(slow, out_spec=F32)

  @xcs_jax.jit(max_concurrency=1)
  def f(x):
    return op(x) + op(x + 1) + op(x + 2) + op(x + 3)

  threads_before = len([t for t in threading.enumerate() if "t-rt-worker" in t.name])
  assert float(f(0.0)) == 6.0
  assert rec.peak == 1
  workers = len([t for t in threading.enumerate() if "t-rt-worker" in t.name])
  assert workers - threads_before <= 2   # the one running, and one handing over


class _Blocking(extend.Provider):
  """A blocking provider that ignores cancellation (a sync SDK call)."""
  name = "test_blocking"
  params = {"base_url": None}
  release = threading.Event()

  def generate(self, binding, prompt, seed, ctx):
    if "BAD" in prompt:
      raise ValueError("bad prompt")
    self.release.wait(30)
    return extend.Completion(prompt)


extend.register_provider("test_blocking", _Blocking)


def test_an_abandoned_request_holds_its_endpoint_slot_until_it_ends(rt):
  _Blocking.release.clear()
  m = models.bind("test_blocking:m", base_url="http://127.0.0.1:9/v1", concurrency=1,
                  output_bytes=8)
  bad = models.bind("test_blocking:m", base_url="http://127.0.0.1:8/v1", output_bytes=8)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)
      with pytest.raises(xcs_jax.XCSExecutionError, match="bad prompt"):
        xcs_jax.jit(lambda p, q: (m(p), bad(q)))(text.encode("x", 8), text.encode("BAD", 8))
    key, _ = GenerateOp(m).limit(rt)
    assert wait_until(lambda: rt.limits.held(key) == 1)   # the server still sees it
    assert m.usage().abandoned == 1
  finally:
    _Blocking.release.set()
  assert wait_until(lambda: rt.limits.held(key) == 0)


# -- async providers -----------------------------------------------------------------

class _AsyncSleeper(extend.Provider):
  """An async provider that records cancellations."""
  name = "test_async"
  default_concurrency = 4096
  cancelled = 0
  started = 0

  async def generate(self, binding, prompt, seed, ctx):
    if "BAD" in prompt:
      raise ValueError("bad prompt")
    type(self).started += 1
    try:
      await asyncio.sleep(float(binding.get("system_prompt") or 0.0))
    except asyncio.CancelledError:
      type(self).cancelled += 1
      raise
    return extend.Completion(prompt.upper())


extend.register_provider("test_async", _AsyncSleeper)


def test_async_providers_run_on_the_event_loop_without_a_thread_each(rt):
  m = models.bind("test_async:m", system_prompt="0.3", output_bytes=8)
  threads = threading.active_count()
  peak = [threads]
  done = threading.Event()

  def watch():
    while not done.is_set():
      peak[0] = max(peak[0], threading.active_count())
      time.sleep(0.01)
  w = threading.Thread(target=watch, daemon=True)
  w.start()
  out = xcs_jax.jit(jax.vmap(m))(text.encode([f"p{i}" for i in range(2000)], 8))
  done.set()
  w.join()
  assert text.decode(out)[:2] == ["P0", "P1"]
  assert peak[0] - threads < 20   # the loop thread and a few workers, not 2,000
  assert m.usage().calls == 2000


def test_a_failure_cancels_async_requests_for_real(rt):
  _AsyncSleeper.cancelled = 0
  slow = models.bind("test_async:m", system_prompt="30", output_bytes=8)
  prompts = text.encode([f"p{i}" for i in range(7)] + ["BAD"], 8)
  with pytest.raises(xcs_jax.XCSExecutionError, match="bad prompt"):
    xcs_jax.jit(jax.vmap(slow))(prompts)
  assert wait_until(lambda: _AsyncSleeper.cancelled == 7, 2.0)
  assert slow.usage().cancelled == 7 and slow.usage().errors == 1


def test_async_deadline_cancels_the_request(rt):
  _AsyncSleeper.cancelled = 0
  slow = models.bind("test_async:m", system_prompt="30", timeout_s=0.1, deadline_s=0.1,
                     output_bytes=8)
  with pytest.raises(xcs_jax.XCSExecutionError) as e:
    slow(text.encode("x", 8))
  assert isinstance(e.value.__cause__, xcs_jax.XCSTimeoutError)
  assert wait_until(lambda: _AsyncSleeper.cancelled == 1, 2.0)


def test_call_async_never_blocks_the_event_loop(rt):
  m = models.bind("test_async:m", system_prompt="0.3", output_bytes=8, cache=None)
  f = xcs_jax.jit(jax.vmap(m))
  prompts = text.encode(["a", "b"], 8)
  f(prompts)  # traced and compiled outside the timed part

  async def main():
    ticks = 0

    async def ticker():
      nonlocal ticks
      while True:
        await asyncio.sleep(0.01)
        ticks += 1
    t = asyncio.create_task(ticker())
    out = await f.call_async(prompts)
    t.cancel()
    return out, ticks
  out, ticks = asyncio.run(main())
  assert text.decode(out) == ["A", "B"]
  assert ticks >= 10   # the loop kept running during the 0.3 s call


def test_cancelling_the_awaiting_task_cancels_the_run(rt):
  _AsyncSleeper.cancelled = _AsyncSleeper.started = 0
  slow = models.bind("test_async:m", system_prompt="30", output_bytes=8)
  f = xcs_jax.jit(jax.vmap(slow))

  async def main():
    task = asyncio.create_task(f.call_async(text.encode(["a", "b", "c"], 8)))
    for _ in range(1000):                # until all three calls are running
      if _AsyncSleeper.started == 3:
        break
      await asyncio.sleep(0.01)
    assert _AsyncSleeper.started == 3
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
      await task
  asyncio.run(main())
  assert wait_until(lambda: _AsyncSleeper.cancelled == 3, 2.0)


# -- which runtime serves a call ----------------------------------------------------

def test_a_scoped_runtime_has_its_own_usage_and_closes():
  b = unique_binding("fake:echo", output_bytes=8)
  with xcs_jax.runtime(name="scoped-rt") as r:
    assert xcs_jax.current_runtime() is r
    xcs_jax.jit(jax.vmap(b))(text.encode(["a", "b"], 8))
    assert b.usage().calls == 2
  assert xcs_jax.current_runtime() is not r and r.closed
  assert b.usage().calls == 0          # the default runtime saw none
  assert wait_until(lambda: not [t for t in threading.enumerate()
                                 if t.name.startswith("scoped-rt")])
  with pytest.raises(xcs_jax.RuntimeClosedError, match="closed"):
    with r:
      pass


def test_plain_jax_jit_uses_the_runtime_current_at_trace_time():
  b = unique_binding("fake:echo", output_bytes=8, cache=None)
  f = jax.jit(jax.vmap(b))
  with xcs_jax.runtime() as r:
    f(text.encode(["a"], 8))           # traced here, under `r`
    assert r.usage.get(b).calls == 1
  with pytest.raises(Exception, match="closed"):
    f(text.encode(["a"], 8)).block_until_ready()   # compiled under `r`, now closed
  g = jax.jit(jax.vmap(b))
  g(text.encode(["a", "b"], 8))        # traced under the default: it follows the default
  with xcs_jax.runtime() as r2:
    g(text.encode(["a", "b"], 8))
    assert r2.usage.get(b).calls == 0
  assert b.usage().calls == 4


def test_runtime_arguments_are_checked():
  with pytest.raises(ValueError, match="cancel_grace_s"):
    xcs_jax.runtime(cancel_grace_s=-1)
  with pytest.raises(ValueError, match="name"):
    xcs_jax.runtime(name="")


# -- layering ----------------------------------------------------------------------

def test_import_initializes_no_backend():
  code = ("import xcs_jax; from jax._src import xla_bridge; "
          "assert not xla_bridge._backends, xla_bridge._backends; print('ok')")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": ""}, timeout=120)
  assert out.returncode == 0, out.stderr
  assert "ok" in out.stdout


def _imports(path: pathlib.Path) -> set[str]:
  """Every `xcs_jax._src` module `path` imports, at any depth (lazy ones too)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
        "xcs_jax._src"):
      found.add(node.module)
      for a in node.names:
        found.add(f"{node.module}.{a.name}")
    elif isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name.startswith("xcs_jax._src"))
  return found


def test_internal_imports_point_one_way():
  modules = {}
  for path in (SRC / "_src").rglob("*.py"):
    rel = path.relative_to(SRC.parent).with_suffix("")
    name = ".".join(rel.parts).removesuffix(".__init__")
    modules[name] = path
  graph = {m: {i for i in _imports(p) if i in modules and i != m}
           for m, p in modules.items()}

  def visit(m, stack):
    assert m not in stack, f"import cycle: {' -> '.join(stack + [m])}"
    for dep in graph[m]:
      visit(dep, stack + [m])
  for m in graph:
    visit(m, [])
  # No import inside a function to dodge a cycle.
  for m, path in modules.items():
    for fn in ast.walk(ast.parse(path.read_text())):
      if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        for node in ast.walk(fn):
          if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("xcs_jax"):
            raise AssertionError(f"{m}.{fn.name} imports {node.module} lazily")
          if isinstance(node, ast.Import) and any(a.name.startswith("xcs_jax")
                                                  for a in node.names):
            raise AssertionError(f"{m}.{fn.name} imports xcs_jax lazily")
  # Providers never reach up into the ops built on them.
  for m, deps in graph.items():
    if ".providers." in m:
      assert not {d for d in deps if d.endswith((".numeric", ".models", ".binding_ops"))}, m


def test_every_public_error_type_is_importable_from_xcs_jax():
  import xcs_jax._src.errors as errors
  public = {n for n in dir(errors) if n.endswith("Error") and isinstance(
      getattr(errors, n), type)}
  public |= {"NoGradientError", "FakeProviderError", "RuntimeClosedError"}
  missing = {n for n in public if not hasattr(xcs_jax, n)}
  assert not missing
  assert issubclass(xcs_jax.ProviderValueError, ValueError)


def test_old_provider_names_still_work_with_a_deprecation_warning():
  with pytest.warns(DeprecationWarning, match="xcs_jax.extend.Provider"):
    assert models.Provider is extend.Provider
