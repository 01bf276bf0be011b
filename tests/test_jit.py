"""`xcs_jax.jit`: the API, the plan cache, concurrency, composition, fallback, stats."""
import functools
import threading
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import xcs_jax
from xcs_jax import models, text

from conftest import unique_binding
from jit_helpers import F32, Recorder, TraceCounter

W = jnp.arange(16.0).reshape(4, 4) / 16


def pure(x):
  return jnp.sin(x) @ W + 1.0


# --- the wrapper --------------------------------------------------------------------

def test_bare_decorator_and_decorator_with_arguments():
  rec = Recorder()
  h = rec.op("h")

  @xcs_jax.jit
  def bare(x):
    return h(x) * 2.0

  @xcs_jax.jit(max_concurrency=4)
  def with_args(x):
    return h(x) * 2.0

  called = xcs_jax.jit(lambda x: h(x) * 2.0, static_argnums=())
  for f in (bare, with_args, called):
    assert isinstance(f, xcs_jax.JitFunction)
    assert float(f(1.0)) == 4.0
  assert bare.__name__ == "bare" and "bare" in repr(bare)


def test_bad_arguments_raise_clear_errors():
  with pytest.raises(TypeError, match="callable"):
    xcs_jax.jit(3)
  with pytest.raises(ValueError, match="max_concurrency"):
    xcs_jax.jit(pure, max_concurrency=0)
  with pytest.raises(TypeError, match="xcs_jax.jit"):
    xcs_jax.get_jit_stats(pure)


def test_tensor_only_function_is_one_executable_with_jax_jit_values():
  f = xcs_jax.jit(pure)
  x = jnp.linspace(-1.0, 1.0, 4)
  chex.assert_trees_all_close(f(x), jax.jit(pure)(x))
  assert f.trace(x).whole is not None
  stats = xcs_jax.get_jit_stats(f)
  assert stats["execution_strategy"] == "tensor"
  assert stats["tensor_ops"] == 1 and stats["orchestration_ops"] == 0


def test_pytree_arguments_and_outputs():
  rec = Recorder()
  h = rec.op("h")

  @xcs_jax.jit
  def f(inputs, *, scale):
    return {"a": h(inputs["a"]) * scale, "pair": (inputs["b"] + 1, h(inputs["a"] + 1.0))}

  args = ({"a": jnp.float32(1.0), "b": jnp.arange(3)},)
  want = jax.jit(f.fun)(*args, scale=2.0)
  chex.assert_trees_all_close(f(*args, scale=2.0), want)


def test_host_call_with_an_unused_first_output():
  # Regression: a host call's outputs were matched to the outputs other nodes
  # read, so with the first one unused the second got the first's value.
  two = xcs_jax.host_op(lambda x: (np.float32(x + 1), np.float32(x + 100)),
                        out_spec=(F32, F32), name="two")

  def f(x):
    return two(x)[1] * 2.0, jnp.sin(x)

  chex.assert_trees_all_close(xcs_jax.jit(f)(1.0), jax.jit(f)(1.0))


# --- concurrency, checked by construction -----------------------------------------

def test_independent_calls_run_concurrently():
  rec = Recorder(parties=3)  # every call waits until 3 are in flight
  a, b, c = rec.op("a"), rec.op("b"), rec.op("c")

  @xcs_jax.jit
  def f(x):
    return a(x) + b(x * 2.0) + c(x * 3.0)

  assert float(f(1.0)) == 2.0 + 3.0 + 4.0
  assert rec.peak == 3 and rec.now == 0


