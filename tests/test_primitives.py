"""Host-call primitives under eager, jit, vmap, grad; abstract eval; concurrency.

Concurrency is checked by construction (a barrier that only opens when the
calls are in flight together, and a counter of calls in flight), never by
wall time.
"""
import inspect
import threading

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xcs_jax
from xcs_jax import models, text
from xcs_jax._src import compat, primitives

from conftest import InFlight, unique_binding

F32 = jax.ShapeDtypeStruct((), jnp.float32)
PROMPTS = ["a", "bb cc", "ddd eee fff", "héllo", "日本", "😀"]


def _n_bytes(t):
  return np.float32(np.count_nonzero(t))


def counting_n_bytes(rec: InFlight | None = None, **kw):
  """A host op giving the byte length of a text row, counting its calls."""
  rec = rec or InFlight()
  op = xcs_jax.host_op(rec.wrap(_n_bytes), out_spec=F32, name=f"n_bytes_{id(rec)}", **kw)
  return op, rec


def _encoded(prompts=PROMPTS, max_len=16):
  return jnp.asarray(text.encode(prompts, max_len))


# --- transforms give the same answers ------------------------------------------

TRANSFORMS = {
    "eager": lambda f: f,
    "jit": jax.jit,
    "vmap_of_rows": lambda f: lambda x: jax.vmap(f)(x),
    "jit_vmap": lambda f: jax.jit(lambda x: jax.vmap(f)(x)),
    "vmap_jit": lambda f: lambda x: jax.vmap(jax.jit(f))(x),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_binding_under_transforms(name):
  upper = models.bind("fake:upper", output_bytes=32)
  out = TRANSFORMS[name](upper)(_encoded())  # eager, jit: a batch in the array
  assert out.shape == (len(PROMPTS), 32)
  assert text.decode(out) == [p.upper() for p in PROMPTS]


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_host_op_under_transforms(name):
  op, rec = counting_n_bytes()
  x = _encoded()
  want = [len(p.encode()) for p in PROMPTS]
  if name in ("eager", "jit"):  # one example at a time
    got = [float(TRANSFORMS[name](op)(row)) for row in x]
  else:
    got = TRANSFORMS[name](op)(x)
  np.testing.assert_array_equal(got, want)
  assert rec.calls == len(PROMPTS)


def test_vmap_binds_once_per_batch():
  echo = models.bind("fake:echo", output_bytes=32)
  jaxpr = jax.make_jaxpr(jax.vmap(echo))(_encoded())
  eqns = [e for e in jaxpr.jaxpr.eqns if primitives.is_host_call(e)]
  assert len(eqns) == 1
  assert eqns[0].params["batch_ndim"] == 1
  assert eqns[0].params["in_batched"] == (True,)


def test_nested_vmap():
  upper = models.bind("fake:upper", output_bytes=16)
  grid = [["ab", "cd", "ef"], ["gh", "ij", "kl"]]
  x = jnp.asarray(text.encode(grid, 8))
  f = jax.vmap(jax.vmap(upper))
  assert text.decode(f(x)) == [[s.upper() for s in row] for row in grid]
  assert text.decode(jax.jit(f)(x)) == [[s.upper() for s in row] for row in grid]
  (eqn,) = [e for e in jax.make_jaxpr(f)(x).jaxpr.eqns if primitives.is_host_call(e)]
  assert eqn.params["batch_ndim"] == 2


def test_nested_vmap_host_op_calls_each_example_once():
  op, rec = counting_n_bytes()
  grid = [["a", "bb", "ccc"], ["dddd", "", "é"]]
  out = jax.jit(jax.vmap(jax.vmap(op)))(jnp.asarray(text.encode(grid, 8)))
  np.testing.assert_array_equal(out, [[1, 2, 3], [4, 0, 2]])
  assert rec.calls == 6


def test_vmap_in_axes_1():
  upper = models.bind("fake:upper", output_bytes=8)
  x = _encoded(["ab", "cd", "ef"], 8)          # [3, 8]
  xt = x.T                                     # [8, 3]: batch on axis 1
  out = jax.jit(jax.vmap(upper, in_axes=1))(xt)
  assert text.decode(out) == ["AB", "CD", "EF"]
  # out_axes too: answers along axis 1.
  out_t = jax.vmap(upper, in_axes=1, out_axes=1)(xt)
  assert out_t.shape == (8, 3) and text.decode(out_t.T) == ["AB", "CD", "EF"]


def test_vmap_with_unbatched_argument():
  """A host op with one batched and one `in_axes=None` argument."""
  rec = InFlight()

  @xcs_jax.host_op(out_spec=F32, name="weighted_len")
  @rec.wrap
  def weighted_len(t, weights):
    return np.float32(np.count_nonzero(t) * weights.sum())

  x = _encoded(["a", "bb", "ccc"], 8)
  w = jnp.array([1.0, 2.0], jnp.float32)
  out = jax.jit(jax.vmap(weighted_len, in_axes=(0, None)))(x, w)
  np.testing.assert_allclose(out, [3.0, 6.0, 9.0])
  assert rec.calls == 3
  # Unbatched operand under nested vmap (batched only at the outer level).
  grid = jnp.stack([x, x])
  f = jax.vmap(jax.vmap(weighted_len, in_axes=(0, None)), in_axes=(0, None))
  np.testing.assert_allclose(f(grid, w), [[3.0, 6.0, 9.0]] * 2)
  # Batched only at the inner level: the outer level broadcasts the weights.
  ws = jnp.array([[1.0, 0.0], [2.0, 2.0]], jnp.float32)
  g = jax.vmap(jax.vmap(weighted_len, in_axes=(None, 0)), in_axes=(0, None))
  np.testing.assert_allclose(g(x, ws), [[1.0, 4.0], [2.0, 8.0], [3.0, 12.0]])


def test_fully_unbatched_call_under_vmap_runs_once():
  """An operand vmap does not map never reaches the batching rule."""
  op, rec = counting_n_bytes()
  row = _encoded(["abcd"], 8)[0]
  out = jax.vmap(lambda _: op(row))(jnp.arange(5))
  np.testing.assert_array_equal(out, [4.0] * 5)
  assert rec.calls == 1


def test_empty_batch_makes_no_calls():
  op, rec = counting_n_bytes()
  echo = unique_binding(output_bytes=12)
  empty = jnp.zeros((0, 8), jnp.uint8)
  assert jax.vmap(op)(empty).shape == (0,)
  assert jax.jit(jax.vmap(echo))(empty).shape == (0, 12)
  assert rec.calls == 0 and echo.usage().calls == 0


def test_mixing_bindings_and_host_ops():
  echo = models.bind("fake:echo", output_bytes=32)
  upper = models.bind("fake:upper", output_bytes=32)
  choose = models.bind("fake:choice", choices=("yes", "no"), output_bytes=8)
  op, rec = counting_n_bytes()

  def pipeline(prompts):
    shouted = upper(echo(prompts))
    verdict = choose(shouted)
    lengths = jax.vmap(op)(shouted) + 2.0 * jax.vmap(op)(verdict)
    return shouted, verdict, jnp.sum(lengths)

  x = _encoded()
  shouted, verdict, total = jax.jit(pipeline)(x)
  assert text.decode(shouted) == [p.upper() for p in PROMPTS]
  verdicts = text.decode(verdict)
  assert set(verdicts) <= {"yes", "no"}
  want = sum(len(p.upper().encode()) + 2 * len(v) for p, v in zip(PROMPTS, verdicts))
  assert float(total) == want
  eager = pipeline(x)
  assert text.decode(eager[1]) == verdicts and float(eager[2]) == want


def test_host_calls_inside_control_flow():
  upper = models.bind("fake:upper", output_bytes=8)
  x = _encoded(["ab", "cd"], 8)
  mapped = jax.jit(lambda xs: jax.lax.map(upper, xs))(x)
  assert text.decode(mapped) == ["AB", "CD"]
  branch = jax.jit(lambda p, c: jax.lax.cond(c, upper, lambda t: t, p))
  assert text.decode(branch(x[0], True)) == "AB"
  assert text.decode(branch(x[0], False)) == "ab"


def test_jit_traces_once():
  echo = models.bind("fake:echo", output_bytes=16)
  traces = []

  @jax.jit
  def f(x):
    traces.append(1)
    return echo(x)

  for _ in range(3):
    f(_encoded())
  assert len(traces) == 1


# --- jaxpr: a pass can find every call site --------------------------------------

def test_jaxpr_carries_binding_and_source_line():
  echo = models.bind("fake:echo", output_bytes=16, latency_s=0.0)
  line = inspect.currentframe().f_lineno + 1
  f = lambda x: echo(x)  # noqa: E731
  jaxpr = jax.make_jaxpr(jax.jit(jax.vmap(f)))(_encoded())
  found = []

  def walk(j):
    for eqn in j.eqns:
      if primitives.is_host_call(eqn):
        found.append(eqn)
      for _, sub in compat.iter_param_jaxprs(eqn.params):
        walk(compat.open_jaxpr(sub))

  walk(jaxpr.jaxpr)
  (eqn,) = found
  assert eqn.params["op"].binding == echo
  assert eqn.params["op"].kind == "generate"
  assert eqn.params["source"].startswith(f"{__file__}:{line} ")


# --- keys ------------------------------------------------------------------------

def test_split_keys_under_vmap_give_independent_samples():
  b = models.bind("fake:choice", choices=tuple("abcdefghijklmnop"), output_bytes=4)
  prompt = _encoded(["pick a letter"], 16)[0]
  keys = jax.random.split(jax.random.key(0), 64)
  f = jax.jit(jax.vmap(lambda k: b(prompt, key=k)))
  answers = text.decode(f(keys))
  assert len(set(answers)) >= 8  # 64 draws from 16 letters
  # Same keys, same answers; eager agrees with jit.
  assert text.decode(f(keys)) == answers
  assert text.decode(jax.vmap(lambda k: b(prompt, key=k))(keys)) == answers
  assert [text.decode(b(prompt, key=k)) for k in keys[:4]] == answers[:4]


def test_same_key_same_answer_different_keys_vary():
  b = models.bind("fake:choice", choices=tuple("abcdefghijklmnop"), output_bytes=4)
  prompts = _encoded(["q"] * 32, 8)
  same = jax.random.key(3)
  one_key = text.decode(b(prompts, key=same))   # one key for the whole batch
  assert len(set(one_key)) == 1
  keys = jax.random.split(same, 32)             # one key per prompt
  per_key = text.decode(b(prompts, key=keys))
  assert len(set(per_key)) > 1
  assert text.decode(jax.vmap(lambda p, k: b(p, key=k))(prompts, keys)) == per_key


# --- autodiff --------------------------------------------------------------------

def test_grad_of_hybrid_loss_is_exact():
  """Float params reach the loss only through tensor ops around the calls."""
  echo = models.bind("fake:echo", output_bytes=32)
  op, _ = counting_n_bytes()
  prompts = _encoded(PROMPTS[:3])
  lengths = np.array([len(p.encode()) for p in PROMPTS[:3]], np.float32)

  def loss(w):
    first = prompts[jnp.argmax(w)]            # params choose a prompt (no gradient)
    answers = echo(prompts)                   # text: no tangent flows
    n = jax.vmap(op)(answers) + 0.0 * op(echo(first))
    return jnp.sum((jnp.tanh(w) * n) ** 2)

  w = jnp.array([0.3, -0.7, 1.1], jnp.float32)
  t = np.tanh(np.asarray(w))
  want = 2.0 * t * (1.0 - t ** 2) * lengths ** 2
  chex.assert_trees_all_close(jax.grad(loss)(w), want, rtol=1e-6)
  chex.assert_trees_all_close(jax.jit(jax.grad(loss))(w), want, rtol=1e-6)
  value, g = jax.jit(jax.value_and_grad(loss))(w)
  chex.assert_trees_all_close(value, np.sum((t * lengths) ** 2), rtol=1e-6)
  chex.assert_trees_all_close(g, want, rtol=1e-6)
  # Per-example gradients through vmap.
  per_example = jax.vmap(jax.grad(lambda wi, p: (wi * op(echo(p))) ** 2))(w, prompts)
  chex.assert_trees_all_close(per_example, 2.0 * np.asarray(w) * lengths ** 2, rtol=1e-6)


def test_float_host_op_without_tangent_input_is_fine_under_grad():
  @xcs_jax.host_op(out_spec=lambda x: x, name="np_square_const")
  def np_square(x):
    return np.square(x)

  c = jnp.array([1.0, 2.0], jnp.float32)
  g = jax.grad(lambda w: jnp.sum(w * np_square(c)))(jnp.ones(2, jnp.float32))
  chex.assert_trees_all_close(g, jnp.array([1.0, 4.0]))
  g = jax.grad(lambda w: jnp.sum(np_square(jax.lax.stop_gradient(w)) * w))(c)
  chex.assert_trees_all_close(g, jnp.array([1.0, 4.0]))


@pytest.mark.parametrize("how", ["grad", "jit_grad", "jvp", "vjp"])
def test_grad_through_float_host_op_raises_no_gradient_error(how):
  @xcs_jax.host_op(out_spec=lambda x: x, name="np_square")
  def np_square(x):
    return np.square(x)

  loss = lambda w: jnp.sum(np_square(w))  # noqa: E731
  w = jnp.ones(3, jnp.float32)
  run = {
      "grad": lambda: jax.grad(loss)(w),
      "jit_grad": lambda: jax.jit(jax.grad(loss))(w),
      "jvp": lambda: jax.jvp(loss, (w,), (w,)),
      "vjp": lambda: jax.vjp(loss, w),
  }[how]
  with pytest.raises(xcs_jax.NoGradientError) as e:
    run()
  msg = str(e.value)
  assert "host_op" in msg and "np_square" in msg and "no gradient rule" in msg
  assert "grad=" in msg  # says how to give it one
  assert __file__ in msg  # the user's line
  # Forward evaluation still works.
  assert float(jax.jit(loss)(w)) == 3.0


# --- abstract evaluation never calls the host -----------------------------------

def test_abstract_eval_makes_no_host_calls():
  op, rec = counting_n_bytes()
  echo = unique_binding(output_bytes=16, latency_s=5.0)  # would be slow if called

  def f(x):
    return jax.vmap(op)(echo(x)), echo(x)

  spec = jax.ShapeDtypeStruct((4, 8), jnp.uint8)
  lens, answers = jax.eval_shape(f, spec)
  assert lens.shape == (4,) and lens.dtype == jnp.float32
  assert answers.shape == (4, 16) and answers.dtype == jnp.uint8
  jax.make_jaxpr(f)(spec)
  jax.jit(f).lower(spec).compile()
  jax.make_jaxpr(jax.grad(lambda w: jnp.sum(w * jax.vmap(op)(echo(_encoded()[:4])))))(
      jnp.ones(4))
  assert rec.calls == 0 and echo.usage().calls == 0


# --- dead-code elimination ---------------------------------------------------------

def test_unused_outputs_are_not_computed_under_jit():
  """Documented semantics: like `jax.pure_callback`, a model call or host op
  is a function of its inputs. Under `jax.jit` a call whose output is unused
  is removed by dead-code elimination and never made (0 host calls); eagerly
  every call runs."""
  op, rec = counting_n_bytes()
  echo = unique_binding(output_bytes=16)
  x = _encoded()

  def f(x):
    echo(x)
    jax.vmap(op)(x)
    return x.sum()

  jax.jit(f)(x).block_until_ready()
  assert rec.calls == 0 and echo.usage().calls == 0
  f(x)
  assert rec.calls == len(PROMPTS) and echo.usage().calls == len(PROMPTS)


# --- concurrency, by construction --------------------------------------------------

def test_vmap_of_64_host_op_calls_runs_them_concurrently():
  rec = InFlight(parties=64)  # opens only when all 64 are in flight together
  op, _ = counting_n_bytes(rec)
  x = _encoded([f"prompt {i}" for i in range(64)])
  out = jax.jit(jax.vmap(op))(x)
  assert rec.peak == 64 and rec.now == 0
  np.testing.assert_array_equal(out, [len(f"prompt {i}") for i in range(64)])


def test_vmap_of_64_fake_calls_runs_them_concurrently(fake_inflight):
  rec = fake_inflight(parties=64)
  echo = models.bind("fake:echo", output_bytes=16, cache=None)
  x = _encoded([f"p{i}" for i in range(64)])
  out = jax.jit(jax.vmap(echo))(x)
  assert rec.peak == 64 and rec.now == 0
  assert text.decode(out) == [f"p{i}" for i in range(64)]


@pytest.mark.parametrize("k", [1, 4])
def test_host_op_concurrency_limit_bounds_calls_in_flight(k):
  rec = InFlight(parties=k)  # each round of k calls must overlap...
  op, _ = counting_n_bytes(rec, concurrency=k)
  jax.jit(jax.vmap(op))(_encoded([f"x{i}" for i in range(4 * k)]))
  assert rec.peak == k  # ...and no more than k ever do
  assert rec.calls == 4 * k


def test_provider_concurrency_limit_bounds_calls_in_flight(fake_inflight):
  rec = fake_inflight(parties=4)
  echo = models.bind("fake:echo", output_bytes=8, concurrency=4, cache=None)
  jax.jit(jax.vmap(echo))(_encoded([f"x{i}" for i in range(16)]))
  assert rec.peak == 4 and rec.calls == 16


def test_limit_holds_across_batches_in_flight_at_once(fake_inflight):
  """Two batches from two threads share the provider's bound."""
  rec = fake_inflight(parties=3)
  echo = models.bind("fake:echo", output_bytes=8, concurrency=3, cache=None)
  f = jax.jit(jax.vmap(echo))
  x = _encoded([f"x{i}" for i in range(6)])
  f(x[:3])  # compile outside the threads
  rec.calls = 0
  results, errors = [], []

  def run():
    try:
      results.append(text.decode(f(x)))
    except Exception as e:  # pragma: no cover - reported below
      errors.append(e)

  threads = [threading.Thread(target=run) for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=60)
  assert not errors and len(results) == 2
  assert rec.peak == 3 and rec.calls == 12
