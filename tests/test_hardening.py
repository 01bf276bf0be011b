"""Every defect found by trying the library as a hostile user, one test each.

Bad arguments are TypeError / ValueError naming the argument, at the call;
host outputs are never narrowed silently; errors under plain `jax.jit` lead
with the message and log one line; keys never sit in a frame as plain text;
SDK imports never count against a call's timeout.
"""
from __future__ import annotations

import logging
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xcs_jax
from xcs_jax import models, patterns, text
from xcs_jax._src import checks

from auth_echo_server import auth_echo_server

TESTS = pathlib.Path(__file__).parent
PKG = pathlib.Path(xcs_jax.__file__).parent


def _modes(f):
  """`f` eagerly, under `xcs_jax.jit` and under plain `jax.jit`."""
  return {"eager": f, "xcs_jax.jit": xcs_jax.jit(f), "jax.jit": jax.jit(f)}


def _run(f, *args):
  return jax.block_until_ready(f(*args))


# --- host_op outputs are never narrowed silently ----------------------------------

@pytest.mark.parametrize("value, dtype, wrapped", [
    (2**40, jnp.int32, "0"),
    (2**31, jnp.int32, "-2147483648"),
    (70000, jnp.int16, "4464"),
    (-1, jnp.uint8, "255"),
    (1e300, jnp.float32, "inf"),
])
def test_out_of_range_host_outputs_are_errors_in_every_mode(value, dtype, wrapped):
  op = xcs_jax.host_op(lambda x: value, out_spec=jax.ShapeDtypeStruct((), dtype),
                       name="narrowing")
  for mode, f in _modes(op).items():
    with pytest.raises((xcs_jax.XCSExecutionError, RuntimeError)) as info:
      _run(f, 1.0)
    message = str(info.value)
    for part in ("host_op call to narrowing", "output 0", repr(value),
                 str(np.dtype(dtype)), f"would become {wrapped}"):
      assert part in message, (mode, part, message)
    if mode != "jax.jit":
      assert isinstance(info.value.__cause__, ValueError)


def test_in_range_host_outputs_of_any_integer_type_are_cast():
  op = xcs_jax.host_op(lambda x: np.int64(200), out_spec=jax.ShapeDtypeStruct((), jnp.uint8))
  for f in _modes(op).values():
    out = _run(f, 1.0)
    assert out.dtype == jnp.uint8 and int(out) == 200


def test_the_failing_element_of_an_array_output_is_named():
  op = xcs_jax.host_op(lambda x: np.array([1.0, 2.0, 1e39]),
                       out_spec=jax.ShapeDtypeStruct((3,), jnp.float32), name="vec")
  with pytest.raises(xcs_jax.XCSExecutionError, match=r"1e\+39 in output 0 at index \(2,\)"):
    op(1.0)


def test_64_bit_out_spec_without_x64_is_one_error_at_trace_time_in_every_mode():
  op = xcs_jax.host_op(lambda x: x, out_spec=jax.ShapeDtypeStruct((), jnp.int64),
                       name="wide")
  messages = set()
  for mode, f in _modes(op).items():
    with pytest.raises(ValueError) as info:
      _run(f, 1)
    assert not isinstance(info.value, xcs_jax.XCSExecutionError), mode  # trace time
    messages.add(str(info.value))
  (message,) = messages  # identical in every mode
  for part in ("`host_op(wide, out_spec=...)`", "int64", "int32",
               'jax.config.update("jax_enable_x64", True)'):
    assert part in message
  with pytest.raises(ValueError, match="jax_enable_x64"):
    jax.make_jaxpr(op)(1)  # no call is ever made


def test_64_bit_out_spec_with_x64_keeps_its_values():
  jax.config.update("jax_enable_x64", True)
  try:
    op = xcs_jax.host_op(lambda x: np.int64(2**40), out_spec=jax.ShapeDtypeStruct(
        (), jnp.int64))
    for f in _modes(op).values():
      out = _run(f, 1)
      assert out.dtype == jnp.int64 and int(out) == 2**40
  finally:
    jax.config.update("jax_enable_x64", False)


# --- accepted, then failing later: now refused at the call -------------------------

def _local_model_installed() -> bool:
  try:
    __import__("llama_cpp")
    from xcs_jax._src.providers.local import default_model_path
    default_model_path()
  except Exception:  # noqa: BLE001 - any reason: the case is skipped
    return False
  return True


def _needs(module):
  try:
    __import__(module)
  except ImportError:
    return pytest.mark.skip(reason=f"{module} is not installed")
  return ()