def test_a_slow_call_does_not_hold_back_an_unrelated_branch():
  """Branch A: fast call -> tensor op -> fast call. Branch B: one slow call
  that only ends once A's second call has started: a level-by-level
  scheduler would make B time out (and the test fail) before starting it."""
  rec = Recorder()
  a2_started = threading.Event()
  a1 = rec.op("a1")
  a2 = rec.op("a2", fn=lambda x: (a2_started.set(), x + 1.0)[1])
  b = rec.op("b", wait_for=a2_started, fn=lambda x: 100.0 if a2_started.is_set() else -1.0)

  @xcs_jax.jit
  def f(x):
    a = a2(jnp.tanh(a1(x)) * 2.0)
    return a, b(x)

  a, bb = f(0.0)
  assert float(bb) == 100.0, "branch B ended before A's second call started"
  assert float(a) == pytest.approx(np.tanh(1.0) * 2.0 + 1.0)
  assert rec.times("a2", "start")[0] < rec.times("b", "end")[0]


def test_a_node_starts_only_after_its_inputs():
  rec = Recorder()
  first, second = rec.op("first", 0.02), rec.op("second")

  @xcs_jax.jit
  def f(x):
    return second(jnp.sin(first(x)))

  np.testing.assert_allclose(f(0.5), np.sin(1.5) + 1.0, rtol=1e-6)
  assert rec.times("first", "end")[0] <= rec.times("second", "start")[0]
  assert rec.peak == 1


def test_model_calls_at_separate_call_sites_run_concurrently(fake_inflight):
  rec = fake_inflight(parties=4)
  echo = unique_binding("fake:echo", output_bytes=16)
  upper = unique_binding("fake:upper", output_bytes=16)

  @xcs_jax.jit
  def f(p, q):
    return jnp.stack([echo(p), upper(p), echo(q), upper(q)])

  out = f(text.encode("ab", 16), text.encode("cd", 16))
  assert text.decode(out) == ["ab", "AB", "cd", "CD"]
  assert rec.peak == 4


def test_max_concurrency_bounds_calls_in_flight():
  rec = Recorder()
  ops = [rec.op(f"c{i}", 0.03) for i in range(6)]

  def f(x):
    return sum(op(x + i) for i, op in enumerate(ops))

  want = sum(x + 1.0 for x in np.arange(6.0))
  assert float(xcs_jax.jit(f, max_concurrency=2)(0.0)) == want
  assert rec.peak == 2
  rec.peak = 0
  assert float(xcs_jax.jit(f, max_concurrency=1)(0.0)) == want
  assert rec.peak == 1


def test_max_concurrency_bounds_calls_inside_control_flow():
  rec = Recorder()
  ops = [rec.op(f"s{i}", 0.05) for i in range(3)]

  def f(xs):
    def body(c, x):
      return c + ops[0](x) + ops[1](x) + ops[2](x), None
    return lax.scan(body, 0.0, xs)[0] + lax.scan(body, 1.0, 2.0 * xs)[0]

  xs = jnp.arange(2.0)
  assert float(xcs_jax.jit(f, max_concurrency=2)(xs)) == float(jax.jit(f)(xs))
  assert rec.peak <= 2


# --- stats and explain -------------------------------------------------------------

STATS_KEYS = {"status", "cache_hits", "cache_misses", "cache_entries", "parallel_groups",
              "max_parallelism", "critical_path", "estimated_speedup",
              "execution_strategy", "tensor_ops", "orchestration_ops", "last_wall_s",
              "last_model_call_s"}


def test_stats_of_a_cold_function():
  stats = xcs_jax.get_jit_stats(xcs_jax.jit(pure))
  assert STATS_KEYS <= set(stats)
  assert stats["status"] == "cold"
  assert stats["cache_hits"] == stats["cache_misses"] == stats["cache_entries"] == 0
  assert stats["last_wall_s"] is None


def test_stats_of_three_independent_calls():
  rec = Recorder(parties=3)
  latency = 0.02
  a, b, c = rec.op("a", latency), rec.op("b", latency), rec.op("c", latency)
  f = xcs_jax.jit(lambda x: jnp.stack([a(x), b(x), c(x)]))
  f(1.0)
  stats = xcs_jax.get_jit_stats(f)
  assert STATS_KEYS <= set(stats)
  assert stats["status"] == "compiled"
  assert stats["parallel_groups"] >= 1 and stats["estimated_speedup"] > 1.5
  assert stats["max_parallelism"] == 3 and stats["critical_path"] == 1
  assert stats["orchestration_ops"] == 3
  assert stats["last_wall_s"] > 0
  assert stats["last_model_call_s"] >= 3 * latency  # summed over the calls


