"""Real endpoints at scale: rate limits, Retry-After, lost connections, budgets.

A real `llama_cpp.server` (SmolLM2) on 127.0.0.1 behind `FaultProxy`, a small
proxy that answers 429 above a set rate, drops connections or delays them.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xcs_jax
import llama_server
from fault_proxy import FaultProxy
from xcs_jax import models, text
from xcs_jax._src.providers import local

pytestmark = pytest.mark.server
openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  pytest.importorskip("llama_cpp.server.app")
  gguf = local.default_model_path()
  with llama_server.servers([[llama_server.chat_model(gguf)]],
                            tmp_path_factory.mktemp("endpoints")) as (s,):
    yield s


@pytest.fixture
def proxy(server):
  p = FaultProxy("127.0.0.1", server.port)
  yield p
  p.close()


def chat(proxy, **params):
  defaults = dict(base_url=proxy.base_url, api_key_env=None, max_tokens=2, output_bytes=64,
                  cache=None, timeout_s=30.0, deadline_s=60.0)
  return models.bind("openai:smollm2", **{**defaults, **params})


def prompts(n, tag=""):
  return jnp.asarray(text.encode([f"Say {tag}{i}." for i in range(n)], 32))


def test_429_with_retry_after_is_waited_out_and_no_call_is_lost(proxy):
  proxy.max_rate, proxy.retry_after_s = 4, 0.5
  m = chat(proxy)
  with xcs_jax.runtime():
    out = xcs_jax.jit(jax.vmap(m))(prompts(24, "a"))
    u = m.usage()
  assert len(text.decode(out)) == 24 and all(text.decode(out))
  assert proxy.limited > 0                  # the server did push back...
  assert u.errors == 0 and u.calls == 24    # ...and every call got through
  assert u.retries >= proxy.limited


def test_the_limiter_holds_the_rate(proxy):
  proxy.max_rate = 1000                     # the proxy only measures here
  rate = 5.0                                # requests per second
  m = chat(proxy, rpm=rate * 60)
  with xcs_jax.runtime():
    start = time.monotonic()
    xcs_jax.jit(jax.vmap(m))(prompts(30, "b"))
    wall = time.monotonic() - start
    u = m.usage()
  sent = proxy.forwarded
  # Past the first second's burst, requests go out at the set rate.
  steady = [t for t in sent if t - sent[0] >= 1.0]
  measured = (len(steady) - 1) / (steady[-1] - steady[0])
  assert measured <= rate * 1.1 and u.waited_s > 0
  assert wall >= (30 - 1 - rate) / rate * 0.9   # it did wait rather than burst


def test_the_lower_rpm_of_two_bindings_of_one_endpoint_holds(proxy):
  fast, slow = chat(proxy, rpm=600), chat(proxy, rpm=120, temperature=0.0, seed=1)
  with xcs_jax.runtime() as rt:
    fast(prompts(1)[0])
    slow(prompts(1)[0])
    limiter = rt.limiter(rt.provider("openai").limit_scope(fast))
    assert limiter.rpm == 120


def test_adaptive_concurrency_halves_on_429_and_recovers(proxy):
  proxy.max_rate, proxy.retry_after_s = 3, 0.2
  m = chat(proxy, concurrency=16)
  with xcs_jax.runtime() as rt:
    xcs_jax.jit(jax.vmap(m))(prompts(20, "c"))
    limiter = rt.limiter(rt.provider("openai").limit_scope(m))
    assert limiter.rate_limited > 0
    low = limiter.cap
    assert low is not None and low < 16
    proxy.max_rate = None                   # the server has room again
    for k in range(6):
      xcs_jax.jit(jax.vmap(m))(prompts(16, f"d{k}"))
    assert limiter.cap is None or limiter.cap > low


def test_a_dropped_connection_is_retried(proxy):
  proxy.drop_next = 3
  m = chat(proxy)
  with xcs_jax.runtime():
    out = xcs_jax.jit(jax.vmap(m))(prompts(4, "e"))
    assert all(text.decode(out)) and m.usage().retries >= 3 and m.usage().errors == 0


def test_a_budget_stops_calls_before_they_go_out(proxy):
  m = chat(proxy, max_tokens=8)
  with xcs_jax.runtime():
    with xcs_jax.budget(tokens=60) as b:
      m(prompts(1, "f")[0])                 # ~4 prompt + 8 max tokens: fits
      used = b.spent_tokens
      assert 0 < used <= 60
      sent = len(proxy.forwarded)
      with pytest.raises(xcs_jax.XCSExecutionError) as e:
        xcs_jax.jit(jax.vmap(m))(prompts(8, "g"))
      assert isinstance(e.value.__cause__, xcs_jax.BudgetExceededError)
      assert "not sent" in str(e.value)
    # Nothing beyond the budget went out.
    assert len(proxy.forwarded) - sent <= (60 - used) // 10
  with xcs_jax.runtime(budget=xcs_jax.Budget(cost=1e-3,
                                             prices={"openai:smollm2": (1e-5, 2e-5)})) as rt:
    m(prompts(1, "h")[0])
    assert 0 < rt.budget.spent_cost <= 1e-3
    with pytest.raises(xcs_jax.XCSExecutionError, match="price"):
      models.bind("openai:other", base_url=proxy.base_url, api_key_env=None,
                  cache=None)(prompts(1)[0])
