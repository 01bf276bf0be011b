"""ModelMesh: routing, weights, health, failover, hedging, cache keys, stats.

The fast tests use the `fake` provider and `meshtest`, a test double whose
replicas are "endpoints" (a `base_url` each, so each has its own concurrency
limit) that a test can slow down or take down while they run. The tests at
the end (marker `server`) put real `llama_cpp.server` processes behind a mesh.
"""
from __future__ import annotations

import collections
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xcs_jax
from xcs_jax import extend, models, text

from conftest import InFlight, busy_xcs_threads, unique_binding, wait_until


def prompts(n, tag="p", width=16):
  return jnp.asarray(text.encode([f"{tag}{i}" for i in range(n)], width))


def calls(m):
  return [s.calls for s in m.stats()]


class _Endpoints(extend.Provider):
  """Replicas on pretend endpoints: `down` endpoints refuse connections,
  `slow` ones take that long; every call is recorded per endpoint."""

  name = "meshtest"
  default_concurrency = 8
  params = {"base_url": None, "latency_s": 0.0, "embedding_dim": None}
  non_answer_params = frozenset({"latency_s"})

  def __init__(self):
    self.down: set = set()
    self.slow: dict = {}
    self.sent = collections.Counter()
    self.cancelled = collections.Counter()
    self.in_flight = collections.defaultdict(InFlight)

  def _latency(self, binding):
    return self.slow.get(binding.get("base_url"), binding.get("latency_s"))

  def _answer(self, binding, prompt):
    url = binding.get("base_url")
    self.sent[url] += 1
    if url in self.down:
      raise ConnectionRefusedError(f"{url} refused the connection")
    return extend.Completion(prompt.upper())

  async def generate(self, binding, prompt, seed, ctx):
    async with self.in_flight[binding.get("base_url")].atrack():
      try:
        await ctx.asleep(self._latency(binding))
      except BaseException:
        self.cancelled[binding.get("base_url")] += 1
        raise
      return self._answer(binding, prompt)

  async def embed(self, binding, text_, ctx):
    return np.ones(self.embedding_dim(binding))

  def embedding_dim(self, binding):
    if binding.get("embedding_dim") is None:
      raise NotImplementedError("this endpoint cannot embed")
    return binding.get("embedding_dim")


class _SyncEndpoints(_Endpoints):
  """`meshtest` whose calls are plain functions (they run on workers)."""

  name = "meshtest_sync"

  def generate(self, binding, prompt, seed, ctx):
    with self.in_flight[binding.get("base_url")].track():
      try:
        ctx.sleep(self._latency(binding))
      except BaseException:
        self.cancelled[binding.get("base_url")] += 1
        raise
      return self._answer(binding, prompt)


extend.register_provider("meshtest", _Endpoints)
extend.register_provider("meshtest_sync", _SyncEndpoints)


def endpoints(n, provider="meshtest", **params):
  params.setdefault("output_bytes", 16)
  return [models.bind(f"{provider}:m", base_url=f"http://replica-{i}", **params)
          for i in range(n)]


class ManualClock(extend.Clock):
  """Real sleeps; `now()` (cool-downs) moves only when the test moves it."""

  def __init__(self):
    self.t = 0.0

  def now(self):
    return self.t


class RecordingClock(extend.Clock):
  """The real clock, recording every sleep (backoff between attempts)."""

  def __init__(self):
    self.sleeps = []

  def wait(self, event, seconds):
    self.sleeps.append(seconds)
    return super().wait(event, seconds)

  def sleep(self, seconds):
    self.sleeps.append(seconds)
    return super().sleep(seconds)


@pytest.fixture
def rt():
  with xcs_jax.runtime() as r:
    yield r


# -- a mesh is a binding ------------------------------------------------------------