def test_stats_of_the_hybrid_pipeline():
  llm = models.bind("fake:upper", output_bytes=16)

  def pipeline(x):
    code = jnp.argmax(jnp.tanh(x @ W))                               # encoder
    prompt = jnp.asarray(text.encode("x", 16)).at[0].set((97 + code).astype(jnp.uint8))
    answer = llm(prompt)                                             # llm
    return jnp.sum(answer.astype(jnp.float32)) * x[0]                # decoder

  f = xcs_jax.jit(pipeline)
  x = jnp.array([0.1, 0.9, 0.2, 0.3])
  np.testing.assert_allclose(f(x), jax.jit(pipeline)(x), rtol=1e-6)
  stats = xcs_jax.get_jit_stats(f)
  assert stats["execution_strategy"] == "hybrid"
  assert stats["tensor_ops"] == 2 and stats["orchestration_ops"] == 1
  assert stats["critical_path"] == 1 and stats["parallel_groups"] == 0


def test_explain_names_segments_bindings_lines_groups_and_critical_path():
  echo = models.bind("fake:echo", output_bytes=16)
  upper = models.bind("fake:upper", output_bytes=16)

  def f(p):
    return jnp.stack([echo(p), upper(p)]), echo(upper(p))

  line = f.__code__.co_firstlineno + 1
  p = text.encode("hi", 16)
  for target in (f, xcs_jax.jit(f)):
    out = xcs_jax.explain(target, p)
    assert "tensor segment" in out
    assert str(echo) in out and str(upper) in out
    assert f"{__file__}:{line}" in out
    assert "parallel groups (run together):" in out
    assert "critical path (2 call(s))" in out


# --- the plan cache ------------------------------------------------------------------

def test_same_shapes_new_values_never_retrace():
  rec = Recorder()
  h = rec.op("h")
  traced = TraceCounter(lambda x, y: h(x) + jnp.sum(y))
  f = xcs_jax.jit(traced)
  for i in range(5):
    assert float(f(float(i), jnp.full(3, float(i)))) == i + 1 + 3 * i
  assert traced.count == 1
  stats = xcs_jax.get_jit_stats(f)
  assert (stats["cache_misses"], stats["cache_hits"], stats["cache_entries"]) == (1, 4, 1)


@pytest.mark.parametrize("first, second", [
    ((jnp.ones(3),), (jnp.ones(4),)),                                    # shape
    ((jnp.ones(3, jnp.float32),), (jnp.ones(3, jnp.int32),)),            # dtype
    ((jnp.asarray(1.0),), (jnp.array(1.0, jnp.float32),)),               # weak type
    ((1.0,), (1,)),                                                      # Python type
    (({"a": jnp.ones(3)},), ({"b": jnp.ones(3)},)),                      # pytree structure
    ((jnp.ones(3),), ((jnp.ones(3), jnp.ones(3)),)),                     # pytree structure
])
def test_new_signatures_retrace(first, second):
  h = Recorder().op("h")
  traced = TraceCounter(lambda x: (h(jnp.float32(1.0)),
                                   jax.tree_util.tree_map(lambda v: v * 2, x)))
  f = xcs_jax.jit(traced)
  f(*first)
  f(*first)
  assert traced.count == 1
  out = f(*second)
  assert traced.count == 2
  chex.assert_trees_all_close(out[1], jax.tree_util.tree_map(lambda v: v * 2, second[0]))
  stats = xcs_jax.get_jit_stats(f)
  assert (stats["cache_entries"], stats["cache_misses"], stats["cache_hits"]) == (2, 2, 1)


