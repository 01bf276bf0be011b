"""Critical-path-first: calls waiting for slots start by their longest remaining path."""
import time

import jax.numpy as jnp
import pytest

import xcs_jax
from xcs_jax._src.executor import Limits
from xcs_jax._src.jit import priority
from xcs_jax._src.scope import Job, Scope, wait_for_job

from jit_helpers import Recorder


def test_limits_grant_by_priority_then_in_arrival_order():
  limits, order = Limits(), []
  limits.request("k", 1, lambda: True)          # holds the only slot
  for name, p in (("low", 0.0), ("high", 3.0), ("mid", 1.0), ("mid2", 1.0), ("low2", 0.0)):
    limits.request("k", 1, lambda name=name: order.append(name) or True, p)
  for _ in range(5):
    limits.release("k")
  assert order == ["high", "mid", "mid2", "low", "low2"]
  limits.release("k")
  assert len(limits) == 0


def _recording_job(scope, name, n, order, key, priority_):
  def run(i, ctx):
    order.append(name)
    time.sleep(0.02)
    return i
  return Job(scope, n, run, limit_key=key, limit=1, priority=priority_).start()


@pytest.mark.parametrize("urgent", [True, False])
def test_a_batch_hands_its_slot_to_a_more_urgent_call(urgent):
  with xcs_jax.runtime() as rt:
    scope, order, key = Scope(rt), [], ("test", object())
    batch = _recording_job(scope, "batch", 5, order, key, 0.0)
    while not order:             # the batch's lane holds the only slot
      time.sleep(0.001)
    other = _recording_job(scope, "other", 1, order, key, 5.0 if urgent else 0.0)
    wait_for_job(batch)
    wait_for_job(other)
  if urgent:     # right after the item the batch was running
    assert order.index("other") == 1
  else:          # first come, first served: after the whole batch
    assert order == ["batch"] * 5 + ["other"]


def _program(rec):
  long = rec.op("long", 0.06)
  link1, link2 = rec.op("link1", 0.01), rec.op("link2", 0.01)

  def program(x):
    b = link2(link1(x))          # a chain of two short calls, first in program order
    c = long(x)                  # one long call
    return b + c
  return program


def test_measured_latencies_start_the_longest_remaining_path_first():
  rec = Recorder()
  program = _program(rec)
  f = xcs_jax.jit(program, max_concurrency=1)   # one slot: the order is all there is
  with xcs_jax.runtime():
    f(1.0)       # nothing measured yet: every call counts the same, the chain goes first
    assert rec.names()[0] == "link1"
    rec.log.clear()
    f(1.0)       # measured: `long` (60 ms) heads a longer path than the chain (20 ms)
    assert rec.names()[0] == "long"
    rec.log.clear()
    priority.CRITICAL_PATH_FIRST = False
    try:
      f(1.0)     # first come, first served: program order
    finally:
      priority.CRITICAL_PATH_FIRST = True
    assert rec.names()[0] == "link1"


def test_measurements_survive_a_retrace_and_stay_in_their_runtime():
  rec = Recorder()
  program = _program(rec)
  with xcs_jax.runtime():
    xcs_jax.jit(program, max_concurrency=1)(1.0)
    rec.log.clear()
    xcs_jax.jit(program, max_concurrency=1)(1.0)    # a new function: traced again
    assert rec.names()[0] == "long"
  rec.log.clear()
  with xcs_jax.runtime():                          # another runtime measured nothing
    xcs_jax.jit(program, max_concurrency=1)(1.0)
    assert rec.names()[0] == "link1"


def test_unmeasured_calls_count_the_same_so_the_longer_chain_goes_first():
  rec = Recorder()
  one = rec.op("one")
  a, b = rec.op("a"), rec.op("b")
  f = xcs_jax.jit(lambda x: one(x) + b(a(x)), max_concurrency=1)
  with xcs_jax.runtime():
    f(1.0)
  assert rec.names()[0] == "a"        # heads two calls; `one` heads one
  rec.log.clear()
  priority.CRITICAL_PATH_FIRST = False
  try:
    with xcs_jax.runtime():
      f(1.0)
  finally:
    priority.CRITICAL_PATH_FIRST = True
  assert rec.names()[0] == "one"      # first come, first served: program order


def test_remaining_paths_of_a_plan():
  rec = Recorder()
  program = _program(rec)
  f = xcs_jax.jit(program, max_concurrency=1)
  plan = f.trace(1.0)
  with xcs_jax.runtime() as rt:
    unmeasured = priority.remaining_paths(plan, rt.call_times)
    f(1.0)
    measured = priority.remaining_paths(plan, rt.call_times)
  names = {i: s.eqn.params["op"].name for i, s in plan.steps.items() if s.eqn is not None}
  by = {names[i]: (unmeasured[i], measured[i]) for i in names}
  assert by["link1"][0] == 2 * priority.UNMEASURED_S and by["long"][0] == priority.UNMEASURED_S
  assert by["long"][1] > by["link1"][1] > by["link2"][1] > 0
  assert by["long"][1] == pytest.approx(0.06, rel=0.5)


def test_call_times_are_kept_per_call_site():
  rec = Recorder()
  op = rec.op("timed", 0.01)
  f = xcs_jax.jit(lambda x: op(x) + op(x + 1.0) * 0 + op(jnp.float32(2.0)))
  with xcs_jax.runtime() as rt:
    f(1.0)
    plan = f.trace(1.0)
    sites = {(s.eqn.params["op"], s.eqn.params["source"])
             for s in plan.steps.values() if s.eqn is not None}
    assert sites
    for op_, source in sites:
      line = source[0] if isinstance(source, tuple) else source
      assert 0.005 <= rt.call_times.get(op_, line) < 1.0
      assert rt.call_times.get(op_, "elsewhere.py:1 (f)") is None
