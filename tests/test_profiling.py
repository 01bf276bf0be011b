"""Profiling: trace files, jax.profiler annotations, per-call-site stats, the report."""
import glob
import gzip
import json
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xcs_jax
from xcs_jax import text
from xcs_jax._src import tracing

from conftest import unique_binding
from jit_helpers import Recorder
from trace_format import check_chrome_trace

P = 32


def _prompts(*words):
  return jnp.asarray(text.encode(list(words), P))


def _hybrid(latency=0.02):
  """Async calls (fake), thread calls (host_op), a batched call, a retry, a
  limit wait, tensor code between."""
  # cache=None: every call made (a cached answer shows as a call with cache_hit).
  llm = unique_binding("fake:upper", latency_s=latency, output_bytes=P, cache=None)
  flaky = unique_binding("fake:echo", latency_s=latency, output_bytes=P, transient_failures=1,
                         cache=None)
  rec = Recorder()
  slow = rec.op("slow_host", 2.5 * latency, concurrency=1)   # one slot for two sites

  @xcs_jax.jit
  def f(p, x):
    a = llm(p[0])
    b = jax.vmap(llm)(p)
    c = flaky(p[1] + 0 * a)
    # The second call site waits for `a`, so it is a call of its own (not
    # batched with the first), and asks for the slot while the first holds it.
    y = slow(x) + slow(x + a[0].astype(jnp.float32))
    return a, b, c, jnp.tanh(y)
  return f, rec


def _record(tmp_path, f, *args, name="trace.json"):
  path = tmp_path / name
  with xcs_jax.profiler.trace(path):
    jax.block_until_ready(f(*args))
  opener = gzip.open if name.endswith(".gz") else open
  with opener(path, "rt") as fh:
    return json.load(fh)


# --- the trace file -------------------------------------------------------------------

