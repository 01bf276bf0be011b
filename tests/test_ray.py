"""Host calls on a real (local, 2-node) Ray cluster: `xcs_jax.runtime(executor="ray")`.

The cluster is started once for the module with `ray.cluster_utils.Cluster`
(a head node and a second node, one CPU each) and shut down after.
"""
from __future__ import annotations

import contextvars
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xcs_jax
from xcs_jax import models, text

pytestmark = pytest.mark.ray
ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")


@pytest.fixture(scope="module")
def cluster():
  c = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
  c.add_node(num_cpus=1)
  c.wait_for_nodes()
  ray.init(address=c.address, log_to_driver=False)
  try:
    yield c
  finally:
    ray.shutdown()
    c.shutdown()


@pytest.fixture
def rt(cluster):
  with xcs_jax.runtime(name="on-ray", executor="ray", cache=False) as r:
    yield r


def prompts(n, tag=""):
  return jnp.asarray(text.encode([f"{tag}{i}" for i in range(n)], 16))


def test_model_calls_run_on_every_node_with_the_local_values(rt):
  b = models.bind("fake:upper", output_bytes=16, latency_s=0.05)
  out = xcs_jax.jit(jax.vmap(b))(prompts(64, "p"))
  assert text.decode(out) == [f"P{i}" for i in range(64)]
  nodes = rt.remote.actors()
  assert len(nodes) == 2 and all(alive for _, alive in nodes)
  assert len([n for n, k in rt.remote.sent.items() if k]) == 2   # both nodes served calls
  assert b.usage().calls == 64          # counted on the driver, in its runtime


def test_plain_jax_jit_and_score_and_embed_run_remotely_too(rt):
  b = models.bind("fake:echo", output_bytes=16)
  with xcs_jax.runtime(cache=False):
    want = (b.score_options(prompts(4, "good "), ("good", "bad")), b.embed(prompts(4)))
  got = (jax.jit(lambda p: b.score_options(p, ("good", "bad")))(prompts(4, "good ")),
         jax.jit(b.embed)(prompts(4)))
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)


def test_host_functions_are_shipped_and_errors_name_the_users_line(rt):
  offset = 7.0

  @xcs_jax.host_op(out_spec=jax.ShapeDtypeStruct((), jnp.float32))
  def shifted(x):
    if float(x) < 0:
      raise ValueError("negative input")
    return np.float32(x + offset)

  out = xcs_jax.jit(jax.vmap(shifted))(jnp.arange(8.0))
  np.testing.assert_array_equal(out, np.arange(8.0) + offset)
  with pytest.raises(xcs_jax.XCSExecutionError) as e:
    xcs_jax.jit(jax.vmap(shifted))(jnp.asarray([1.0, -1.0]))
  assert "negative input" in str(e.value) and "test_ray.py" in e.value.source
  assert isinstance(e.value.__cause__, ValueError)


def test_limits_hold_on_the_driver_for_the_whole_cluster(rt):
  b = models.bind("fake:echo", output_bytes=16, latency_s=0.2, concurrency=4)
  start = time.monotonic()
  xcs_jax.jit(jax.vmap(b))(prompts(8, "l"))
  assert time.monotonic() - start >= 0.38       # 8 calls, 4 at a time: 2 waves


@pytest.mark.local_model
def test_the_local_model_runs_as_one_replica_per_node_with_the_local_answers(rt):
  pytest.importorskip("llama_cpp")
  qs = jnp.asarray(text.encode(["What is the capital of France?",
                                "Name a primary colour.", "What is 2 + 2?",
                                "Name a large animal."], 48))
  m = models.bind("local:smollm2", max_tokens=8, output_bytes=128, cache=None,
                  system_prompt="Answer in a few words.")
  remote = text.decode(xcs_jax.jit(jax.vmap(m))(qs))
  with xcs_jax.runtime(cache=False):
    here = text.decode(xcs_jax.jit(jax.vmap(m))(qs))
  assert remote == here and all(a.strip() for a in remote)
  served = [n for n, k in rt.remote.sent.items() if k]
  assert len(served) == 2                 # the model ran on both nodes


def test_a_meshs_router_stays_on_the_driver_and_its_replicas_run_on_the_actors(rt):
  a = models.bind("fake:upper", output_bytes=16, latency_s=0.02)
  m = models.mesh([a, a.replace(concurrency=7)], strategy="round_robin")
  before = sum(rt.remote.sent.values())
  out = xcs_jax.jit(jax.vmap(m))(prompts(8, "m"))
  assert text.decode(out) == [f"M{i}" for i in range(8)]
  assert [s.calls for s in m.stats()] == [4, 4] and m.usage().calls == 8
  assert sum(rt.remote.sent.values()) - before == 8     # one request per attempt


def test_nothing_imports_ray_unless_a_ray_runtime_is_made():
  code = ("import sys, xcs_jax, jax; from xcs_jax import models, text\n"
          "b = models.bind('fake:echo', output_bytes=8)\n"
          "xcs_jax.jit(jax.vmap(b))(text.encode(['a'], 8))\n"
          "print('ray' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "False"


def test_a_node_that_dies_mid_batch_loses_and_duplicates_nothing(cluster):
  extra = cluster.add_node(num_cpus=1)
  cluster.wait_for_nodes()
  with xcs_jax.runtime(name="on-ray-faults", executor="ray", cache=False) as rt:
    b = models.bind("fake:echo", output_bytes=16, latency_s=4.0)
    f = xcs_jax.jit(jax.vmap(b))
    f(prompts(6, "warm"))                  # actors started on all 3 nodes, plan compiled
    assert len(rt.remote.actors()) == 3
    n = 48
    result = {}

    def run():
      result["out"] = text.decode(f(prompts(n, "f")))
    t = threading.Thread(target=contextvars.copy_context().run, args=(run,))  # `rt` current
    t.start()
    # Wait until the batch is in flight on every node (each call takes 4 s).
    until = time.monotonic() + 30
    while sum(rt.remote.sent.values()) < 6 + n and time.monotonic() < until:
      time.sleep(0.05)
    time.sleep(0.5)
    cluster.remove_node(extra, allow_graceful=False)   # kill its raylet and workers
    t.join(60)
    assert result["out"] == [f"f{i}" for i in range(n)]   # 0 lost, 0 duplicated
    assert rt.remote.resent > 0, (rt.remote.sent, rt.remote.actors())
    assert any(not alive for _, alive in rt.remote.actors())