def test_tensor_only_function_never_retraces_for_new_values():
  traced = TraceCounter(pure)
  f = xcs_jax.jit(traced)
  f(jnp.ones(4))
  after_first = traced.count
  for i in range(4):
    x = jnp.ones(4) * i  # float32, not weakly typed, like jnp.ones(4)
    chex.assert_trees_all_close(f(x), jax.jit(pure)(x))
  assert traced.count == after_first
  f(jnp.ones(4, jnp.int32))
  assert traced.count == after_first + 1


def test_host_calls_after_a_tensor_only_signature_still_run_concurrently():
  rec = Recorder(parties=3, timeout_s=2.0)
  ops = [rec.op(f"c{i}") for i in range(3)]

  @functools.partial(xcs_jax.jit, static_argnums=1)
  def f(x, n):
    return x + sum(op(x) for op in ops[:n])

  assert float(f(1.0, 0)) == 1.0        # no host calls for n=0
  assert float(f(1.0, 3)) == 1.0 + 6.0  # three independent calls for n=3
  assert rec.peak == 3


def test_weak_type_is_kept_like_jax_jit():
  f = xcs_jax.jit(lambda x: x * 2)
  for x in (jnp.asarray(1.0), jnp.array(1.0, jnp.float32)):
    assert f(x).weak_type == jax.jit(lambda x: x * 2)(x).weak_type


def test_static_argnums_and_static_argnames():
  rec = Recorder()
  h = rec.op("h")
  traced = TraceCounter(lambda x, n, *, mode: h(x) * n if mode == "mul" else h(x) + n)
  f = xcs_jax.jit(traced, static_argnums=1, static_argnames="mode")
  assert float(f(1.0, 3, mode="mul")) == 6.0
  assert float(f(2.0, 3, mode="mul")) == 9.0
  assert traced.count == 1
  assert float(f(2.0, 4, mode="mul")) == 12.0    # new static value: retrace
  assert float(f(2.0, 4, mode="add")) == 7.0     # new static name value: retrace
  assert traced.count == 3
  g = xcs_jax.jit(traced, static_argnums=(-1,), static_argnames=("mode",))
  assert float(g(1.0, 3, mode="mul")) == 6.0 and float(g(5.0, 3, mode="mul")) == 18.0
  assert xcs_jax.get_jit_stats(g)["cache_misses"] == 1


def test_unhashable_static_argument_is_a_clear_error():
  f = xcs_jax.jit(lambda x, opts: x * len(opts), static_argnums=1)
  with pytest.raises(ValueError, match="hashable"):
    f(1.0, [1, 2])


def test_cache_is_a_bounded_lru():
  h = Recorder().op("h")
  traced = TraceCounter(lambda x: x + h(jnp.float32(1.0)))
  f = xcs_jax.jit(traced, cache_size=2)
  a, b, c = jnp.ones(1), jnp.ones(2), jnp.ones(3)
  f(a), f(b), f(a), f(c)      # c evicts b (a was used more recently)
  assert traced.count == 3
  assert xcs_jax.get_jit_stats(f)["cache_entries"] == 2
  f(a)
  assert traced.count == 3    # a is still cached
  f(b)
  assert traced.count == 4    # b was evicted


def test_decorated_methods():
  rec = Recorder()
  h = rec.op("h")

  class Scaled:  # hashable by value: `self` is a static argument
    def __init__(self, s):
      self.s = s

    def __hash__(self):
      return hash(self.s)

    def __eq__(self, other):
      return isinstance(other, Scaled) and other.s == self.s

    @xcs_jax.jit(static_argnums=0)
    def __call__(self, x):
      return h(x) * self.s

  assert float(Scaled(3.0)(1.0)) == 6.0
  assert float(Scaled(3.0)(2.0)) == 9.0
  assert float(Scaled(4.0)(2.0)) == 12.0
  assert xcs_jax.get_jit_stats(Scaled.__call__)["cache_misses"] == 2

  @jax.tree_util.register_pytree_node_class
  class Model:  # a pytree: `self`'s leaves are arguments
    def __init__(self, w):
      self.w = w

    def tree_flatten(self):
      return (self.w,), None

    @classmethod
    def tree_unflatten(cls, aux, leaves):
      return cls(*leaves)

    @xcs_jax.jit
    def apply(self, x):
      return h(x) + jnp.sum(self.w)

  assert float(Model(jnp.ones(2)).apply(1.0)) == 4.0
  assert float(Model(jnp.zeros(2)).apply(1.0)) == 2.0
  assert xcs_jax.get_jit_stats(Model.apply)["cache_misses"] == 1


