"""The `openai` provider against a real OpenAI-compatible server on 127.0.0.1.

The module fixture starts `python -m llama_cpp.server` serving the SmolLM2
GGUF under two names: ``smollm2`` (chat and completions, loaded with
`logits_all` so echoed prompts carry log-probabilities) and ``smollm2-embed``
(embedding mode with mean pooling). It always stops the server.
"""
from __future__ import annotations

import socket
import time

import jax
import numpy as np
import pytest

import xcs_jax
import llama_server
from auth_echo_server import auth_echo_server, error_texts
from xcs_jax import text
from xcs_jax.extend import CallContext
from xcs_jax._src.providers import base, local
from xcs_jax.models import CHATML, bind

openai = pytest.importorskip("openai")

SYSTEM = "Answer in one short sentence."
SECRET = "sk-xcs-test-DISTINCTIVE-7f3a9c"


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
  pytest.importorskip("llama_cpp.server.app")
  gguf = local.default_model_path()
  folder = tmp_path_factory.mktemp("llama_server")
  with llama_server.servers([[llama_server.chat_model(gguf), llama_server.embed_model(gguf)]],
                            folder) as (server,):
    yield server.base_url


def _chat(base_url, **params):
  defaults = dict(base_url=base_url, api_key_env=None, max_tokens=12, output_bytes=256,
                  system_prompt=SYSTEM, timeout_s=60.0)
  return bind("openai:smollm2", **{**defaults, **params})


def _provider():
  return xcs_jax.current_runtime().provider("openai")


def _on_loop(coro):
  """Runs an async provider method's coroutine on the runtime's event loop."""
  return xcs_jax.current_runtime().event_loop().run(coro, timeout_s=120)


# -- against the real server --------------------------------------------------

@pytest.mark.server
def test_generation_under_jit_and_vmap(server_url):
  m = _chat(server_url)
  one = text.decode(jax.jit(m)(text.encode("What is the capital of France?", 64)))
  assert "Paris" in one
  batch = text.decode(jax.jit(jax.vmap(m))(text.encode(["What is 2+2?", "Name a color."], 64)))
  assert len(batch) == 2 and all(a.strip() for a in batch)
  usage = m.usage()
  assert usage.calls == 3 and usage.errors == 0
  assert usage.prompt_tokens > 0 and usage.completion_tokens > 0


@pytest.mark.server
def test_score_options_match_the_local_models_exact_values(server_url):
  options = ("Yes.", "The sky is blue.")
  prompt = "Is the sky blue? Answer yes or no."
  remote = _on_loop(_provider().score_options(_chat(server_url, score_template=CHATML),
                                              prompt, options, CallContext()))
  exact = xcs_jax.current_runtime().provider("local").score_options(
      bind("local:smollm2", system_prompt=SYSTEM), prompt, options, CallContext())
  assert remote.shape == (2,) and (remote <= 0).all()
  np.testing.assert_allclose(remote, exact, atol=1e-3)


@pytest.mark.server
def test_score_options_without_template_is_a_clear_error(server_url):
  with pytest.raises(NotImplementedError, match="score_template"):
    _on_loop(_provider().score_options(_chat(server_url), "Is it?", ("Yes.", "No."),
                                       CallContext()))
  m = _chat(server_url)
  if hasattr(m, "score_options"):
    with pytest.raises(xcs_jax.XCSExecutionError, match="local"):
      xcs_jax.jit(lambda p: m.score_options(p, ("Yes.", "No.")))(text.encode("Is it?", 16))


@pytest.mark.server
def test_embed_through_the_embeddings_endpoint(server_url):
  m = bind("openai:smollm2-embed", base_url=server_url, api_key_env=None,
           embedding_dim=576)
  provider = _provider()
  assert provider.embedding_dim(m) == 576
  unsized = bind("openai:smollm2-embed", base_url=server_url, api_key_env=None)
  with pytest.raises(ValueError, match="embedding_dim"):  # never a call at trace time
    jax.make_jaxpr(unsized.embed)(text.encode(["x"], 8))
  texts = ["a cat sat on the mat", "a kitten sat on the rug", "quarterly tax filing deadline"]
  vectors = np.stack([_on_loop(provider.embed(m, t, CallContext())) for t in texts])
  assert vectors.shape == (3, 576)
  unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
  assert unit[0] @ unit[1] > unit[0] @ unit[2] + 0.05
  if hasattr(m, "embed"):
    out = jax.jit(jax.vmap(m.embed))(text.encode(texts[:2], 32))
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