def test_a_mesh_has_the_calls_of_a_binding_under_every_transform(rt):
  a = unique_binding("fake:echo", output_bytes=16, concurrency=4)
  b = a.replace(concurrency=5)
  m = models.mesh([a, b])
  assert isinstance(m, models.ModelMesh) and isinstance(m, models.ModelBinding)
  assert m == models.mesh([a, b]) and hash(m) == hash(models.mesh([a, b]))
  assert m != models.mesh([b, a]) and m.replicas == (a, b)
  assert m.concurrency() == 9 and m.model == "echo"
  x = prompts(6)
  expected = [f"p{i}" for i in range(6)]
  assert text.decode(jax.jit(jax.vmap(m))(x)) == expected
  assert text.decode(xcs_jax.jit(jax.vmap(m))(prompts(6, "q"))) == [f"q{i}" for i in range(6)]
  up = unique_binding("fake:upper", output_bytes=16)
  upper = models.mesh([up, up.replace(concurrency=3)])
  chain = xcs_jax.jit(jax.vmap(lambda p: upper(m(p))))          # a stream of two meshes
  assert text.decode(chain(prompts(6, "c"))) == [f"C{i}" for i in range(6)]
  assert text.decode(m(x[0])) == "p0"
  np.testing.assert_allclose(m.score_options(x, ("p1", "zz")), a.score_options(x, ("p1", "zz")))
  np.testing.assert_allclose(jax.vmap(m.embed)(x), a.embed(x), rtol=1e-6)
  assert m.usage().calls == 30 and m.usage().cache_hits == 1    # the eager p0
  assert sum(calls(m)) == m.usage().calls
  assert "mesh(" in str(m) and str(a) in str(m)


def test_keys_give_the_same_samples_as_on_a_replica(rt):
  a = unique_binding("fake:choice", choices=("a", "b", "c", "d"), temperature=1.0,
                     output_bytes=4)
  m = models.mesh([a, a.replace(concurrency=3)])
  keys = jax.random.split(jax.random.key(0), 8)
  x = jnp.broadcast_to(prompts(1)[0], (8, 16))
  np.testing.assert_array_equal(jax.vmap(m)(x, key=keys), jax.vmap(a)(x, key=keys))


# -- routing ------------------------------------------------------------------------

def test_round_robin_takes_the_replicas_in_turn(rt):
  reps = endpoints(3)
  m = models.mesh(reps, strategy="round_robin")
  for i in range(9):
    m(prompts(9, "rr")[i])
  assert calls(m) == [3, 3, 3]


def test_weighted_spreads_calls_in_proportion(rt):
  reps = endpoints(2)
  m = models.mesh(reps, strategy="weighted", weights=(3, 1))
  for i in range(40):
    m(prompts(40, "w")[i])
  assert calls(m) == [30, 10]


def test_least_loaded_keeps_every_replica_within_its_own_limit(rt):
  fast, slow = endpoints(2, latency_s=0.05)
  fast, slow = fast.replace(concurrency=2), slow.replace(concurrency=3, latency_s=0.1)
  m = models.mesh([fast, slow])
  out = jax.jit(jax.vmap(m))(prompts(30, "ll"))
  assert text.decode(out) == [f"LL{i}" for i in range(30)]
  provider = rt.provider("meshtest")
  peaks = [provider.in_flight[b.get("base_url")].peak for b in (fast, slow)]
  assert peaks == [2, 3]                  # each full, never over its own limit
  assert calls(m)[0] > calls(m)[1]       # the faster replica served more


def test_replicas_keep_their_endpoints_rate_limiter(rt):
  a, b = endpoints(2)
  m = models.mesh([a.replace(rpm=6000), b])
  jax.vmap(m)(prompts(4, "rl"))
  scope = rt.provider("meshtest").limit_scope(a)
  assert rt.limiter(scope).rpm == 6000
  assert rt.limiter(rt.provider("meshtest").limit_scope(b)).rpm is None


# -- failover and health ------------------------------------------------------------

def test_a_transient_failure_fails_over_at_once():
  clock = RecordingClock()
  with xcs_jax.runtime(clock=clock):
    a, b = endpoints(2)
    m = models.mesh([a, b], strategy="round_robin", retries=1)
    xcs_jax.current_runtime().provider("meshtest").down.add(a.get("base_url"))
    assert text.decode(jax.vmap(m)(prompts(4, "f"))) == [f"F{i}" for i in range(4)]
    u = m.usage()
    assert (u.calls, u.errors) == (4, 0) and u.retries >= 1
    assert all(s == 0 for s in clock.sleeps)     # no backoff before another replica
    assert a.usage().errors == calls(m)[0] >= 1