def test_decorated_method_on_a_plain_class():
  class Plain:
    scale = 2.0

    @xcs_jax.jit
    def f(self, x):
      return x * self.scale

  assert float(Plain().f(1.0)) == 2.0


# --- composition with JAX transformations --------------------------------------------

def _hybrid(h, g):
  def f(x):
    return jnp.sin(x) * h(lax.stop_gradient(x)) + g(lax.stop_gradient(x) * 2.0) + x ** 2
  return f


def _plain():
  """`_hybrid` with ops that record nothing (for reference values)."""
  rec = Recorder()
  return _hybrid(rec.op("h"), rec.op("g"))


def test_jit_of_vmap_runs_every_call_site_and_item_at_once():
  n = 4
  rec = Recorder(parties=2 * n)  # 2 call sites x n items, all in flight together
  f = _hybrid(rec.op("h"), rec.op("g"))
  xs = jnp.linspace(-1.0, 1.0, n)
  np.testing.assert_allclose(xcs_jax.jit(jax.vmap(f))(xs), jax.jit(jax.vmap(_plain()))(xs),
                             rtol=1e-6)
  assert rec.peak == 2 * n


def test_jit_of_grad():
  rec = Recorder(parties=2)  # value_and_grad needs both calls: run together
  f = _hybrid(rec.op("h"), rec.op("g"))
  chex.assert_trees_all_close(xcs_jax.jit(jax.value_and_grad(f))(0.7),
                              jax.jit(jax.value_and_grad(_plain()))(0.7), rtol=1e-6)
  assert rec.peak == 2
  # grad alone does not need g's value: that call is dead code, never made.
  rec = Recorder()
  f = _hybrid(rec.op("h"), rec.op("g"))
  np.testing.assert_allclose(xcs_jax.jit(jax.grad(f))(0.7), jax.grad(_plain())(0.7),
                             rtol=1e-6)
  assert rec.names() == ["h"]


def test_vmap_of_jit():
  f = _hybrid(Recorder().op("h"), Recorder().op("g"))
  xs = jnp.linspace(-1.0, 1.0, 5)
  np.testing.assert_allclose(jax.vmap(xcs_jax.jit(f))(xs), jax.jit(jax.vmap(f))(xs),
                             rtol=1e-6)


def test_jax_jit_of_xcs_jit():
  f = _hybrid(Recorder().op("h"), Recorder().op("g"))
  np.testing.assert_allclose(jax.jit(xcs_jax.jit(f))(0.3), jax.jit(f)(0.3), rtol=1e-6)


def test_grad_of_jit():
  f = _hybrid(Recorder().op("h"), Recorder().op("g"))
  np.testing.assert_allclose(jax.grad(xcs_jax.jit(f))(0.7), jax.grad(f)(0.7), rtol=1e-6)


def test_grad_through_tensor_code_around_a_model_call():
  echo = models.bind("fake:echo", output_bytes=8)
  prompt = text.encode("grad me", 8)

  def loss(w):
    answer = echo(prompt).astype(jnp.float32) / 255.0
    return jnp.sum(jnp.tanh(w * answer))

  w = jnp.float32(0.5)
  np.testing.assert_allclose(jax.grad(xcs_jax.jit(loss))(w), jax.grad(loss)(w), rtol=1e-6)
  np.testing.assert_allclose(xcs_jax.jit(jax.grad(loss))(w), jax.grad(loss)(w), rtol=1e-6)