ACCEPTED_THEN_FAILING = [
    # (what, call, error type, argument named)
    ("timeout inf", lambda: models.bind("fake:echo", timeout_s=float("inf")), ValueError,
     "timeout_s"),
    ("timeout 1e10", lambda: models.bind("fake:echo", timeout_s=1e10), ValueError,
     "timeout_s"),
    ("latency nan", lambda: models.bind("fake:echo", latency_s=float("nan")), ValueError,
     "latency_s"),
    ("latency inf", lambda: models.bind("fake:echo", latency_s=float("inf")), ValueError,
     "latency_s"),
    ("latency True", lambda: models.bind("fake:echo", latency_s=True), TypeError,
     "latency_s"),
    ("seed 1.5", lambda: models.bind("fake:echo", seed=1.5), TypeError, "seed"),
    ("seed True", lambda: models.bind("fake:echo", seed=True), TypeError, "seed"),
    ("seed -1", lambda: models.bind("fake:echo", seed=-1), ValueError, "seed"),
    ("transient -1", lambda: models.bind("fake:echo", transient_failures=-1), ValueError,
     "transient_failures"),
    ("choices empty str", lambda: models.bind("fake:choice", choices=("",)), ValueError,
     "choices[0]"),
    ("choices NUL", lambda: models.bind("fake:choice", choices=("a\x00",)), ValueError,
     "choices[0]"),
    ("option NUL", lambda: models.bind("fake:echo").score_options(
        text.encode("x", 4), ("yes", "n\x00o")), ValueError, "options[1]"),
    ("max_concurrency True", lambda: xcs_jax.jit(lambda x: x, max_concurrency=True),
     TypeError, "max_concurrency"),
    ("static_argnums 5", lambda: xcs_jax.jit(lambda x: x, static_argnums=5), ValueError,
     "static_argnums"),
    ("static_argnames y", lambda: xcs_jax.jit(lambda x: x, static_argnames="y"),
     ValueError, "static_argnames"),
    ("fake embedding_dim True", lambda: models.bind("fake:echo", embedding_dim=True),
     TypeError, "embedding_dim"),
    pytest.param("openai embedding_dim True", lambda: models.bind(
        "openai:m", api_key_env=None, embedding_dim=True), TypeError, "embedding_dim",
        marks=_needs("openai")),
    pytest.param("local pool_size True", lambda: models.bind("local:smollm2",
                                                             pool_size=True),
                 TypeError, "pool_size",
                 marks=() if _local_model_installed() else pytest.mark.skip(
                     reason="the local model is not installed")),
    ("ensemble n True", lambda: patterns.ensemble(models.bind("fake:echo"),
                                                  text.encode("x", 4), n=True,
                                                  key=jax.random.key(0)),
     TypeError, "n=..."),
    ("ensemble key None", lambda: patterns.ensemble(models.bind("fake:echo"),
                                                    text.encode("x", 4), n=2, key=None),
     TypeError, "key=..."),
    ("runtime grace inf", lambda: xcs_jax.runtime(cancel_grace_s=float("inf")), ValueError,
     "cancel_grace_s"),
    ("host_op timeout inf", lambda: xcs_jax.host_op(
        lambda x: x, out_spec=jax.ShapeDtypeStruct((), jnp.float32),
        timeout_s=float("inf")), ValueError, "timeout_s"),
    ("host_op timeout 1e10", lambda: xcs_jax.host_op(
        lambda x: x, out_spec=jax.ShapeDtypeStruct((), jnp.float32), timeout_s=1e10),
     ValueError, "timeout_s"),
    ("host_op vectorized 'no'", lambda: xcs_jax.host_op(
        lambda x: x, out_spec=jax.ShapeDtypeStruct((), jnp.float32), vectorized="no"),
     TypeError, "vectorized"),
    ("fail_on 5", lambda: models.bind("fake:echo", fail_on=5), TypeError, "fail_on"),
    # Found by the fuzz suite: sizes numpy allocates lazily, so the operating
    # system killed the process instead of anything raising.
    ("max_len 2**40", lambda: text.encode("a", 2**40), ValueError, "max_len"),
    ("output_bytes 2**40", lambda: models.bind("fake:echo", output_bytes=2**40),
     ValueError, "output_bytes"),
    ("embedding_dim 2**40", lambda: models.bind("fake:echo", embedding_dim=2**40),
     ValueError, "embedding_dim"),
    ("ensemble n 2**31", lambda: patterns.ensemble(models.bind("fake:echo"),
                                                   text.encode("x", 4), n=2**31,
                                                   key=jax.random.key(0)),
     ValueError, "n=..."),
    ("option_bias nan", lambda: models.bind("fake:echo", option_bias=(float("nan"),)),
     ValueError, "option_bias[0]"),
]


@pytest.mark.parametrize("what, call, kind, argument", ACCEPTED_THEN_FAILING,
                         ids=[getattr(c, "values", c)[0] for c in ACCEPTED_THEN_FAILING])