def test_a_permanent_error_is_not_retried_elsewhere(rt):
  a = unique_binding("fake:echo", fail_on="bad", output_bytes=16)
  m = models.mesh([a, a.replace(concurrency=3)])
  with pytest.raises(xcs_jax.XCSExecutionError, match="injected failure") as e:
    m(text.encode("bad prompt", 16))
  assert isinstance(e.value.__cause__, xcs_jax.FakeProviderError)
  assert sum(calls(m)) == 1 and m.usage().retries == 0


def test_a_failing_replica_is_ejected_then_probed_back_in():
  clock = ManualClock()
  with xcs_jax.runtime(clock=clock) as r:
    a, b = endpoints(2)
    m = models.mesh([a, b], strategy="round_robin", eject_after=2, cooldown_s=30.0)
    provider = r.provider("meshtest")
    provider.down.add(a.get("base_url"))
    for i in range(8):
      assert text.decode(m(prompts(8, "e")[i])) == f"E{i}"
    assert calls(m)[0] == 2 and m.stats()[0].ejected     # two failures, then left out
    assert m.stats()[0].ejections == 1 and m.usage().errors == 0
    clock.t += 31.0                                       # the cool-down is over:
    m(prompts(1, "probe")[0])                             # one call probes it, fails,
    assert calls(m)[0] == 3 and m.stats()[0].ejections == 2
    m(prompts(2, "probe")[1])                             # and it rests again
    assert calls(m)[0] == 3
    provider.down.clear()                                 # the replica recovers
    clock.t += 31.0
    m(prompts(3, "probe")[2])
    assert calls(m)[0] == 4 and not m.stats()[0].ejected  # the probe brought it back
    for i in range(4):
      m(prompts(4, "back")[i])
    assert calls(m)[0] == 6                               # in turn again


def test_when_every_replica_fails_the_call_fails_clearly(rt):
  reps = endpoints(2)
  m = models.mesh(reps, retries=3)
  rt.provider("meshtest").down.update(r.get("base_url") for r in reps)
  with pytest.raises(xcs_jax.XCSExecutionError, match="refused") as e:
    m(prompts(1, "dead")[0])
  assert isinstance(e.value.__cause__, ConnectionRefusedError)
  assert sum(calls(m)) == 4 and m.usage().errors == 1


def test_every_replica_ejected_still_gets_the_calls(rt):
  reps = endpoints(2)
  m = models.mesh(reps, eject_after=1, retries=1)
  provider = rt.provider("meshtest")
  provider.down.update(r.get("base_url") for r in reps)
  with pytest.raises(xcs_jax.XCSExecutionError):
    m(prompts(1, "x")[0])
  assert all(s.ejected for s in m.stats())
  provider.down.clear()
  assert text.decode(m(prompts(1, "y")[0])) == "Y0"      # tried anyway, not refused unsent


# -- hedging ------------------------------------------------------------------------

def test_a_slow_attempt_is_hedged_and_the_loser_cancelled(rt):
  slow, fast = endpoints(2)
  m = models.mesh([slow.replace(latency_s=30.0), fast], strategy="round_robin",
                  hedge_after_s=0.05)
  out = jax.jit(jax.vmap(m))(prompts(8, "h"))
  assert text.decode(out) == [f"H{i}" for i in range(8)]
  s_slow, s_fast = m.stats()
  assert s_slow.calls == 4 and s_fast.hedges == 4 and s_fast.wins == 4
  assert s_slow.wins == 0 and s_slow.failures == 0
  provider = rt.provider("meshtest")
  assert wait_until(lambda: provider.cancelled[slow.get("base_url")] == 4)
  assert wait_until(lambda: m.stats()[0].outstanding == 0)
  assert m.usage().calls == 8 and m.usage().errors == 0


def test_p95_hedging_waits_for_enough_latencies_then_hedges_the_slow(rt):
  a, b = endpoints(2, latency_s=0.01)
  m = models.mesh([a, b], strategy="round_robin", hedge_after_s="p95")
  for i in range(20):
    m(prompts(24, "warm")[i])
  assert sum(s.hedges for s in m.stats()) == 0          # no percentile yet
  for i in range(20, 24):
    m(prompts(24, "warm")[i])
  before = [s.hedges for s in m.stats()]
  rt.provider("meshtest").slow[a.get("base_url")] = 30.0
  for i in range(4):
    assert text.decode(m(prompts(4, "late")[i])) == f"LATE{i}"
  assert m.stats()[1].hedges - before[1] == 2 and m.stats()[1].wins >= 2


