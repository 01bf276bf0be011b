"""The `anthropic` provider: keys, errors and what it cannot do (no network:
only a loopback stand-in that rejects every key)."""
from __future__ import annotations

import pytest

import xcs_jax
from auth_echo_server import auth_echo_server, error_texts
from xcs_jax import text
from xcs_jax.extend import CallContext
from xcs_jax._src.providers import base
from xcs_jax.models import bind

pytest.importorskip("anthropic")

SECRET = "sk-ant-xcs-test-DISTINCTIVE-51d0e2"


@pytest.fixture
def keyed(monkeypatch):
  monkeypatch.setenv("XCS_TEST_ANTHROPIC_KEY", SECRET)
  return lambda **params: bind("anthropic:claude-3-5-haiku-latest",
                               api_key_env="XCS_TEST_ANTHROPIC_KEY", **params)


def test_missing_api_key_names_the_variable_and_the_fix(monkeypatch):
  monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
  with pytest.raises(ValueError) as info:
    bind("anthropic:claude-3-5-haiku-latest")
  message = str(info.value)
  assert "ANTHROPIC_API_KEY" in message and "not set" in message
  assert "api_key_env" in message


def test_the_key_is_never_in_the_binding(keyed):
  m = keyed(max_tokens=8)
  for shown in (repr(m), str(m), repr(m.params), repr(m.options)):
    assert SECRET not in shown
  assert ("api_key_env", "XCS_TEST_ANTHROPIC_KEY") in m.params


def test_a_rejected_key_never_appears_in_errors(keyed):
  with auth_echo_server() as url:
    m = keyed(base_url=url, retries=0, timeout_s=10.0)
    with pytest.raises(xcs_jax.XCSExecutionError) as info:
      xcs_jax.jit(m)(text.encode("hi", 8))
  shown = error_texts(info.value)
  assert "[redacted]" in shown
  assert SECRET not in shown


def test_numeric_calls_name_the_provider_and_the_alternative(keyed):
  m, provider = keyed(), xcs_jax.current_runtime().provider("anthropic")
  with pytest.raises(NotImplementedError, match="anthropic.*local"):
    provider.score_options(m, "Is it?", ("Yes.", "No."), CallContext())
  with pytest.raises(NotImplementedError, match="anthropic.*local"):
    provider.embed(m, "a text", CallContext())
  with pytest.raises(NotImplementedError, match="anthropic"):
    provider.embedding_dim(m)
  if hasattr(m, "embed"):
    with pytest.raises(NotImplementedError, match="anthropic"):
      m.embed(text.encode("a text", 16))      # at trace time: no width to give