def test_trace_is_a_valid_chrome_trace_with_every_kind_of_span(tmp_path):
  f, _ = _hybrid()
  p = _prompts("one", "two", "three")
  f(p, 1.0)        # compiled and measured before the trace
  trace = _record(tmp_path, f, p, 1.0)
  events = check_chrome_trace(trace)
  by_cat = {}
  for e in events:
    by_cat.setdefault(e.get("cat"), []).append(e)

  calls = [e for e in by_cat["call"] if e["args"]["op"] == "generate"]
  # 1 + 3 (vmap) + 1 model calls, each a slice with its site and item
  assert len(calls) == 5
  for e in calls:
    args = e["args"]
    assert args["binding"].startswith("fake:") and "test_profiling.py" in args["source"]
    assert args["attempts"] >= 1 and args["queued_ms"] >= 0
    assert args["prompt_tokens"] >= 1 and "completion_tokens" in args
    assert e["tid"] >= tracing.LANE_TRACKS    # async calls: event-loop lane tracks
  assert sorted(e["args"]["item"] for e in calls) == [0, 0, 0, 1, 2]
  hosts = [e for e in by_cat["call"] if e["args"]["op"] == "host_op"]
  assert len(hosts) == 2 and all(e["tid"] < tracing.LANE_TRACKS for e in hosts)
  assert by_cat["segment"] and by_cat["scheduler"]
  nodes = {e["name"] for e in by_cat["node"]}
  assert any("slow_host" in n for n in nodes) and any("generate" in n for n in nodes)
  # the two host-op call sites share a limit of 1: one waited for the other's slot
  waits = [e for e in by_cat["limit"] if e["ph"] == "b"]
  assert waits and "slow_host" in waits[0]["name"] and "limit 1" in waits[0]["name"]
  names = {e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
  assert threading.current_thread().name in names      # the scheduler's thread
  assert any(n.startswith("event loop lane") for n in names)


def test_answers_from_the_response_cache_show_as_calls_marked_cache_hit(tmp_path):
  b = unique_binding("fake:echo", output_bytes=P)
  f = xcs_jax.jit(jax.vmap(b))
  p = _prompts("one", "two")
  f(p)                                        # the answers are cached
  events = check_chrome_trace(_record(tmp_path, f, p))
  calls = [e for e in events if e.get("cat") == "call"]
  assert len(calls) == 2 and all(e["args"].get("cache_hit") for e in calls)


def test_retry_waits_are_slices_inside_the_retried_call(tmp_path):
  flaky = unique_binding("fake:echo", latency_s=0.01, output_bytes=P, transient_failures=2)
  f = xcs_jax.jit(lambda p: flaky(p))
  trace = _record(tmp_path, f, _prompts("again")[0])
  events = check_chrome_trace(trace)
  call = next(e for e in events if e.get("cat") == "call")
  retries = [e for e in events if e.get("cat") == "retry"]
  assert call["args"]["attempts"] == 3 and len(retries) == 2
  for r in retries:
    assert r["tid"] == call["tid"]
    assert call["ts"] <= r["ts"] and r["ts"] + r["dur"] <= call["ts"] + call["dur"] + 1e-3
    assert r["args"]["after"] == "TransientError"


def test_failed_calls_show_their_error_type(tmp_path):
  bad = unique_binding("fake:echo", output_bytes=P, fail_on="boom")
  f = xcs_jax.jit(lambda p: bad(p))
  path = tmp_path / "t.json"
  with pytest.raises(xcs_jax.XCSExecutionError):
    with xcs_jax.profiler.trace(path):
      f(_prompts("boom")[0])
  events = check_chrome_trace(json.loads(path.read_text()))
  call = next(e for e in events if e.get("cat") == "call")
  assert call["args"]["error"] == "FakeProviderError"
  assert tracing.recorder is None       # the block ended: nothing records


def test_gzipped_trace_and_eager_calls(tmp_path):
  llm = unique_binding("fake:echo", output_bytes=P)
  trace = _record(tmp_path, jax.vmap(llm), _prompts("a", "b"), name="t.json.gz")
  events = check_chrome_trace(trace)
  assert sum(e.get("cat") == "call" for e in events) == 2


def test_trace_arguments_are_checked(tmp_path):
  with pytest.raises(ValueError, match="directory"):
    with xcs_jax.profiler.trace(tmp_path / "missing" / "t.json"):
      pass
  with pytest.raises(ValueError, match="file path"):
    with xcs_jax.profiler.trace(3):
      pass
  with xcs_jax.profiler.trace(tmp_path / "a.json"):
    with pytest.raises(RuntimeError, match="already recording"):
      with xcs_jax.profiler.trace(tmp_path / "b.json"):
        pass
  assert tracing.recorder is None
  assert json.loads((tmp_path / "a.json").read_text())["traceEvents"]


def test_spans_are_jax_profiler_annotations(tmp_path):
  rec = Recorder()
  op = rec.op("annotated_host_op")
  f = xcs_jax.jit(lambda x: op(x) * 2.0)
  f(1.0)
  with jax.profiler.trace(str(tmp_path)):
    f(1.0)
  files = glob.glob(str(tmp_path / "**" / "*.xplane.pb"), recursive=True)
  assert files
  data = open(files[0], "rb").read()
  assert b"host_op annotated_host_op" in data     # the call
  assert b"scheduler" in data and b"step 1: tensor segment [mul]" in data


# --- stats -------------------------------------------------------------------------------

def test_per_call_site_stats(tmp_path):
  f, _ = _hybrid()
  p = _prompts("one", "two", "three")
  f(p, 1.0)
  f(p, 1.0)
  stats = xcs_jax.get_jit_stats(f)
  sites = stats["call_sites"]
  # 3 model call sites; the 2 host-op calls are on one line: one site
  assert len(sites) == 4
  assert {s["op"] for s in sites} == {"generate", "host_op"}
  host = next(s for s in sites if s["op"] == "host_op")
  assert host["count"] == 4 and host["binding"] == "slow_host"
  batched = next(s for s in sites if s["op"] == "generate" and s["count"] == 6)  # 3 x 2
  assert batched["p50_s"] <= batched["p95_s"] <= batched["max_s"] <= batched["total_s"]
  flaky = next(s for s in sites if s["retries"])
  assert flaky["retries"] == 1 and flaky["count"] == 2 and flaky["errors"] == 0
  assert all(s["p50_s"] > 0 and "test_profiling.py:" in s["source"] for s in sites)
  assert {s["segment"].split(":")[0] for s in stats["segments"]}   # "step #k"
  assert all(s["count"] == 2 for s in stats["segments"])


def test_errors_are_counted_per_call_site():
  bad = unique_binding("fake:echo", output_bytes=P, fail_on="boom")
  f = xcs_jax.jit(jax.vmap(bad))
  with pytest.raises(xcs_jax.XCSExecutionError):
    f(_prompts("fine", "boom"))
  [site] = xcs_jax.get_jit_stats(f)["call_sites"]
  assert site["errors"] == 1 and site["count"] >= 1


def test_critical_path_and_where_the_time_went():
  rec = Recorder()
  a, b, c = rec.op("a", 0.05), rec.op("b", 0.05), rec.op("c", 0.01)

  @xcs_jax.jit
  def f(x):
    return b(a(x) * 2.0) + c(x)       # a -> b is the critical path; c beside it

  f(1.0)
  f(1.0)
  stats = xcs_jax.get_jit_stats(f)
  assert 0.1 <= stats["last_critical_path_s"] <= stats["last_wall_s"]
  parts = stats["last_breakdown"]
  assert set(parts) == {"calls_s", "segments_s", "limits_s", "scheduler_s", "tracing_s"}
  assert all(v >= 0 for v in parts.values())
  assert sum(parts.values()) == pytest.approx(stats["last_wall_s"], rel=1e-6, abs=1e-6)
  assert parts["calls_s"] >= 0.1           # a and b, one after the other
  last = f._profile.last
  path_ops = [last.plan.steps[i].eqn.params["op"].name for i in last.critical_path
              if last.plan.steps[i].eqn is not None]
  assert path_ops == ["a", "b"]


def test_stats_before_any_run_and_of_tensor_only_functions():
  f = xcs_jax.jit(lambda x: x + 1)
  stats = xcs_jax.get_jit_stats(f)
  assert stats["call_sites"] == [] and stats["segments"] == []
  assert stats["last_critical_path_s"] is None and stats["last_breakdown"] is None
  f(1.0)
  assert xcs_jax.get_jit_stats(f)["last_breakdown"] is None
  assert "no run measured" in f.profile_report()


# --- the report and its hints ------------------------------------------------------------------

def test_profile_report_marks_the_critical_path():
  rec = Recorder()
  a, b, c = rec.op("a", 0.03), rec.op("b", 0.03), rec.op("c", 0.005)
  f = xcs_jax.jit(lambda x: b(a(x) * 2.0) + c(x))
  f(1.0)
  report = f.profile_report()
  assert "measured critical path" in report and "where the wall time went" in report
  marked = [line for line in report.splitlines() if line.startswith("  * ")]
  assert any("host_op a " in line for line in marked)
  assert any("host_op b " in line for line in marked)
  assert not any("host_op c " in line for line in marked)
  assert "call sites (all calls so far)" in report


def test_hint_for_calls_waiting_on_a_concurrency_limit():
  rec = Recorder()
  op = rec.op("limited", 0.02, concurrency=2)
  f = xcs_jax.jit(jax.vmap(op))
  f(jnp.arange(8.0))
  hints = f._profile.hints()
  assert any("waited for a slot of the concurrency limit of 2" in h and "limited" in h
             and "`concurrency=`" in h for h in hints), hints
  assert "waited for a slot" in f.profile_report()


def test_hint_for_a_python_loop_that_serializes_calls():
  rec = Recorder()
  step = rec.op("step", 0.005)

  @xcs_jax.jit
  def f(x):
    for _ in range(4):
      x = step(x)          # each call needs the last one's result
    return x

  f(1.0)
  hints = f._profile.hints()
  assert any("4 calls of host_op step" in h and "one after another" in h
             and "jax.vmap" in h for h in hints), hints


def test_no_hints_for_a_plain_parallel_run():
  rec = Recorder()
  ops = [rec.op(f"p{i}", 0.01) for i in range(3)]
  f = xcs_jax.jit(lambda x: sum(op(x) for op in ops))
  f(1.0)
  f(1.0)
  assert f._profile.hints() == []
  assert "hints: none" in f.profile_report()


def test_a_call_context_counts_retries_and_takes_facts_only_when_traced():
  from xcs_jax._src.scope import CallContext
  ctx = CallContext()
  ctx.retrying(RuntimeError("x"), 0.1)
  assert ctx.retries == 1 and ctx.facts is None
  ctx.facts = {}
  ctx.retrying(RuntimeError("x"), 0.2)
  assert ctx.retries == 2 and ctx.facts["retry_waits"][0][1:] == (0.2, "RuntimeError")


def test_no_trace_no_recording(tmp_path):
  assert tracing.recorder is None and not tracing.listening()
  llm = unique_binding("fake:echo", output_bytes=P)
  f = xcs_jax.jit(jax.vmap(llm))
  f(_prompts("a", "b"))
  assert not os.listdir(tmp_path)
  np.testing.assert_array_equal(np.asarray(f(_prompts("a", "b"))),
                                np.asarray(_prompts("a", "b")))