def test_a_sync_replicas_lost_hedge_is_cancelled_on_its_worker(rt):
  slow, fast = endpoints(2, provider="meshtest_sync")
  slow = slow.replace(latency_s=30.0)
  m = models.mesh([slow, fast], strategy="round_robin", hedge_after_s=0.05)
  assert text.decode(jax.vmap(m)(prompts(4, "s"))) == [f"S{i}" for i in range(4)]
  provider = rt.provider("meshtest_sync")
  assert wait_until(lambda: provider.cancelled[slow.get("base_url")] == 2)
  assert wait_until(lambda: not busy_xcs_threads())
  assert slow.usage().cancelled == 2 and m.stats()[0].outstanding == 0


# -- cache --------------------------------------------------------------------------

def test_the_cache_key_is_the_meshs_not_a_replicas(rt):
  a, b, c = endpoints(3)
  m1, m2 = models.mesh([a, b]), models.mesh([b, c], strategy="round_robin")
  x = prompts(4, "k")
  first = jax.vmap(m1)(x)
  np.testing.assert_array_equal(jax.vmap(m2)(x), first)   # any replica's answer will do
  assert m2.usage().cache_hits == 4 and sum(calls(m2)) == 0
  jax.vmap(a)(x)                                          # a replica keys by its endpoint
  assert a.usage().cache_hits == 0
  router = m1.router(rt)
  identity = router.cache_identity(m1)
  assert identity[0] == "mesh" and "http://replica-0" not in repr(identity)
  hotter = models.mesh([a.replace(temperature=0.5), b.replace(temperature=0.5)])
  jax.vmap(hotter)(x, key=jax.random.split(jax.random.key(1), 4))
  assert hotter.usage().cache_hits == 0                   # other answers, other key


def test_score_options_and_embed_cache_on_the_mesh_too(rt):
  a = unique_binding("fake:echo", output_bytes=16)
  m = models.mesh([a, a.replace(concurrency=7)])
  x = prompts(3, "c")
  for _ in range(2):
    m.score_options(x, ("c1", "z"))
    m.embed(x)
  assert m.usage().cache_hits == 6 and m.usage().calls == 6


# -- state, budgets -----------------------------------------------------------------

def test_stats_belong_to_the_runtime():
  reps = endpoints(2)
  m = models.mesh(reps)
  with xcs_jax.runtime():
    jax.vmap(m)(prompts(6, "st"))
    assert sum(calls(m)) == 6
  with xcs_jax.runtime():
    assert sum(calls(m)) == 0 and all(s.p50_s is None for s in m.stats())


def test_budgets_are_reserved_on_the_replica_that_serves(rt):
  a = unique_binding("fake:echo", output_bytes=16, max_tokens=4)
  m = models.mesh([a, a.replace(concurrency=3)])
  with xcs_jax.budget(cost=1.0, prices={"fake:echo": (0.01, 0.01)}) as spent:
    jax.vmap(m)(prompts(2, "b"))
  assert 0 < spent.spent_cost <= 1.0


def test_a_trace_shows_which_replica_answered(tmp_path, rt):
  import json
  from trace_format import check_chrome_trace
  slow, fast = endpoints(2)
  m = models.mesh([slow.replace(latency_s=30.0), fast], strategy="round_robin",
                  hedge_after_s=0.05, cache=None)
  path = tmp_path / "mesh.json"
  with xcs_jax.profiler.trace(path):
    jax.block_until_ready(xcs_jax.jit(jax.vmap(m))(prompts(4, "t")))
  calls = [e for e in check_chrome_trace(json.loads(path.read_text()))
           if e.get("cat") == "call"]
  assert len(calls) == 4
  assert all(e["args"]["replica"] == str(fast) for e in calls)   # hedged or not


# -- construction -------------------------------------------------------------------

