"""Model bindings: `xcs_jax.models.bind`, `ModelBinding` and the fake provider."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xcs_jax
from xcs_jax import models, text
from xcs_jax._src.providers import base

from conftest import unique_binding


# --- bind: validation --------------------------------------------------------

def test_bind_returns_a_binding_with_defaults():
  b = models.bind("fake:echo")
  assert isinstance(b, models.ModelBinding)
  assert (b.provider, b.model) == ("fake", "echo")
  assert b.get("output_bytes") == base.COMMON_PARAMS["output_bytes"]
  assert b.get("latency_s") == 0.0
  assert b.concurrency() == 1024  # the fake provider's default
  assert models.bind("fake:echo", concurrency=4).concurrency() == 4
  with pytest.raises(KeyError):
    b.get("nope")


def test_binding_is_hashable_and_compared_by_value():
  a = models.bind("fake:echo", latency_s=0.5, output_bytes=64)
  b = models.bind("fake:echo", output_bytes=64, latency_s=0.5)
  c = models.bind("fake:echo", latency_s=0.25, output_bytes=64)
  assert a == b and hash(a) == hash(b)
  assert a != c
  assert len({a, b, c}) == 2
  assert {a: 1}[b] == 1


def test_binding_is_immutable():
  b = models.bind("fake:echo")
  with pytest.raises(dataclasses.FrozenInstanceError):
    b.provider = "other"  # type: ignore[misc]
  with pytest.raises(dataclasses.FrozenInstanceError):
    b.params = ()  # type: ignore[misc]
  opts = b.options
  opts["latency_s"] = 9.0  # a copy: the binding does not change
  assert b.get("latency_s") == 0.0


def test_binding_replace_validates():
  b = models.bind("fake:echo", output_bytes=32)
  c = b.replace(latency_s=0.1)
  assert c.get("latency_s") == 0.1 and c.get("output_bytes") == 32
  assert b.get("latency_s") == 0.0
  with pytest.raises(ValueError, match="output_bytes"):
    b.replace(output_bytes=-1)


def test_binding_works_as_a_static_jit_argument():
  b = models.bind("fake:upper", output_bytes=16)
  f = jax.jit(lambda binding, x: binding(x), static_argnums=0)
  x = text.encode("abc", 8)
  assert text.decode(f(b, x)) == "ABC"
  assert text.decode(f(models.bind("fake:upper", output_bytes=16), x)) == "ABC"


def test_repr_shows_changed_params_only():
  b = models.bind("fake:echo", latency_s=0.1, output_bytes=32)
  assert str(b) == "fake:echo(latency_s=0.1, output_bytes=32)"
  assert repr(b) == "ModelBinding('fake:echo(latency_s=0.1, output_bytes=32)')"
  assert str(models.bind("fake:echo")) == "fake:echo"


class _KeyedProvider(base.Provider):
  """A provider that reads an API key from the environment, like real ones."""
  name = "test_keyed"
  params = {"api_key_env": "XCS_TEST_SECRET_KEY"}

  def validate(self, model, params):
    if not os.environ.get(params["api_key_env"]):
      raise ValueError(f"missing API key: set the environment variable "
                       f"{params['api_key_env']}")

  def generate(self, binding, prompt, seed, ctx):
    assert os.environ[binding.get("api_key_env")]  # reads the key, as a client would
    raise RuntimeError("server said: unauthorized")


base.register_provider("test_keyed", _KeyedProvider)


def test_repr_and_errors_hold_no_secrets(monkeypatch):
  secret = "sk-test-very-secret-0123456789"
  monkeypatch.setenv("XCS_TEST_SECRET_KEY", secret)
  b = models.bind("test_keyed:m", retries=0)
  for s in (str(b), repr(b), str(b.params), str(xcs_jax.usage())):
    assert secret not in s
  with pytest.raises(xcs_jax.XCSExecutionError) as e:
    b(text.encode("hi", 8))
  assert secret not in str(e.value) and secret not in e.value.binding
  with pytest.raises(RuntimeError) as e:
    jax.jit(b)(text.encode("hi", 8)).block_until_ready()
  assert secret not in str(e.value)


def test_missing_api_key_is_a_clear_error(monkeypatch):
  monkeypatch.delenv("XCS_TEST_SECRET_KEY", raising=False)
  with pytest.raises(ValueError, match="XCS_TEST_SECRET_KEY"):
    models.bind("test_keyed:m")


@pytest.mark.parametrize("spec", ["nope:model", "openia:gpt"])
def test_unknown_provider(spec):
  with pytest.raises(ValueError) as e:
    models.bind(spec)
  msg = str(e.value)
  assert "unknown provider" in msg and "'fake'" in msg and "provider:model" in msg


@pytest.mark.parametrize("spec", ["fake", ""])
def test_malformed_spec(spec):
  with pytest.raises(ValueError, match="provider:model"):
    models.bind(spec)


@pytest.mark.parametrize("spec", [3, None])
def test_spec_of_the_wrong_type(spec):
  with pytest.raises(TypeError, match=r"`bind\(spec, ...\)` must be a str"):
    models.bind(spec)


def test_unknown_fake_model():
  with pytest.raises(ValueError, match="echo"):
    models.bind("fake:nonexistent")


def test_unknown_param_lists_the_valid_ones():
  with pytest.raises(ValueError) as e:
    models.bind("fake:echo", temprature=0.5)
  msg = str(e.value)
  assert "temprature" in msg and "temperature" in msg and "latency_s" in msg


@pytest.mark.parametrize("params, name, kind", [
    (dict(output_bytes=0), "output_bytes", ValueError),
    (dict(output_bytes=2.5), "output_bytes", TypeError),
    (dict(max_tokens=0), "max_tokens", ValueError),
    (dict(overflow="clip"), "overflow", ValueError),
    (dict(timeout_s=-1), "timeout_s", ValueError),
    (dict(retries=-1), "retries", ValueError),
    (dict(concurrency=0), "concurrency", ValueError),
    (dict(temperature=-0.1), "temperature", ValueError),
    (dict(system_prompt=3), "system_prompt", TypeError),
    (dict(latency_s=-1), "latency_s", ValueError),
    (dict(choices=["a", "b"]), "choices", TypeError),
    (dict(fail_on=["a"]), "fail_on", TypeError),
])
def test_invalid_param_values(params, name, kind):
  with pytest.raises(kind, match=name):
    models.bind("fake:choice", **params)


class _ParamsProvider(base.Provider):
  name = "test_params"
  params = {"extra": None}


base.register_provider("test_params", _ParamsProvider)


def test_unhashable_param_is_rejected():
  with pytest.raises(ValueError, match="hashable"):
    models.bind("test_params:m", extra=["a"])


# --- calling a binding ---------------------------------------------------------

def test_echo_and_upper():
  x = text.encode(["hello", "wörld"], 16)
  assert text.decode(models.bind("fake:echo", output_bytes=16)(x)) == ["hello", "wörld"]
  assert text.decode(models.bind("fake:upper", output_bytes=16)(x)) == ["HELLO", "WÖRLD"]


def test_output_is_a_text_array_of_the_binding_capacity():
  b = models.bind("fake:echo", output_bytes=24)
  out = b(text.encode([["a", "b", "c"], ["d", "e", "f"]], 8))
  assert out.shape == (2, 3, 24) and out.dtype == jnp.uint8
  assert jax.eval_shape(b, jax.ShapeDtypeStruct((5, 8), jnp.uint8)).shape == (5, 24)


def test_choice_is_deterministic_and_from_choices():
  choices = ("red", "green", "blue")
  b = models.bind("fake:choice", choices=choices, output_bytes=8)
  x = text.encode([f"prompt {i}" for i in range(20)], 16)
  first, second = text.decode(b(x)), text.decode(b(x))
  assert first == second
  assert set(first) <= set(choices) and len(set(first)) > 1


def test_answer_overflowing_output_bytes_is_an_error():
  b = models.bind("fake:echo", output_bytes=4)
  with pytest.raises(xcs_jax.XCSExecutionError) as e:
    b(text.encode("hello world", 16))
  assert isinstance(e.value.__cause__, ValueError)
  assert "output_bytes=4" in str(e.value) and "overflow='truncate'" in str(e.value)


def test_overflow_truncate_cuts_at_a_character_boundary():
  b = models.bind("fake:echo", output_bytes=5, overflow="truncate")
  out = text.decode(b(text.encode(["héllo wörld", "日本語"], 16)))
  assert out == ["héll", "日"]


@pytest.mark.parametrize("bad, what", [
    (np.zeros((2, 8), np.float32), "float32"),
    (np.zeros((2, 8), np.int32), "int32"),
    (np.uint8(3), "uint8 scalar"),
    ("a python string", "str"),
])
def test_wrong_prompt_type_raises_type_error(bad, what):
  b = models.bind("fake:echo")
  with pytest.raises(TypeError) as e:
    b(bad)
  assert "uint8 text array" in str(e.value) and what in str(e.value)
  if not isinstance(bad, str):
    with pytest.raises(TypeError, match="uint8 text array"):
      jax.jit(b)(bad)


def test_key_of_the_wrong_batch_shape():
  b = models.bind("fake:choice")
  x = text.encode(["a", "b", "c"], 8)
  with pytest.raises(ValueError, match="one per prompt"):
    b(x, key=jax.random.split(jax.random.key(0), 2))


def test_key_of_the_wrong_dtype():
  b = models.bind("fake:choice")
  with pytest.raises(TypeError, match="PRNG key"):
    b(text.encode("a", 8), key=jnp.zeros((2,), jnp.float32))


def test_typed_and_raw_keys_give_the_same_answer():
  b = models.bind("fake:choice", choices=tuple("abcdefghij"), output_bytes=4)
  x = text.encode("same prompt", 16)
  raw = b(x, key=jax.random.PRNGKey(7))
  typed = b(x, key=jax.random.wrap_key_data(jax.random.key_data(jax.random.PRNGKey(7))))
  assert text.decode(raw) == text.decode(typed)


def test_usage_counts_calls_and_tokens():
  b = unique_binding(output_bytes=32)
  b(text.encode(["one two three", "four five"], 16))
  u = b.usage()
  assert (u.calls, u.errors, u.retries) == (2, 0, 0)
  assert u.prompt_tokens == 5 and u.completion_tokens == 5
  assert xcs_jax.usage()[str(b)]["calls"] == 2
