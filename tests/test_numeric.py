"""Numeric model outputs: `ModelBinding.score_options` and `ModelBinding.embed`."""
import functools
import os
import re
import subprocess
import sys
import textwrap
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xcs_jax
from xcs_jax import models, text
from xcs_jax._src import numeric
from xcs_jax._src.providers import base

from conftest import InFlight, unique_binding

OPTS = ("great", "awful")
PROMPTS = ["the food was great", "an awful awful film", "no opinion here"]


def _prompts(max_len=32):
  return text.encode(PROMPTS, max_len)


# --- a provider that misbehaves on demand -------------------------------------

class _OddProvider(base.Provider):
  """Scores and embeds with whatever `mode` says, counting its calls."""

  name = "numtest_odd"
  params = {"mode": "ok"}

  def __init__(self):
    self.calls = 0
    self.dim_calls = 0
    self._lock = threading.Lock()

  def _count(self):
    with self._lock:
      self.calls += 1

  def score_options(self, binding, prompt, options, ctx):
    self._count()
    k = len(options)
    return {
        "ok": -np.arange(1.0, k + 1),
        "nan": np.full(k, np.nan),
        "positive": np.full(k, 0.5),
        "rounding": np.full(k, 1e-6),
        "inf": np.full(k, -np.inf),
        "shape": np.zeros(k + 1) - 1.0,
        "junk": "not numbers",
    }[binding.get("mode")]

  def embedding_dim(self, binding):
    with self._lock:
      self.dim_calls += 1
    return 3

  def embed(self, binding, text_, ctx):
    self._count()
    return {
        "ok": np.array([3.0, 0.0, 4.0]),
        "nan": np.array([np.nan, 0.0, 1.0]),
        "zero": np.zeros(3),
        "shape": np.ones(4),
    }[binding.get("mode")]


class _TextOnlyProvider(base.Provider):
  """Generates text but can neither score nor embed."""

  name = "numtest_textonly"

  def generate(self, binding, prompt, seed, ctx):
    return base.Completion(prompt)


xcs_jax.extend.register_provider("numtest_odd", _OddProvider)
xcs_jax.extend.register_provider("numtest_textonly", _TextOnlyProvider)


def _odd(mode):
  return models.bind("numtest_odd:m", mode=mode, retries=0)


# --- shapes, dtypes and the fake provider's documented rule --------------------

def test_score_options_shapes_and_dtype():
  b = models.bind("fake:echo")
  one = b.score_options(text.encode("great", 16), OPTS)
  assert one.shape == (2,) and one.dtype == jnp.float32
  batch = b.score_options(_prompts(), OPTS)
  assert batch.shape == (3, 2) and batch.dtype == jnp.float32
  grid = b.score_options(text.encode([PROMPTS[:2], PROMPTS[1:]], 32), OPTS + ("meh",))
  assert grid.shape == (2, 2, 3)
  np.testing.assert_array_equal(grid[0, 1], grid[1, 0])  # same prompt, same values
  empty = b.score_options(np.zeros((0, 8), np.uint8), OPTS)
  assert empty.shape == (0, 2) and empty.dtype == jnp.float32


def test_fake_scores_follow_the_documented_rule():
  b = models.bind("fake:echo")
  s = np.asarray(b.score_options(_prompts(), OPTS))
  assert (s <= 0).all()
  np.testing.assert_allclose(np.exp(s).sum(-1), 1.0, rtol=1e-5)
  assert s[0, 0] > s[0, 1] and s[1, 1] > s[1, 0]  # the option sharing words wins
  np.testing.assert_array_equal(s, np.asarray(b.score_options(_prompts(), OPTS)))
  # A bias of +10 on "awful" outweighs one shared word (2 nats) plus jitter (< 1).
  biased = np.asarray(models.bind("fake:echo", option_bias=(0.0, 10.0))
                      .score_options(_prompts(), OPTS))
  assert (biased.argmax(-1) == 1).all()