@pytest.mark.parametrize("make, message", [
    (lambda a, b: models.mesh([]), "at least one"),
    (lambda a, b: models.mesh(a), "list or tuple"),
    (lambda a, b: models.mesh([a, "fake:echo"]), r"bindings\[1\]\)` must be a binding"),
    (lambda a, b: models.mesh([a, models.mesh([b])]), "itself a mesh"),
    (lambda a, b: models.mesh([a, a]), "same binding"),
    (lambda a, b: models.mesh([a, models.bind("fake:upper", output_bytes=16)]),
     "one model"),
    (lambda a, b: models.mesh([a, b.replace(max_tokens=7)]), "`max_tokens=7`"),
    (lambda a, b: models.mesh([a, b.replace(output_bytes=32)]), "`output_bytes=32`"),
    (lambda a, b: models.mesh([a, b.replace(embedding_dim=8)]), "`embedding_dim`"),
    (lambda a, b: models.mesh([a, b.replace(deadline_s=5.0)]), "disagree on `deadline_s`"),
    (lambda a, b: models.mesh([a, b], strategy="fastest"), "'least_loaded'"),
    (lambda a, b: models.mesh([a, b], strategy="weighted"), "one positive number"),
    (lambda a, b: models.mesh([a, b], strategy="weighted", weights=(1, 0)),
     r"weights\[1\]=...\)` must be a finite number > 0"),
    (lambda a, b: models.mesh([a, b], weights=(1, 2)), "need strategy='weighted'"),
    (lambda a, b: models.mesh([a, b], hedge_after_s=True), "seconds"),
    (lambda a, b: models.mesh([a, b], hedge_after_s=float("nan")), "\"p95\""),
    (lambda a, b: models.mesh([a, b], hedge_after_s="p99"), "\"p95\""),
    (lambda a, b: models.mesh([a, b], hedge_after_s=0), "\"p95\""),
    (lambda a, b: models.mesh([a, b], eject_after=0), "positive int"),
    (lambda a, b: models.mesh([a, b], cooldown_s=float("inf")), "number of seconds"),
    (lambda a, b: models.mesh([a, b], retries=-1), "int >= 0"),
    (lambda a, b: models.mesh([a, b], retries=None, deadline_s=None), "retry forever"),
    (lambda a, b: models.mesh([a, b], cache="always"), "'auto'"),
])
def test_bad_meshes_are_clear_errors_when_made(make, message):
  a = unique_binding("fake:echo", output_bytes=16)
  b = a.replace(concurrency=3)
  with pytest.raises((TypeError, ValueError), match=message):
    make(a, b)


def test_embedding_widths_must_agree_where_replicas_can_embed(rt):
  a = unique_binding("fake:echo", output_bytes=16)
  server = models.bind("meshtest:echo", base_url="http://replica-0",
                       system_prompt=a.get("system_prompt"), output_bytes=16)
  m = models.mesh([a, server])                            # the server cannot embed: fine
  assert m.get("embedding_dim") == 64
  assert jax.vmap(m.embed)(prompts(4, "emb")).shape == (4, 64)
  assert calls(m) == [4, 0]                               # embeds go to those that can
  with pytest.raises(ValueError, match="one width"):
    models.mesh([a, server.replace(embedding_dim=32)])
  with pytest.raises(NotImplementedError, match="can embed"):
    models.mesh([server]).embed(prompts(1)[0])


def test_call_parameters_default_to_the_replicas_and_can_be_set(rt):
  a = unique_binding("fake:echo", output_bytes=16, deadline_s=5.0)
  m = models.mesh([a, a.replace(concurrency=3)])
  assert m.get("deadline_s") == 5.0 and m.get("retries") is None
  m2 = models.mesh([a, a.replace(deadline_s=9.0)], deadline_s=7.0, concurrency=2)
  assert m2.get("deadline_s") == 7.0 and m2.concurrency() == 2
  hot = m.replace(temperature=0.7, strategy="round_robin")
  assert all(r.get("temperature") == 0.7 for r in hot.replicas)
  assert hot.get("strategy") == "round_robin" and hot.get("deadline_s") == 5.0


# -- real servers -------------------------------------------------------------------
# Three `llama_cpp.server` processes (SmolLM2) on 127.0.0.1 as replicas; only
# the kill test uses (and kills) the third.

@pytest.fixture(scope="module")
def servers(tmp_path_factory):
  pytest.importorskip("openai")
  pytest.importorskip("llama_cpp.server.app")
  import llama_server
  from xcs_jax._src.providers import local
  gguf = local.default_model_path()
  with llama_server.servers([[llama_server.chat_model(gguf)]] * 3,
                            tmp_path_factory.mktemp("mesh")) as running:
    yield running


