"""Property-based fuzzing of the public API (hypothesis).

Every input either works, with the value it should have, or raises a
documented error: a bad argument is a `TypeError` / `ValueError` (never an
`XCSError`) whose message names the argument in backticks; a failure of a
call at run time is an `XCSExecutionError` (under plain `jax.jit`, a
`JaxRuntimeError` whose text carries it). Nothing else, and never a silently
wrong value: what works is checked against a reference (text round trips,
host outputs against numpy, echo answers against their prompts).

`make test` runs the fast profile, `make stress` the long one (10,000
examples per property; 1,000 for those that compile a new program per
example). Counts of each outcome are printed at the end of the run.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import xcs_jax
from xcs_jax import models, patterns, text
from xcs_jax.extend import COMMON_PARAMS

from conftest import FIGURES, examples

CHEAP = examples(fast=100)
FUZZ_DEADLINE_S = 0.2   # the longest any fuzzed call may take
COMPILING = examples(fast=20, stress=1_000)

# --- strategies -------------------------------------------------------------------

awkward_chars = st.sampled_from(["\x00", "\ud800", "\udfff", "é", "😀", "\n", " ", "ß"])
texts = st.text(st.one_of(st.characters(codec="utf-8"), awkward_chars), max_size=12)
valid_texts = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)

# Values a hostile user might pass for any parameter.
anything = st.one_of(
    st.none(), st.booleans(), st.integers(-2**40, 2**40),
    st.floats(allow_nan=True, allow_infinity=True), texts,
    st.tuples(texts), st.tuples(st.floats()), st.lists(st.integers(), max_size=2),
    st.just(np.float32(1.5)), st.just(np.int64(3)), st.just(np.zeros(2)),
    st.sampled_from([1e10, float("inf"), -0.0, 1e-300, 2**31, 2**31 - 1, 0, 1, 2, 64]))


def param_values(name: str):
  """Mostly plausible values for parameter `name`, with hostile ones mixed in."""
  plausible = {
      "temperature": st.floats(0, 2), "max_tokens": st.integers(1, 64),
      "output_bytes": st.integers(1, 64), "overflow": st.sampled_from(["error", "truncate"]),
      "timeout_s": st.one_of(st.none(), st.floats(0.5, 60)),
      "retries": st.integers(0, 3), "concurrency": st.one_of(st.none(), st.integers(1, 8)),
      "system_prompt": st.one_of(st.none(), valid_texts), "seed": st.integers(0, 2**31 - 1),
      "latency_s": st.just(0.0), "fail_on": st.one_of(st.none(), valid_texts),
      "transient_failures": st.integers(0, 2),
      "choices": st.lists(valid_texts.filter(bool), min_size=1, max_size=3).map(tuple),
      "option_bias": st.lists(st.floats(-3, 3), max_size=3).map(tuple),
      "embedding_dim": st.integers(1, 16),
  }.get(name, anything)
  return st.one_of(plausible, plausible, anything)


fake_params = st.dictionaries(
    st.sampled_from(sorted(set(COMMON_PARAMS) | {
        "latency_s", "fail_on", "transient_failures", "choices", "option_bias",
        "embedding_dim", "no_such_param"})),
    st.none(), max_size=5).flatmap(
        lambda d: st.fixed_dictionaries({k: param_values(k) for k in d}))

NUMERIC_DTYPES = [np.bool_, np.int8, np.int16, np.int32, np.uint8, np.uint16, np.uint32,
                  np.int64, np.float16, np.float32, np.float64, np.complex64]
small_shapes = hnp.array_shapes(min_dims=0, max_dims=2, max_side=3)

# --- outcome checks ---------------------------------------------------------------


def tally(prop: str, outcome: str) -> None:
  FIGURES[f"fuzz {prop}"][outcome] += 1


def bad_argument(prop: str, error: BaseException, *names: str) -> None:
  """`error` is a documented bad-argument error naming one of `names`."""
  assert isinstance(error, (TypeError, ValueError)), repr(error)
  assert not isinstance(error, xcs_jax.XCSError), repr(error)
  message = str(error)
  assert "`" in message and any(n in message for n in names), message
  tally(prop, type(error).__name__)


def run_failure(prop: str, error: BaseException, mode: str, *parts: str) -> None:
  """`error` is a documented run-time failure of a call (naming `parts`)."""
  if mode == "jax.jit":
    assert isinstance(error, jax.errors.JaxRuntimeError), repr(error)
    assert str(error).splitlines()[2].startswith(("XCSExecutionError", "XCSTimeoutError"))
  else:
    assert isinstance(error, xcs_jax.XCSExecutionError), repr(error)
  for part in parts:
    assert part in str(error), (part, str(error))
  tally(prop, "XCSExecutionError")


# --- text -------------------------------------------------------------------------

nested_texts = st.one_of(
    texts, st.lists(texts, max_size=3),
    st.lists(st.lists(texts, min_size=2, max_size=2), max_size=2),
    st.lists(st.one_of(texts, st.integers(), st.none(), st.binary(max_size=3)), max_size=3),
    st.lists(st.lists(texts, max_size=2), max_size=3),  # possibly ragged
    st.just(jnp.zeros(3)), st.just(np.zeros((2, 2))), st.binary(max_size=4),
    st.dictionaries(texts, texts, max_size=2))


rectangular_texts = st.one_of(
    valid_texts, st.lists(valid_texts, max_size=3),
    st.integers(0, 2).flatmap(lambda n: st.lists(
        st.lists(valid_texts, min_size=n, max_size=n), max_size=2)))


@settings(max_examples=CHEAP)
@given(s=rectangular_texts, max_len=st.integers(1, 24), truncate=st.booleans())
def test_text_encode_round_trips(s, max_len, truncate):
  try:
    arr = text.encode(s, max_len, truncate=truncate)
  except ValueError as e:  # too long for max_len (only without truncate)
    assert not truncate and "raise `max_len`" in str(e)
    bad_argument("text.encode (valid text)", e, "`s")
    return
  tally("text.encode (valid text)", "ok")
  assert arr.dtype == np.uint8 and arr.shape[-1] == max_len
  flat_in = [s] if isinstance(s, str) else list(np.asarray(s, dtype=object).reshape(-1))
  decoded = text.decode(arr.reshape(-1, max_len)) if arr.size else []
  assert len(decoded) == len(flat_in)
  for original, back in zip(flat_in, decoded):
    if truncate:  # cut at a character boundary, never inside one
      assert original.startswith(back) and len(back.encode()) <= max_len
    else:
      assert back == original


@settings(max_examples=CHEAP)
@given(s=nested_texts, max_len=st.one_of(st.integers(-2, 24), anything),
       truncate=st.one_of(st.booleans(), anything))
def test_text_encode_names_bad_arguments(s, max_len, truncate):
  try:
    text.encode(s, max_len, truncate=truncate)
  except (TypeError, ValueError) as e:
    bad_argument("text.encode (any input)", e, "`s", "max_len", "truncate")
    return
  tally("text.encode (any input)", "ok")


@settings(max_examples=CHEAP)
@given(arr=st.one_of(
    hnp.arrays(st.sampled_from(NUMERIC_DTYPES), hnp.array_shapes(min_dims=0, max_dims=3,
                                                                max_side=4)),
    hnp.arrays(np.uint8, hnp.array_shapes(min_dims=1, max_dims=3, max_side=6)),
    anything))
def test_text_decode_never_fails_on_bytes_and_names_bad_input(arr):
  try:
    out = text.decode(arr)
  except TypeError as e:
    bad_argument("text.decode", e, "arr")
    return
  tally("text.decode", "ok")
  a = np.asarray(arr)
  assert a.dtype == np.uint8 and a.ndim >= 1
  assert isinstance(out, str) if a.ndim == 1 else isinstance(out, list)


# --- bindings ---------------------------------------------------------------------

@settings(max_examples=CHEAP)
@given(model=st.sampled_from(["echo", "upper", "choice"]), params=fake_params,
       prompt=valid_texts)
def test_bind_accepts_only_what_a_call_can_use(model, params, prompt):
  """A binding that `bind` accepts works when called (or fails as a call)."""
  try:
    b = models.bind(f"fake:{model}", **params)
  except (TypeError, ValueError) as e:
    names = list(params) + ["provider:model"]
    bad_argument("bind", e, *names)
    return
  hash(b), str(b), repr(b)
  # The call may rightly take as long as its parameters say (a latency of
  # 1e9 s, retries of a 1e-300 s timeout until `deadline_s`): a short deadline
  # keeps every example quick and turns those into timeouts, which are failures
  # of the call like any other.
  if b.get("deadline_s") is None or b.get("deadline_s") > FUZZ_DEADLINE_S:
    b = b.replace(deadline_s=FUZZ_DEADLINE_S)
  max_len = max(1, len(prompt.encode()))
  try:
    # A runtime per example: an endpoint's rate limit (`rpm=1`) holds for every
    # later binding of it in the runtime, and the cache would answer repeats.
    with xcs_jax.runtime(name="fuzz-bind"):
      out = text.decode(b(text.encode(prompt, max_len)))
  except xcs_jax.XCSExecutionError as e:
    run_failure("bind", e, "eager", "generate call to fake:")
    return
  tally("bind", "ok")
  answers = {"echo": [prompt], "upper": [prompt.upper()], "choice": b.get("choices")}[model]
  cap = b.get("output_bytes")  # an answer that fits, or (overflow='truncate') its prefix
  assert any(out == text.decode(text.encode(a, cap, truncate=True)) for a in answers)


@settings(max_examples=CHEAP)
@given(spec=st.one_of(texts, anything, st.sampled_from(
    ["fake:echo", "fake:", ":echo", "nope:echo", "fake:nope", "fake:echo:x"])))
def test_bind_spec(spec):
  try:
    models.bind(spec)
  except (TypeError, ValueError) as e:
    bad_argument("bind spec", e, "spec", "provider", "model")
    return
  tally("bind spec", "ok")


@settings(max_examples=CHEAP)
@given(options=st.one_of(st.lists(texts, max_size=4).map(tuple), anything),
       prompt=valid_texts)
def test_score_options_gives_log_probabilities_or_names_options(options, prompt):
  b = models.bind("fake:echo")
  try:
    scores = np.asarray(b.score_options(text.encode(prompt, 16, truncate=True), options))
  except (TypeError, ValueError) as e:
    bad_argument("score_options", e, "options")
    return
  tally("score_options", "ok")
  assert scores.shape == (len(options),) and np.all(scores <= 0)
  assert math.isclose(float(np.logaddexp.reduce(scores.astype(np.float64))), 0.0,
                      abs_tol=1e-5)


# --- calls under transformations ----------------------------------------------------

TRANSFORMS = {
    "eager": lambda f: f,
    "jax.jit": jax.jit,
    "xcs_jax.jit": xcs_jax.jit,
    "vmap": jax.vmap,
    "jit(vmap)": lambda f: jax.jit(jax.vmap(f)),
    "xcs_jax.jit(vmap)": lambda f: xcs_jax.jit(jax.vmap(f)),
}


@settings(max_examples=COMPILING)
@given(batch=st.lists(valid_texts, min_size=1, max_size=4),
       transform=st.sampled_from(sorted(TRANSFORMS)), rows=st.sampled_from([1, 2]))
def test_echo_answers_are_their_prompts_under_every_transformation(batch, transform, rows):
  b = models.bind("fake:echo", output_bytes=64)
  prompts = text.encode([batch] * rows, 48)
  f = TRANSFORMS[transform](b)
  if transform in ("vmap", "jit(vmap)", "xcs_jax.jit(vmap)"):
    out = text.decode(jax.vmap(f)(prompts) if prompts.ndim == 3 else f(prompts))
  else:
    out = text.decode(f(prompts))
  assert out == [batch] * rows
  tally("transformations", "ok")


# --- host_op ------------------------------------------------------------------------

returned_values = st.one_of(
    hnp.arrays(st.sampled_from(NUMERIC_DTYPES), st.sampled_from([(), (2,)]),
               elements=None),
    st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(), st.just("text"), st.none())


def _reference(value, dtype, shape):
  """What the host op must return for `value`, or None if it must fail."""
  x = np.asarray(value)
  if x.dtype.kind not in "biufc" or x.shape != shape:
    return None
  kind_ok = np.can_cast(x.dtype, dtype, "same_kind") or (
      x.dtype.kind in "biu" and dtype.kind in "iu")
  if not kind_ok:
    return None
  with np.errstate(all="ignore"):
    cast = x.astype(dtype)
  if dtype.kind in "iu" and x.dtype.kind in "biu":
    info = np.iinfo(dtype)
    if np.any((x < info.min) | (x > info.max)):
      return None
  if dtype.kind in "fc" and np.any(np.isfinite(x) & ~np.isfinite(cast)):
    return None
  return cast


@settings(max_examples=COMPILING)
@given(value=returned_values, dtype=st.sampled_from(NUMERIC_DTYPES),
       shape=st.sampled_from([(), (2,)]), mode=st.sampled_from(["eager", "xcs_jax.jit",
                                                                  "jax.jit"]))
def test_host_op_outputs_are_exact_or_a_named_error(value, dtype, shape, mode):
  dtype = np.dtype(dtype)
  op = xcs_jax.host_op(lambda x: value, out_spec=jax.ShapeDtypeStruct(shape, dtype),
                       name="fuzzed")
  f = {"eager": op, "xcs_jax.jit": xcs_jax.jit(op), "jax.jit": jax.jit(op)}[mode]
  try:
    out = np.asarray(jax.block_until_ready(f(jnp.float32(1))))
  except ValueError as e:
    if isinstance(e, xcs_jax.XCSError):
      raise
    assert jax.dtypes.canonicalize_dtype(dtype) != dtype  # 64-bit without x64
    bad_argument("host_op outputs", e, "out_spec")
    return
  except (xcs_jax.XCSExecutionError, jax.errors.JaxRuntimeError) as e:
    assert _reference(value, dtype, shape) is None, (value, dtype)
    run_failure("host_op outputs", e, mode, "host_op call to fuzzed")
    return
  want = _reference(value, dtype, shape)
  assert want is not None, (value, dtype, out)
  np.testing.assert_array_equal(out, want)
  tally("host_op outputs", "ok")


pytrees = st.recursive(
    hnp.arrays(st.sampled_from([np.float32, np.int32, np.uint8, np.bool_]), small_shapes),
    lambda children: st.one_of(st.lists(children, max_size=2).map(tuple),
                               st.dictionaries(st.sampled_from("abc"), children,
                                               max_size=2)),
    max_leaves=4)


@settings(max_examples=COMPILING)
@given(tree=pytrees, mode=st.sampled_from(["eager", "xcs_jax.jit", "jax.jit", "vmap"]))
def test_host_op_carries_any_pytree(tree, mode):
  leaves = jax.tree_util.tree_leaves(tree)
  assume(leaves and (mode != "vmap" or all(np.ndim(l) >= 1 and np.shape(l)[0] ==
                                           np.shape(leaves[0])[0] for l in leaves)))
  op = xcs_jax.host_op(lambda t: t, out_spec=lambda t: t, name="identity")
  f = {"eager": op, "xcs_jax.jit": xcs_jax.jit(op), "jax.jit": jax.jit(op),
       "vmap": jax.vmap(op)}[mode]
  out = f(tree)
  assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(tree)
  for a, b in zip(jax.tree_util.tree_leaves(out), leaves):
    np.testing.assert_array_equal(np.asarray(a), b)
  tally("host_op pytrees", "ok")


@settings(max_examples=CHEAP)
@given(arg=st.one_of(anything, st.just({"a": "text"}), st.just([np.zeros(2), None])))
def test_host_op_arguments_are_arrays_or_a_named_error(arg):
  op = xcs_jax.host_op(lambda t: np.float32(0), out_spec=jax.ShapeDtypeStruct(
      (), jnp.float32), name="takes_arrays")
  try:
    op(arg)
  except (TypeError, ValueError) as e:
    bad_argument("host_op arguments", e, "takes_arrays(args")
    return
  tally("host_op arguments", "ok")


@settings(max_examples=CHEAP)
@given(kw=st.fixed_dictionaries({}, optional={
    "vectorized": anything, "name": anything, "concurrency": anything,
    "timeout_s": anything, "grad": anything, "retries": anything}))
def test_host_op_options(kw):
  try:
    xcs_jax.host_op(lambda x: x, out_spec=jax.ShapeDtypeStruct((), jnp.float32), **kw)
  except (TypeError, ValueError) as e:
    bad_argument("host_op options", e, *kw)
    return
  tally("host_op options", "ok")


# --- jit, patterns, optim, estimators, runtime ------------------------------------------

def _two_args(x, y=1):
  return x


@settings(max_examples=CHEAP)
@given(kw=st.fixed_dictionaries({}, optional={
    "static_argnums": st.one_of(st.integers(-3, 3), st.tuples(st.integers(-3, 3)),
                                anything),
    "static_argnames": st.one_of(st.sampled_from(["x", "y", "z"]), anything),
    "max_concurrency": anything, "cache_size": anything}))
def test_jit_options(kw):
  try:
    f = xcs_jax.jit(_two_args, **kw)
  except (TypeError, ValueError) as e:
    bad_argument("jit options", e, *kw)
    return
  tally("jit options", "ok")
  assert float(f(1.0, 2.0)) == 1.0


FACTORIES = {
    "spsa": lambda kw: xcs_jax.grad.spsa(**kw),
    "central": lambda kw: xcs_jax.grad.central(**{k: v for k, v in kw.items()
                                                  if k == "step"}),
    "early_stopping": lambda kw: xcs_jax.optim.early_stopping(**kw),
    "ensemble": lambda kw: patterns.ensemble(models.bind("fake:echo"), text.encode("x", 4),
                                             **kw),
    "runtime": lambda kw: xcs_jax.runtime(**kw).close(),
    "minibatches": lambda kw: list(xcs_jax.optim.minibatches({"x": np.zeros(4)}, **kw)),
}
FACTORY_ARGS = {
    "spsa": ("n", "step", "seed"), "central": ("step",),
    "early_stopping": ("patience", "monitor", "mode", "min_delta", "restore_best"),
    "ensemble": ("n", "key"), "runtime": ("name", "cancel_grace_s"),
    "minibatches": ("batch_size", "key", "drop_remainder"),
}
REQUIRED = {"early_stopping": ("patience",), "ensemble": ("n", "key"),
            "minibatches": ("batch_size",)}


@settings(max_examples=CHEAP)
@given(data=st.data(), which=st.sampled_from(sorted(FACTORIES)))
def test_estimators_patterns_optim_and_runtime_options(data, which):
  values = st.one_of(anything, st.integers(1, 4), st.floats(0.01, 0.5),
                     st.just(jax.random.key(0)), st.sampled_from(["min", "max", "loss"]))
  required = REQUIRED.get(which, ())
  kw = data.draw(st.fixed_dictionaries(
      {k: values for k in required},
      optional={k: values for k in FACTORY_ARGS[which] if k not in required}))
  try:
    FACTORIES[which](kw)
  except (TypeError, ValueError) as e:
    bad_argument(f"options of {which}", e, *kw)
    return
  tally(f"options of {which}", "ok")


@pytest.mark.parametrize("unused", [None])
def test_the_fuzz_suite_counted_its_outcomes(unused):
  """Runs last in this file: every property above recorded an outcome."""
  assert sum(len(c) for k, c in FIGURES.items() if k.startswith("fuzz ")) > 0