def test_values_that_used_to_fail_later_are_refused_at_the_call(what, call, kind,
                                                                argument):
  with pytest.raises(kind) as info:
    call()
  message = str(info.value)
  assert not isinstance(info.value, xcs_jax.XCSError)
  assert argument in message and "`" in message and "got " in message, message


# --- one check for every positive int ---------------------------------------------

F32 = jax.ShapeDtypeStruct((), jnp.float32)

POSITIVE_INTS = {
    "text.encode max_len": lambda v: text.encode("a", v),
    "host_op concurrency": lambda v: xcs_jax.host_op(lambda x: x, out_spec=F32,
                                                     concurrency=v),
    "jit max_concurrency": lambda v: xcs_jax.jit(lambda x: x, max_concurrency=v),
    "jit cache_size": lambda v: xcs_jax.jit(lambda x: x, cache_size=v),
    "spsa n": lambda v: xcs_jax.grad.spsa(v),
    "ensemble n": lambda v: patterns.ensemble(models.bind("fake:echo"),
                                              text.encode("x", 4), n=v,
                                              key=jax.random.key(0)),
    "reinforce num_samples": lambda v: xcs_jax.optim.reinforce(
        lambda c: 0.0, jnp.zeros(2), jax.random.key(0), num_samples=v),
    "minibatches batch_size": lambda v: next(xcs_jax.optim.minibatches(
        {"x": np.zeros(4)}, v)),
    "fit num_epochs": lambda v: xcs_jax.optim.fit(
        lambda *a: None, {}, {}, {"x": np.zeros(4)}, key=jax.random.key(0),
        num_epochs=v, progress=False),
    "early_stopping patience": lambda v: xcs_jax.optim.early_stopping(v),
    "bind output_bytes": lambda v: models.bind("fake:echo", output_bytes=v),
    "bind max_tokens": lambda v: models.bind("fake:echo", max_tokens=v),
    "bind concurrency": lambda v: models.bind("fake:echo", concurrency=v),
    "fake embedding_dim": lambda v: models.bind("fake:echo", embedding_dim=v),
}


NONE_MEANS_DEFAULT = {"jit max_concurrency", "bind concurrency"}


@pytest.mark.parametrize("where", sorted(POSITIVE_INTS))
@pytest.mark.parametrize("value, kind", [
    (0, ValueError), (-3, ValueError), (True, TypeError), (1.5, TypeError),
    ("2", TypeError), (None, TypeError)])
def test_every_positive_int_argument_is_checked_alike(where, value, kind):
  if value is None and where in NONE_MEANS_DEFAULT:
    POSITIVE_INTS[where](value)
    return
  with pytest.raises(kind) as info:
    POSITIVE_INTS[where](value)
  message = str(info.value)
  assert ("must be a positive int" in message or "must be an int in [1, " in message)
  assert f"got {checks.describe(value)}" in message


# --- obscure errors made clear ------------------------------------------------------

def test_lone_surrogates_are_a_value_error_naming_the_string_and_position():
  with pytest.raises(ValueError, match=r"`s\[1\]` .*character 2 \('\\ud800'\)"):
    text.encode(["ok", "ab\ud800"], 8)
  with pytest.raises(ValueError, match="system_prompt.*surrogate"):
    models.bind("fake:echo", system_prompt="\udc80")


def test_encoding_an_array_of_numbers_is_a_type_error_naming_s():
  with pytest.raises(TypeError, match=r"`xcs_jax.text.encode\(s, ...\)` must be a str"):
    text.encode(jnp.zeros(3), 4)


@pytest.mark.parametrize("call", [
    lambda: models.bind("fake:echo")("hello"),
    lambda: models.bind("fake:echo").embed("hello"),
    lambda: xcs_jax.host_op(lambda x: x, out_spec=F32, name="op")("hello"),
    lambda: patterns.majority_vote("hello"),
])
def test_a_str_where_an_array_belongs_names_the_argument(call):
  with pytest.raises(TypeError) as info:
    call()
  message = str(info.value)
  assert "'hello' (str)" in message and "xcs_jax.text.encode" in message


# --- errors under plain jax.jit -----------------------------------------------------

def test_under_jax_jit_the_message_leads_and_the_log_is_one_line(caplog):
  b = models.bind("fake:echo", fail_on="BAD", output_bytes=32)
  f = jax.jit(jax.vmap(lambda x: b(x)))
  caplog.set_level(logging.ERROR, logger="jax._src.callback")
  with pytest.raises(RuntimeError) as info:
    _run(f, jnp.asarray(text.encode(["ok", "BAD"], 16)))
  lines = str(info.value).splitlines()
  # Line 1: XLA's prefix; line 2: the user's line; line 3: our message.
  assert len(lines) == 3, lines
  assert f'File "{__file__}"' in lines[1] and "<lambda>" in lines[1]
  assert lines[2].startswith("XCSExecutionError: generate call to fake:echo(")
  assert "batch item 1" in lines[2] and "injected failure" in lines[2]
  records = [r for r in caplog.records if r.name == "jax._src.callback"]
  assert len(records) == 1
  assert records[0].exc_info is None and "\n" not in records[0].getMessage()
  assert "XCSExecutionError" in records[0].getMessage()
  assert "Traceback" not in caplog.text


