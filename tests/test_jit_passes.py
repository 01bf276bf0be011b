"""The `xcs_jax.jit` passes, each as a plain function over jaxprs.

trace (jax.make_jaxpr) -> expose -> classify -> partition -> analyze -> plan.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import xcs_jax
from xcs_jax import models, text
from xcs_jax._src.jit.analyze import STRATEGIES, analyze
from xcs_jax._src.jit.classify import Kind, classify
from xcs_jax._src.jit.expose import contains_host_call, expose_calls
from xcs_jax._src.jit.explain import render_plan
from xcs_jax._src.jit.partition import live_eqns, partition_segments
from xcs_jax._src.jit.plan import build_plan
from xcs_jax._src.primitives import HOST_PRIMITIVES

from jit_helpers import F32, Recorder

h = xcs_jax.host_op(lambda x: np.float32(x + 1), out_spec=F32, name="h")
g = xcs_jax.host_op(lambda x: np.float32(2 * x), out_spec=F32, name="g")
echo = models.bind("fake:echo", output_bytes=16)
W = jnp.arange(16.0).reshape(4, 4) / 16


def names(program):
  return [e.name for e in program.eqns]


def host_eqns(program):
  return [e for e in program.eqns if e.primitive in HOST_PRIMITIVES]


def graph_of(f, *args):
  return partition_segments(expose_calls(jax.make_jaxpr(f)(*args)))


def encoder_llm_decoder(x):
  """A hybrid pipeline: encoder (tensor) -> llm -> decoder (tensor)."""
  code = jnp.argmax(jnp.tanh(x @ W))                    # encoder
  prompt = jnp.asarray(text.encode("class ?", 16)).at[6].set((48 + code).astype(jnp.uint8))
  answer = echo(prompt)                                 # llm
  return jnp.sum(answer.astype(jnp.float32) * x[0])     # decoder


def three_independent_calls(x):
  return h(x) + g(x) + h(2.0 * x)


def chain_of_calls(x):
  return h(g(h(x)))


# --- expose -----------------------------------------------------------------------

def test_expose_inlines_nested_jit_holding_a_host_call():
  def f(x):
    return jax.jit(lambda y: h(y) * 3.0)(x) + jax.jit(jnp.sin)(x)

  closed = jax.make_jaxpr(f)(1.0)
  assert [e.primitive.name for e in closed.jaxpr.eqns].count("jit") == 2
  prog = expose_calls(closed)
  # The jit holding `h` is gone (its body inlined); the pure one stays whole.
  assert names(prog).count("jit") == 1
  assert len(host_eqns(prog)) == 1 and "mul" in names(prog)


def test_expose_inlines_custom_jvp_custom_vjp_and_checkpoint_bodies():
  @jax.custom_jvp
  def cj(x):
    return h(x) + 1.0
  cj.defjvp(lambda p, t: (cj(p[0]), t[0]))

  @jax.custom_jvp
  def cj_pure(x):
    return jnp.sin(x)
  cj_pure.defjvp(lambda p, t: (cj_pure(p[0]), t[0]))

  @jax.custom_vjp
  def cv(x):
    return g(x) * 2.0
  cv.defvjp(lambda x: (cv(x), None), lambda r, ct: (ct,))

  @jax.custom_vjp
  def cv_pure(x):
    return jnp.cos(x)
  cv_pure.defvjp(lambda x: (cv_pure(x), None), lambda r, ct: (ct,))

  def f(x):
    return (cj(x) + cj_pure(x) + cv(x) + cv_pure(x)
            + jax.checkpoint(lambda y: h(y) * 5.0)(x) + jax.checkpoint(jnp.tanh)(x))

  prog = expose_calls(jax.make_jaxpr(f)(1.0))
  assert len(host_eqns(prog)) == 3
  # The wrappers without host calls stay whole: one eqn each.
  wrappers = [n for n in names(prog)
              if n.startswith(("custom_jvp", "custom_vjp", "remat", "checkpoint"))]
  assert len(wrappers) == 3
  # Values are unchanged by inlining.
  run = xcs_jax.jit(f)
  np.testing.assert_allclose(run(0.5), jax.jit(f)(0.5), rtol=1e-6)


def test_expose_inlines_nested_levels_and_repeated_helpers():
  @jax.jit
  def helper(y):
    return jax.jit(h)(y) * 2.0

  def f(x):
    return helper(x) + helper(x + 1.0)

  prog = expose_calls(jax.make_jaxpr(f)(1.0))
  assert "jit" not in names(prog) and "pjit" not in names(prog)
  hosts = host_eqns(prog)
  assert len(hosts) == 2
  # Each inlined copy has its own refs.
  assert set(hosts[0].outs).isdisjoint(hosts[1].outs)


def test_expose_keeps_control_flow_as_one_eqn():
  def f(p, x):
    return lax.cond(p > 0, h, g, x)

  prog = expose_calls(jax.make_jaxpr(f)(1.0, 2.0))
  assert "cond" in names(prog) and not host_eqns(prog)
  assert contains_host_call(jax.make_jaxpr(f)(1.0, 2.0))
  assert not contains_host_call(jax.make_jaxpr(jnp.sin)(1.0))


def test_expose_keeps_invars_outvars_and_consts():
  c = jnp.array([1.0, 2.0, 3.0])

  def f(x, y):
    return h(x) * c, y

  prog = expose_calls(jax.make_jaxpr(f)(1.0, jnp.int32(2)))
  assert len(prog.invars) == 2 and len(prog.outvars) == 2
  assert prog.outvars[1] == prog.invars[1]  # passed through untouched
  assert any(np.array_equal(v, c) for v in prog.consts.values())


# --- classify ---------------------------------------------------------------------

def test_classify_by_primitive_type_not_by_name():
  def f(p, x):
    a = h(x)                                    # HOST
    b = lax.cond(p > 0, g, jnp.sin, a)          # CONTROL: a branch calls g
    c = lax.cond(p > 0, jnp.cos, jnp.sin, b)    # TENSOR: no host call inside
    return jnp.tanh(c)                          # TENSOR

  prog = expose_calls(jax.make_jaxpr(f)(1.0, 2.0))
  kinds = {e.name: classify(e) for e in prog.eqns if e.name != "cond"}
  conds = [classify(e) for e in prog.eqns if e.name == "cond"]
  assert kinds["xcs_host_op"] is Kind.HOST and kinds["tanh"] is Kind.TENSOR
  assert conds == [Kind.CONTROL, Kind.TENSOR]


def test_classify_model_calls_and_scan_while():
  def f(p, xs):
    a = echo(p)
    s = lax.scan(lambda c, x: (c + h(x), None), 0.0, xs)[0]
    w = lax.while_loop(lambda c: c < 3.0, lambda c: c + 1.0, 0.0)
    return a, s, w

  prog = expose_calls(jax.make_jaxpr(f)(text.encode("x", 16), jnp.ones(3)))
  by_name = {e.name: classify(e) for e in prog.eqns}
  assert by_name["xcs_generate"] is Kind.HOST
  assert by_name["scan"] is Kind.CONTROL
  assert by_name["while"] is Kind.TENSOR  # no host call in it


# --- partition --------------------------------------------------------------------

def test_partition_encoder_llm_decoder():
  x = jnp.linspace(-1.0, 1.0, 4)
  graph = graph_of(encoder_llm_decoder, x)
  assert [n.kind for n in graph.nodes] == [Kind.TENSOR, Kind.HOST, Kind.TENSOR]
  encoder, llm, decoder = graph.nodes
  assert llm.deps == {encoder.index}
  assert decoder.deps == {llm.index} or decoder.deps == {llm.index, encoder.index}
  assert "dot_general" in [e.name for e in encoder.eqns]
  assert "convert_element_type" in [e.name for e in decoder.eqns]


def _assert_acyclic_and_ordered(graph):
  position = {n.index: i for i, n in enumerate(graph.nodes)}
  for n in graph.nodes:
    assert all(position[d] < position[n.index] for d in n.deps)


@pytest.mark.parametrize("f, args", [
    (encoder_llm_decoder, (jnp.linspace(-1.0, 1.0, 4),)),
    (three_independent_calls, (1.0,)),
    (chain_of_calls, (1.0,)),
])
def test_partition_is_acyclic_and_topologically_ordered(f, args):
  graph = graph_of(f, *args)
  _assert_acyclic_and_ordered(graph)
  _assert_no_node_waits_on_work_it_does_not_need(graph)


def _host_ancestors(graph, node_index, memo=None):
  """The orchestration nodes a node transitively waits for."""
  memo = {} if memo is None else memo
  if node_index not in memo:
    nodes = {n.index: n for n in graph.nodes}
    out = set()
    for d in nodes[node_index].deps:
      if nodes[d].kind is not Kind.TENSOR:
        out.add(d)
      out |= _host_ancestors(graph, d, memo)
    memo[node_index] = out
  return memo[node_index]


def _assert_no_node_waits_on_work_it_does_not_need(graph):
  """A segment read by a node waits for no call that node does not wait for."""
  nodes = {n.index: n for n in graph.nodes}
  for n in graph.orchestration_nodes():
    for d in n.deps:
      if nodes[d].kind is Kind.TENSOR:
        assert _host_ancestors(graph, d) <= _host_ancestors(graph, n.index)


def test_partition_defers_cheap_output_work_to_one_epilogue():
  """Cheap tensor work that only feeds the outputs runs once, in one segment,
  however many calls it combines."""
  def f(x):
    a, b = h(x), g(x)
    left = jnp.sin(a) * 2.0       # depends on h only
    right = jnp.cos(b) * 3.0      # depends on g only
    pre1, pre2 = x * 2.0, x + 1.0  # depends on no call
    return left + right + pre1 + pre2

  graph = graph_of(f, 1.0)
  tensor = graph.tensor_nodes()
  host = {n.eqn.params["op"].name: n.index for n in graph.orchestration_nodes()}
  assert len(tensor) == 1
  (epilogue,) = tensor
  assert {"sin", "cos", "mul", "add"} <= {e.name for e in epilogue.eqns}
  assert epilogue.deps == {host["h"], host["g"]}
  _assert_acyclic_and_ordered(graph)


def test_partition_runs_expensive_work_as_soon_as_its_inputs_are_ready():
  """A heavy matmul on one call's output does not wait for the other call."""
  big = jnp.ones((512, 512), jnp.float32)
  vec = xcs_jax.host_op(lambda x: np.full((512,), x, np.float32),
                        out_spec=jax.ShapeDtypeStruct((512,), jnp.float32), name="vec")

  def f(x):
    heavy = jnp.tanh(big @ (big @ vec(x)))   # 2 x 262k multiply-adds: expensive
    return heavy.sum() + g(x)

  graph = graph_of(f, 1.0)
  host = {n.eqn.params["op"].name: n.index for n in graph.orchestration_nodes()}
  heavy = next(n for n in graph.tensor_nodes() if "dot_general" in {e.name for e in n.eqns})
  assert heavy.deps == {host["vec"]}       # not g's
  _assert_no_node_waits_on_work_it_does_not_need(graph)