def served(base_url, **params):
  defaults = dict(base_url=base_url, api_key_env=None, max_tokens=2, output_bytes=64,
                  system_prompt="Be brief.", timeout_s=30.0, deadline_s=120.0)
  return models.bind("openai:smollm2", **{**defaults, **params})


def questions(n, tag=""):
  return jnp.asarray(text.encode([f"Say {tag}{i}." for i in range(n)], 32))


@pytest.mark.server
def test_a_replica_killed_mid_batch_loses_no_call(servers):
  replicas = [served(s.base_url) for s in servers]
  x = questions(64)
  with xcs_jax.runtime(cache=False):            # the answers of two healthy replicas
    expected = text.decode(jax.vmap(models.mesh(replicas[:2]))(x))
  m = models.mesh(replicas)
  with xcs_jax.runtime(cache=False) as r:
    def kill_when_busy():
      wait_until(lambda: r.usage.get(replicas[2]).calls >= 3, timeout_s=60)
      servers[2].proc.kill()
    killer = threading.Thread(target=kill_when_busy)
    killer.start()
    answers = text.decode(xcs_jax.jit(jax.vmap(m))(x))
    killer.join()
    stats, u = m.stats(), m.usage()
    answered = sum(b.usage().calls - b.usage().errors - b.usage().cancelled for b in replicas)
  assert answers == expected                   # every result, each its own prompt's
  assert (u.calls, u.errors) == (64, 0)
  assert answered == 64                        # each answered once: none lost, none twice
  assert stats[2].failures >= 1 and u.retries >= stats[2].failures
  assert stats[2].ejected


@pytest.mark.server
def test_hedging_answers_around_a_delayed_replica(servers):
  from fault_proxy import FaultProxy
  proxy = FaultProxy("127.0.0.1", servers[0].port)
  proxy.delay_s = 5.0
  try:
    slow, fast = served(proxy.base_url), served(servers[1].base_url)
    m = models.mesh([slow, fast], strategy="round_robin", hedge_after_s=0.3)
    with xcs_jax.runtime(cache=False):
      answers = text.decode(jax.vmap(m)(questions(8, "h")))
      s_slow, s_fast = m.stats()
      u = m.usage()
  finally:
    proxy.close()
  assert len(answers) == 8 and all(answers) and u.errors == 0
  # Every call first sent to the slow replica was hedged, and none waited for
  # it (a fast replica's call queued on its busy server may be hedged too).
  assert s_fast.hedges == 4 and s_slow.wins == 0
  assert s_fast.wins == s_fast.hedges + s_slow.hedges


@pytest.mark.server
def test_dropped_and_refused_connections_fail_over(servers):
  from fault_proxy import FaultProxy
  proxy = FaultProxy("127.0.0.1", servers[0].port)
  proxy.drop_next = 10**6
  try:
    flaky, good = served(proxy.base_url), served(servers[1].base_url)
    m = models.mesh([flaky, good], strategy="round_robin", eject_after=2)
    with xcs_jax.runtime(cache=False):
      answers = text.decode(jax.vmap(m)(questions(6, "d")))
      assert all(answers) and m.usage().errors == 0
      assert proxy.dropped >= 2 and m.stats()[0].ejected
    proxy.refuse()                                # now a dead port
    with xcs_jax.runtime(cache=False):
      answers = text.decode(jax.vmap(m)(questions(6, "r")))
      assert all(answers) and m.usage().errors == 0 and m.stats()[0].failures >= 1
  finally:
    proxy.close()


@pytest.mark.server
@pytest.mark.local_model
def test_the_local_model_and_a_server_serve_one_mesh(servers):
  # A sync replica (the local model runs on the runtime's workers) beside an
  # async one; both give the model's greedy answers.
  local_model = models.bind("local:smollm2", max_tokens=2, output_bytes=64,
                            system_prompt="Be brief.", n_threads=1)
  m = models.mesh([local_model, served(servers[1].base_url)], strategy="round_robin",
                  deadline_s=120.0)
  x = questions(4, "l")
  with xcs_jax.runtime(cache=False):
    expected = text.decode(jax.vmap(local_model)(x))
    assert text.decode(xcs_jax.jit(jax.vmap(m))(x)) == expected
    # Both served (a replica is passed over while it is full).
    assert calls(m)[0] >= 1 and sum(calls(m)) == 4 and m.usage().errors == 0