def test_under_jax_jit_a_host_op_error_names_its_line_first():
  @xcs_jax.host_op(out_spec=F32, name="lookup")
  def lookup(x):
    raise KeyError("row 7")

  with pytest.raises(RuntimeError) as info:
    _run(jax.jit(lambda x: lookup(x)), 1.0)
  text_ = str(info.value)
  assert len(text_) < 400
  assert text_.splitlines()[2].startswith("XCSExecutionError: host_op call to lookup")


# --- secrets ------------------------------------------------------------------------

SECRET = "sk-xcs-hardening-DISTINCT-93a1"


def _frames(error):
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    tb = error.__traceback__
    while tb is not None:
      yield tb.tb_frame
      tb = tb.tb_next
    error = error.__cause__ or error.__context__


@pytest.mark.parametrize("spec, path", [
    pytest.param("openai:gpt", "/v1", marks=_needs("openai")),
    pytest.param("anthropic:claude", "", marks=_needs("anthropic")),
])
def test_no_library_frame_holds_the_key_as_text(monkeypatch, spec, path):
  monkeypatch.setenv("XCS_TEST_HARDENING_KEY", SECRET)
  with auth_echo_server() as url:
    m = models.bind(spec, api_key_env="XCS_TEST_HARDENING_KEY", base_url=url + path,
                    retries=0, timeout_s=10.0)
    with pytest.raises(xcs_jax.XCSExecutionError) as info:
      m(text.encode("hi", 8))
  ours = [f for f in _frames(info.value) if f.f_code.co_filename.startswith(str(PKG))]
  assert len(ours) > 3
  for frame in ours:
    for name, value in frame.f_locals.items():
      assert SECRET not in repr(value), (frame.f_code.co_name, name)


def test_a_secret_never_shows_itself():
  from xcs_jax._src.providers.sdk import Secret
  s = Secret(SECRET)
  for shown in (repr(s), str(s), f"{s}", repr([s]), repr({"k": s})):
    assert SECRET not in shown
  with pytest.raises(TypeError, match="cannot be pickled"):
    __import__("pickle").dumps(s)
  assert s.reveal() == SECRET and s.redact(f"bad key {SECRET}") == "bad key [redacted]"


_IMPORTS_IN_CALL = """
import sys
sys.path.insert(0, {tests!r})
from auth_echo_server import auth_echo_server
import xcs_jax
from xcs_jax import models, text
spec = {spec!r}
with auth_echo_server() as url:
  m = models.bind(spec, api_key_env=None, base_url=url + {path!r}, retries=0,
                  timeout_s=30.0)
  provider = xcs_jax.current_runtime().provider(spec.split(":")[0])
  call, seen, clients = provider.generate, [], []
  async def watched(*args):
    clients.append(len(provider._clients._clients))
    before = set(sys.modules)
    try:
      return await call(*args)
    finally:
      seen.extend(sorted(set(sys.modules) - before))
  provider.generate = watched
  try:
    m(text.encode("hi", 8))
  except xcs_jax.XCSExecutionError:
    pass
  print(clients[0])
  print(",".join(n for n in seen if n.split(".")[0] == {module!r}))
"""


@pytest.mark.parametrize("spec, path, module", [
    pytest.param("anthropic:claude", "", "anthropic", marks=_needs("anthropic")),
    pytest.param("openai:gpt", "/v1", "openai", marks=_needs("openai")),
])
def test_the_first_call_imports_nothing_of_its_sdk(spec, path, module):
  """A fresh interpreter: the SDK is imported and its client made (which
  imports its HTTP stack: 0.27 s for anthropic's) before the first call's
  deadline starts; nothing of the SDK is imported inside."""
  code = _IMPORTS_IN_CALL.format(tests=str(TESTS), spec=spec, path=path, module=module)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr
  clients_at_entry, imported_inside = (out.stdout.splitlines() + [""])[:2]
  assert int(clients_at_entry) == 1, "the client was made inside the call"
  assert imported_inside == "", f"imported inside the call: {imported_inside}"


def test_import_xcs_jax_imports_no_sdk():
  code = ("import sys, xcs_jax, xcs_jax.models; "
          "print([m for m in ('openai', 'anthropic', 'llama_cpp') if m in sys.modules])")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "[]"