def test_partition_keeps_prologue_work_before_the_calls_that_read_it():
  def f(x):
    p1, p2 = x * 2.0, x + 1.0
    a = h(p1)
    return g(a * p2)    # a * p2 runs after h: it needs a; p2 is read by it

  graph = graph_of(f, 1.0)
  host = {n.eqn.params["op"].name: n.index for n in graph.orchestration_nodes()}
  first = [n for n in graph.tensor_nodes() if not n.deps]
  assert len(first) == 1 and {"mul"} <= {e.name for e in first[0].eqns}
  _assert_no_node_waits_on_work_it_does_not_need(graph)
  assert host["h"] in _host_ancestors(graph, host["g"])


def test_partition_of_a_python_sum_of_call_sites_is_a_prologue_and_an_epilogue():
  def f(x):
    return sum(h(x + i) for i in range(40))

  graph = graph_of(f, 1.0)
  assert len(graph.orchestration_nodes()) == 40
  assert len(graph.tensor_nodes()) == 2
  plan = build_plan(jax.make_jaxpr(f)(1.0))
  kinds = sorted(s.kind.value for s in plan.steps.values())
  assert kinds == ["host", "tensor", "tensor"]   # one batched call between them
  names = {e.name for e in plan.program.eqns}
  assert "xcs_fold" in names and "xcs_vmap" in names
  np.testing.assert_array_equal(xcs_jax.jit(f)(1.0), jax.jit(f)(1.0))