def test_embed_shapes_norm_and_similarity():
  b = models.bind("fake:echo", embedding_dim=16)
  texts = text.encode(["a cat sat on the mat", "the cat sat", "quarterly tax filing"], 32)
  e = np.asarray(b.embed(texts))
  assert e.shape == (3, 16) and e.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(e, axis=-1), 1.0, rtol=1e-5)
  assert e[0] @ e[1] > e[0] @ e[2]  # shared words point the same way
  raw = np.asarray(b.embed(texts, normalize=False))
  np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=-1, keepdims=True), e,
                             rtol=1e-5, atol=1e-6)
  assert models.bind("fake:echo").embed(text.encode("x", 4)).shape == (64,)


# --- transformations -------------------------------------------------------------

def test_jit_vmap_and_nested_vmap_agree_with_eager():
  b = models.bind("fake:echo")
  p = _prompts()
  eager = np.asarray(b.score_options(p, OPTS))
  score = lambda x: b.score_options(x, OPTS)
  np.testing.assert_array_equal(jax.jit(score)(p), eager)
  np.testing.assert_array_equal(jax.jit(jax.vmap(score))(p), eager)
  grid = np.stack([p, p[::-1]])
  nested = jax.jit(jax.vmap(jax.vmap(score)))(grid)
  np.testing.assert_array_equal(nested[0], eager)
  np.testing.assert_array_equal(nested[1], eager[::-1])
  in_axes1 = jax.vmap(score, in_axes=1)(np.swapaxes(grid, 0, 1))
  np.testing.assert_array_equal(in_axes1, nested)  # mapped over axis 1, out at 0
  emb = lambda x: b.embed(x)
  np.testing.assert_array_equal(jax.jit(jax.vmap(emb))(p), b.embed(p))


def test_batch_is_one_host_call_and_runs_concurrently(monkeypatch):
  """64 vmapped calls: one batched host call, all 64 in flight at once."""
  provider = xcs_jax.current_runtime().provider("fake")
  for method in ("score_options", "embed"):
    rec = InFlight(parties=64)  # every call waits until 64 are in flight together
    original = getattr(type(provider), method)
    monkeypatch.setattr(provider, method, rec.wrap(functools.partial(original, provider)))
    b = unique_binding()
    prompts = text.encode([f"item {i}" for i in range(64)], 16)
    if method == "score_options":
      fn = jax.jit(jax.vmap(lambda x: b.score_options(x, OPTS)))
    else:
      fn = jax.jit(jax.vmap(b.embed))
    jaxpr = jax.make_jaxpr(jax.vmap(lambda x: b.score_options(x, OPTS)))(prompts)
    assert sum(e.primitive is numeric.score_options_p for e in jaxpr.jaxpr.eqns) == 1
    out = fn(prompts)
    assert out.shape[0] == 64
    assert rec.calls == 64 and rec.peak == 64


def test_xcs_jax_jit_runs_score_and_embed_calls_at_once(monkeypatch):
  provider = xcs_jax.current_runtime().provider("fake")
  rec = InFlight(parties=2)  # each call waits until the other one is in flight
  for method in ("score_options", "embed"):
    original = getattr(type(provider), method)
    monkeypatch.setattr(provider, method, rec.wrap(functools.partial(original, provider)))
  b = unique_binding()

  @xcs_jax.jit
  def both(p):
    return b.score_options(p, OPTS), b.embed(p)

  s, e = both(text.encode("great", 16))
  assert s.shape == (2,) and e.shape == (64,)
  assert rec.calls == 2 and rec.peak == 2


def test_concurrency_limit_bounds_calls_in_flight(monkeypatch):
  provider = xcs_jax.current_runtime().provider("fake")
  rec = InFlight()
  original = type(provider).score_options
  monkeypatch.setattr(provider, "score_options", rec.wrap(functools.partial(original, provider)))
  b = unique_binding(latency_s=0.02, concurrency=4)
  b.score_options(text.encode([f"x{i}" for i in range(16)], 8), OPTS)
  assert rec.calls == 16 and rec.peak <= 4