def test_xcs_jit_nested_in_itself_keeps_parallelism():
  rec = Recorder(parties=4)  # inner's 2 calls x 2 inner calls, all at once
  inner = xcs_jax.jit(_hybrid(rec.op("h"), rec.op("g")))

  @xcs_jax.jit
  def outer(x):
    return inner(x) * inner(x + 1.0)

  f = _hybrid(lambda x: x + 1.0, lambda x: x + 1.0)
  np.testing.assert_allclose(outer(0.2), f(0.2) * f(1.2), rtol=1e-6)
  assert rec.peak == 4
  assert xcs_jax.get_jit_stats(outer)["max_parallelism"] == 4
  assert xcs_jax.get_jit_stats(inner)["status"] == "cold"  # traced inline, no plan


# --- fallback ---------------------------------------------------------------------

def test_python_control_flow_on_a_model_answer_falls_back():
  judge = models.bind("fake:echo", output_bytes=8)

  def f(prompt, x):
    if text.decode(judge(prompt)) == "yes":  # Python control flow: untraceable
      return x + 1.0
    return x - 1.0

  jf = xcs_jax.jit(f)
  yes, no = text.encode("yes", 8), text.encode("no", 8)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert float(jf(yes, 1.0)) == 2.0
    assert float(jf(no, 1.0)) == 0.0
    assert float(jf(yes, jnp.ones(2))[0]) == 2.0  # a new signature: still no 2nd warning
  fallback = [w for w in caught if issubclass(w.category, RuntimeWarning)]
  assert len(fallback) == 1
  assert "could not trace f" in str(fallback[0].message)
  assert fallback[0].filename == __file__
  assert xcs_jax.get_jit_stats(jf)["status"] == "fallback"
  assert "falls back" in xcs_jax.explain(jf, yes, 1.0)


def test_fallback_after_a_tensor_only_signature():
  # A signature JAX cannot trace falls back even when earlier signatures took
  # the tensor-only fast path (regression: it raised TracerBoolConversionError).
  def f(x):
    if x.shape[0] > 2:
      return x * 2.0
    if x[0] > 0:  # Python control flow on a traced value
      return x + 1.0
    return x - 1.0

  jf = xcs_jax.jit(f)
  np.testing.assert_allclose(jf(jnp.ones(3)), [2.0, 2.0, 2.0])
  with pytest.warns(RuntimeWarning, match="could not trace f"):
    np.testing.assert_allclose(jf(jnp.ones(1)), [2.0])
  np.testing.assert_allclose(jf(-jnp.ones(1)), [-2.0])
  assert xcs_jax.get_jit_stats(jf)["status"] == "fallback"
  np.testing.assert_allclose(jf(jnp.ones(3) * 2), [4.0, 4.0, 4.0])


# --- thread safety ------------------------------------------------------------------

def test_sixteen_threads_at_once_get_what_serial_calls_get():
  rec = Recorder()
  a, b = rec.op("a", 0.01, fn=lambda x: x * 3.0), rec.op("b", 0.01, fn=lambda x: x - 1.0)
  echo = models.bind("fake:upper", output_bytes=8)
  traced = TraceCounter(lambda x, p: (jnp.tanh(a(x)) + b(jnp.cos(x)), echo(p)))
  f = xcs_jax.jit(traced)
  args = [(jnp.float32(i / 16), text.encode(f"t{i}", 8)) for i in range(16)]

  start = threading.Barrier(16)
  results = [None] * 16

  def worker(i):
    start.wait()
    results[i] = f(*args[i])

  threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert traced.count == 1  # one plan, built once, though 16 threads asked at once
  serial = [f(*a) for a in args]
  for got, want in zip(results, serial):
    chex.assert_trees_all_close(got, want)
  assert text.decode(results[5][1]) == "T5"
  stats = xcs_jax.get_jit_stats(f)
  assert stats["cache_misses"] == 1 and stats["cache_hits"] == 31