# --- analyze ----------------------------------------------------------------------

def test_analyze_three_independent_calls():
  a = analyze(graph_of(three_independent_calls, 1.0))
  assert len(a.parallel_groups) >= 1 and len(a.parallel_groups[0]) == 3
  assert a.max_parallelism == 3
  assert len(a.critical_path) == 1
  assert a.estimated_speedup > 1.5
  assert a.orchestration_ops == 3


def test_analyze_chain_is_sequential():
  a = analyze(graph_of(chain_of_calls, 1.0))
  assert a.parallel_groups == () and a.max_parallelism == 1
  assert len(a.critical_path) == 3 and a.estimated_speedup == 1.0
  assert a.execution_strategy == "sequential"


def test_analyze_critical_path_follows_the_longest_chain():
  def f(x):
    long = h(g(h(x)))   # three calls
    short = g(x)        # one call
    return long + short

  graph = graph_of(f, 1.0)
  a = analyze(graph)
  assert len(a.critical_path) == 3
  ops = {n.index: n.eqns[0].params["op"].name for n in graph.orchestration_nodes()}
  assert [ops[i] for i in a.critical_path] == ["h", "g", "h"]
  assert a.estimated_speedup == pytest.approx(4 / 3)
  assert a.levels[a.critical_path[0]] == 0 and a.levels[a.critical_path[-1]] == 2