def test_pmap_runs_score_and_embed_on_four_devices():
  code = textwrap.dedent("""
      import jax, numpy as np
      from xcs_jax import models, text
      assert jax.device_count() == 4
      b = models.bind("fake:echo", embedding_dim=8)
      p = text.encode([["good food"], ["bad food"], ["good"], ["bad"]], 16)
      s = jax.pmap(lambda x: b.score_options(x, ("good", "bad")))(p)
      e = jax.pmap(b.embed)(p)
      assert s.shape == (4, 1, 2) and e.shape == (4, 1, 8), (s.shape, e.shape)
      np.testing.assert_array_equal(s[:, 0], b.score_options(p[:, 0], ("good", "bad")))
      assert list(np.argmax(s[:, 0], -1)) == [0, 1, 0, 1]
      print("ok")
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "ok" in out.stdout


def test_abstract_eval_does_not_call_the_model():
  provider = xcs_jax.current_runtime().provider("numtest_odd")
  b = _odd("ok")
  before = provider.calls
  p = _prompts()
  shapes = jax.eval_shape(lambda x: (b.score_options(x, OPTS), b.embed(x)), p)
  assert shapes[0].shape == (3, 2) and shapes[1].shape == (3, 3)
  jax.make_jaxpr(jax.vmap(lambda x: b.score_options(x, OPTS)))(p)
  jax.jit(lambda x: b.embed(x)).lower(p)
  assert provider.calls == before
  assert provider.dim_calls > 0  # D comes from `embedding_dim`, not from a call


def test_unused_outputs_are_not_computed():
  """Like `jax.pure_callback`: a numeric call whose result is unused is removed."""
  provider = xcs_jax.current_runtime().provider("numtest_odd")
  b = _odd("ok")
  before = provider.calls
  jax.jit(lambda x: (b.score_options(x, OPTS), x)[1])(_prompts())
  assert provider.calls == before


# --- gradients -----------------------------------------------------------------

def test_gradient_to_a_downstream_bias_is_exact():
  b = models.bind("fake:echo", option_bias=(1.5, -0.5))
  p = _prompts()
  labels = jnp.array([0, 1, 1])

  def loss(bias, temp):
    logits = b.score_options(p, OPTS) / temp + bias
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

  bias, temp = jnp.array([0.3, -0.2]), jnp.float32(1.7)
  g_bias, g_temp = jax.jit(jax.grad(loss, argnums=(0, 1)))(bias, temp)
  # By hand: d/dlogits of mean cross-entropy is (softmax - onehot) / n.
  s = np.asarray(b.score_options(p, OPTS), np.float64)
  z = s / 1.7 + np.array([0.3, -0.2])
  prob = np.exp(z - z.max(1, keepdims=True))
  prob /= prob.sum(1, keepdims=True)
  d = (prob - np.eye(2)[np.asarray(labels)]) / 3
  np.testing.assert_allclose(g_bias, d.sum(0), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(g_temp, (d * -s / 1.7 ** 2).sum(), rtol=1e-5, atol=1e-7)
  # Forward mode works too; the text input contributes nothing.
  _, tangent = jax.jvp(lambda bb: loss(bb, temp), (bias,), (jnp.ones(2),))
  np.testing.assert_allclose(tangent, d.sum(), atol=1e-6)


def test_gradient_through_embeddings_to_a_linear_head():
  b = models.bind("fake:echo", embedding_dim=8)
  x = b.embed(_prompts())
  w = jnp.arange(8.0) / 10

  g = jax.grad(lambda w: jnp.sum(b.embed(_prompts()) @ w))(w)
  np.testing.assert_allclose(g, np.asarray(x).sum(0), rtol=1e-5)


# --- bad input -------------------------------------------------------------------

@pytest.mark.parametrize("options, error, match", [
    (["great", "awful"], TypeError, "tuple"),
    ((), ValueError, "at least one"),
    (("great", "great"), ValueError, "distinct"),
    (("great", 3), TypeError, "must be a str"),
    (("great", ""), ValueError, "non-empty"),
    (("great", "a\x00b"), ValueError, "NUL"),
    (("great", "\ud800"), ValueError, "surrogate"),
    ("great", TypeError, "tuple"),
])
def test_bad_options_name_the_argument(options, error, match):
  b = models.bind("fake:echo")
  with pytest.raises(error, match=f"`options(\\[1\\])?`.*{match}"):
    b.score_options(_prompts(), options)


def test_wrong_text_dtype_or_rank():
  b = models.bind("fake:echo")
  with pytest.raises(TypeError, match="`prompts` must be a uint8 text array"):
    b.score_options(np.zeros((2, 8), np.int32), OPTS)
  with pytest.raises(TypeError, match="`texts` must be a uint8 text array"):
    b.embed(np.float32(1.0))
  with pytest.raises(TypeError, match="normalize=..."):
    b.embed(_prompts(), normalize="yes")


def test_provider_that_cannot_score_or_embed_fails_at_trace_time():
  b = models.bind("numtest_textonly:m")
  with pytest.raises(NotImplementedError, match="numtest_textonly.*log-probabilities"):
    jax.make_jaxpr(lambda x: b.score_options(x, OPTS))(_prompts())
  with pytest.raises(NotImplementedError, match="numtest_textonly.*cannot embed"):
    jax.eval_shape(b.embed, _prompts())


@pytest.mark.parametrize("mode, match", [
    ("nan", "log-probability nan"),
    ("positive", "log-probability 0.5"),
    ("inf", "log-probability -inf"),
    ("shape", r"shape \(3,\) for 2 options"),
    ("junk", "not numbers"),
])
def test_bad_provider_scores_are_errors_never_values(mode, match):
  b = _odd(mode)
  with pytest.raises(xcs_jax.XCSExecutionError, match="score_options") as info:
    b.score_options(_prompts(), OPTS)
  assert isinstance(info.value.__cause__, numeric.ProviderValueError)
  assert "numtest_odd" in str(info.value.__cause__)
  assert re.search(match, str(info.value))
  # Under a user's plain jax.jit the message still reaches them.
  with pytest.raises(Exception, match=match):
    jax.jit(lambda x: b.score_options(x, OPTS))(_prompts()).block_until_ready()


def test_rounding_above_zero_is_read_as_zero():
  s = _odd("rounding").score_options(_prompts(), OPTS)
  np.testing.assert_array_equal(s, np.zeros((3, 2), np.float32))


@pytest.mark.parametrize("mode, normalize, match", [
    ("nan", True, "NaN"),
    ("zero", True, "zero embedding"),
    ("shape", False, r"shape \(4,\)"),
])
def test_bad_provider_embeddings_are_errors(mode, normalize, match):
  with pytest.raises(xcs_jax.XCSExecutionError, match=match) as info:
    _odd(mode).embed(_prompts(), normalize=normalize)
  assert isinstance(info.value.__cause__, numeric.ProviderValueError)


def test_embedding_without_normalization_is_returned_as_is():
  np.testing.assert_array_equal(_odd("ok").embed(text.encode("x", 4), normalize=False),
                                [3.0, 0.0, 4.0])
  np.testing.assert_allclose(_odd("ok").embed(text.encode("x", 4)), [0.6, 0.0, 0.8])
  np.testing.assert_array_equal(_odd("zero").embed(text.encode("x", 4), normalize=False),
                                np.zeros(3))


# --- failures, retries, timeouts (shared with generation) -------------------------

def test_failures_name_the_op_binding_and_line():
  b = unique_binding(fail_on="awful")
  with pytest.raises(xcs_jax.XCSExecutionError) as info:
    b.score_options(_prompts(), OPTS)
  msg = str(info.value)
  assert "score_options call to fake:echo" in msg and "batch item 1" in msg
  assert "test_numeric.py" in info.value.source
  with pytest.raises(xcs_jax.XCSExecutionError, match="embed call to fake:echo"):
    b.embed(_prompts())


def test_transient_failures_are_retried_and_counted():
  b = unique_binding(transient_failures=1)
  b.score_options(text.encode("x", 4), OPTS)
  b.embed(text.encode("x", 4))
  u = b.usage()
  assert (u.calls, u.retries, u.errors) == (2, 2, 0)


def test_timeout():
  b = unique_binding(latency_s=5.0, timeout_s=0.05, deadline_s=0.2)
  with pytest.raises(xcs_jax.XCSExecutionError) as info:
    b.score_options(text.encode("x", 4), OPTS)
  assert isinstance(info.value.__cause__, xcs_jax.XCSTimeoutError)