@pytest.mark.server
def test_a_key_in_the_environment_is_used_but_never_shown(server_url, monkeypatch):
  monkeypatch.setenv("XCS_TEST_OPENAI_KEY", SECRET)
  m = _chat(server_url, api_key_env="XCS_TEST_OPENAI_KEY")
  assert text.decode(m(text.encode("Say hi.", 16))).strip()
  for shown in (repr(m), str(m), repr(m.params), str(xcs_jax.usage())):
    assert SECRET not in shown


# -- errors (no model server needed) -------------------------------------------

def test_missing_api_key_names_the_variable(monkeypatch):
  monkeypatch.delenv("OPENAI_API_KEY", raising=False)
  with pytest.raises(ValueError, match="OPENAI_API_KEY.*not set"):
    bind("openai:gpt-4o-mini")
  monkeypatch.delenv("XCS_NO_SUCH_KEY", raising=False)
  with pytest.raises(ValueError, match="XCS_NO_SUCH_KEY"):
    bind("openai:gpt-4o-mini", api_key_env="XCS_NO_SUCH_KEY")


def test_a_rejected_key_never_appears_in_errors(monkeypatch):
  monkeypatch.setenv("XCS_TEST_OPENAI_KEY", SECRET)
  with auth_echo_server() as url:
    m = bind("openai:gpt-4o-mini", base_url=f"{url}/v1", api_key_env="XCS_TEST_OPENAI_KEY",
             retries=0, timeout_s=10.0)
    assert SECRET not in repr(m) and SECRET not in str(m)
    with pytest.raises(xcs_jax.XCSExecutionError) as info:
      xcs_jax.jit(m)(text.encode("hi", 8))
  shown = error_texts(info.value)
  assert "Incorrect API key provided: [redacted]" in shown
  assert SECRET not in shown
  with pytest.raises(Exception) as plain:           # plain jax.jit: text only
    jax.jit(m)(text.encode("hi", 8))
  assert SECRET not in error_texts(plain.value)


def test_connection_refused_fails_fast_with_bounded_retries():
  m = bind("openai:smollm2", base_url=f"http://127.0.0.1:{llama_server.free_port()}/v1",
           api_key_env=None, retries=1, timeout_s=2.0)
  start = time.monotonic()
  with pytest.raises(xcs_jax.XCSExecutionError) as info:
    xcs_jax.jit(m)(text.encode("hi", 8))
  assert time.monotonic() - start < 10
  assert isinstance(info.value.__cause__, openai.APIConnectionError)
  assert m.usage().retries == 1     # the runtime retried (the SDK's retries are off)


def test_bad_params_are_clear_errors():
  with pytest.raises(ValueError, match="score_template"):
    bind("openai:m", api_key_env=None, score_template="no reply field")
  with pytest.raises(ValueError, match="embedding_dim"):
    bind("openai:m", api_key_env=None, embedding_dim=0)


def test_a_key_never_travels_on_a_chained_sdk_error(monkeypatch):
  # A connection error does not echo the key, but the SDK's error object keeps
  # the request, Authorization header included: it must not be chained.
  monkeypatch.setenv("XCS_TEST_OPENAI_KEY", SECRET)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]  # closed once the block ends: connections refused
  m = bind("openai:gpt-4o-mini", base_url=f"http://127.0.0.1:{port}/v1",
           api_key_env="XCS_TEST_OPENAI_KEY", retries=0, timeout_s=5.0)
  with pytest.raises(xcs_jax.XCSExecutionError) as info:
    m(text.encode("hi", 8))
  assert SECRET not in error_texts(info.value)


def test_each_endpoint_has_its_own_concurrency_limit():
  from xcs_jax._src.binding_ops import GenerateOp
  a = bind("openai:m", api_key_env=None, base_url="http://127.0.0.1:1/v1", concurrency=3)
  b = bind("openai:m", api_key_env=None, base_url="http://127.0.0.1:2/v1", concurrency=3)
  rt = xcs_jax.current_runtime()
  assert GenerateOp(a).limit(rt) != GenerateOp(b).limit(rt)
  assert GenerateOp(a).limit(rt) == GenerateOp(a.replace(seed=1)).limit(rt)