@pytest.mark.parametrize("f, args, strategy", [
    (lambda x: jnp.sin(x) @ W, (jnp.ones(4),), "tensor"),
    (chain_of_calls, (1.0,), "sequential"),
    (lambda x: jnp.stack([h(x), g(x)]), (1.0,), "parallel"),
    (encoder_llm_decoder, (jnp.linspace(-1.0, 1.0, 4),), "hybrid"),
])
def test_analyze_strategies(f, args, strategy):
  a = analyze(graph_of(f, *args))
  assert a.execution_strategy == strategy and strategy in STRATEGIES


def test_analyze_hybrid_pipeline_counts():
  a = analyze(graph_of(encoder_llm_decoder, jnp.linspace(-1.0, 1.0, 4)))
  assert (a.execution_strategy, a.tensor_ops, a.orchestration_ops) == ("hybrid", 2, 1)


def test_analyze_control_node_counts_as_one_call():
  def f(xs):
    return lax.scan(lambda c, x: (c + h(x) + g(x), None), 0.0, xs)[0] + h(1.0)

  a = analyze(graph_of(f, jnp.ones(3)))
  assert a.orchestration_ops == 2 and a.max_parallelism == 2


# --- plan -------------------------------------------------------------------------

def test_plan_of_tensor_only_function_is_one_executable():
  plan = build_plan(jax.make_jaxpr(lambda x: jnp.sin(x) @ W)(jnp.ones(4)))
  assert plan.whole is not None
  assert plan.analysis.execution_strategy == "tensor"


def test_plan_compiles_each_tensor_segment_once():
  plan = build_plan(jax.make_jaxpr(encoder_llm_decoder)(jnp.ones(4)))
  assert plan.whole is None
  tensor_steps = [s for s in plan.steps.values() if s.kind is Kind.TENSOR]
  host_steps = [s for s in plan.steps.values() if s.kind is Kind.HOST]
  assert len(tensor_steps) == 2 and len(host_steps) == 1
  # Segments are jitted callables built once, held by the plan.
  assert all(hasattr(s.run, "lower") for s in tensor_steps)
  # Dependents mirror deps.
  for s in plan.steps.values():
    for d in s.deps:
      assert s.index in plan.steps[d].dependents


def test_render_plan_text():
  plan = build_plan(jax.make_jaxpr(three_independent_calls)(1.0))
  out = render_plan(plan, title="t")
  assert out.startswith("t: strategy 'hybrid', 2 tensor segment(s), 3 orchestration")
  assert "host_op h" in out and "host_op g" in out and __file__ in out
  assert "parallel groups (run together):" in out and "critical path (1 call(s))" in out
