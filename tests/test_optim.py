"""xcs_jax.optim: steps, minibatches, fit, early stopping, checkpoints, REINFORCE."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import xcs_jax
from xcs_jax import optim

EAGER = lambda f: f  # noqa: E731  (a `jit=` that compiles nothing)


def regression_data(n=64, d=3, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  w = np.arange(1.0, d + 1, dtype=np.float32)
  return {"x": x, "y": x @ w + 0.5}, w


def mse_loss(params, batch, key):
  del key
  pred = batch["x"] @ params["w"] + params["b"]
  err = pred - batch["y"]
  return jnp.mean(err ** 2), {"mae": jnp.mean(jnp.abs(err))}


def fresh(d=3):
  return {"w": jnp.zeros(d), "b": jnp.zeros(())}


# ------------------------------------------------------------------ step and fit


def test_step_counts_one_compile_and_improves():
  data, _ = regression_data()
  opt = optax.adam(0.1)
  traces = []

  def loss(params, batch, key):
    traces.append(1)
    return mse_loss(params, batch, key)

  step = jax.jit(optim.make_step(loss, opt))
  params = fresh()
  state = opt.init(params)
  before = float(mse_loss(params, data, None)[0])
  for epoch in range(5):
    for i, batch in enumerate(optim.minibatches(data, 16, key=jax.random.key(epoch))):
      out = step(params, state, batch, jax.random.key(i))
      params, state = out.params, out.opt_state
  assert len(traces) == 1  # one shape, one compile
  assert float(mse_loss(params, data, None)[0]) < 0.5 * before
  assert set(out.metrics) == {"mae"}


def test_fit_improves_a_synthetic_objective_deterministically():
  data, w = regression_data()
  opt = optax.adam(0.1)
  runs = []
  for _ in range(2):
    params = fresh()
    res = optim.fit(optim.make_step(mse_loss, opt), params, opt.init(params), data,
                    key=jax.random.key(1), num_epochs=25, batch_size=16, progress=False)
    runs.append(res)
  a, b = runs
  assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]  # bitwise
  assert a.history[-1]["loss"] < 0.05 * a.history[0]["loss"]
  np.testing.assert_allclose(a.params["w"], w, atol=0.1)
  assert a.history[-1]["steps"] == 25 * 4 and "mae" in a.history[-1]


def test_fit_through_a_host_op_with_an_estimator():
  target = np.array([1.0, -2.0, 0.5], np.float32)

  def distance(x):  # a black box on the host
    return np.float32(np.sum((x - target) ** 2))

  op = xcs_jax.host_op(distance, out_spec=jax.ShapeDtypeStruct((), jnp.float32),
                       grad="central")

  def loss(params, batch, key):
    return op(params), {}

  opt = optax.sgd(0.25)
  params = jnp.zeros(3)
  res = optim.fit(optim.make_step(loss, opt), params, opt.init(params),
                  {"i": np.arange(4)}, key=jax.random.key(0), num_epochs=30,
                  progress=False, jit=jax.jit)
  np.testing.assert_allclose(res.params, target, atol=1e-3)


def test_fit_progress_bar_shows_loss_and_metric(capsys):
  data, _ = regression_data(n=16)
  opt = optax.sgd(0.01)
  optim.fit(optim.make_step(mse_loss, opt), fresh(), opt.init(fresh()), data,
            key=jax.random.key(0), num_epochs=2, batch_size=8, desc="train",
            eval_fn=lambda p: {"val": 1.0})
  err = capsys.readouterr().err
  assert "train" in err and "loss=" in err and "mae=" in err and "val=" in err


def test_fit_under_xcs_jax_jit_matches_jax_jit():
  if not hasattr(xcs_jax, "jit"):
    pytest.skip("xcs_jax.jit not present")
  data, _ = regression_data(n=32)
  opt = optax.adam(0.05)
  results = [optim.fit(optim.make_step(mse_loss, opt), fresh(), opt.init(fresh()), data,
                       key=jax.random.key(3), num_epochs=3, batch_size=8, progress=False,
                       jit=j) for j in (jax.jit, xcs_jax.jit)]
  np.testing.assert_allclose(results[0].params["w"], results[1].params["w"], rtol=1e-5)


# ------------------------------------------------------------------ early stopping


def test_early_stopping_stops_and_restores_the_best():
  data, _ = regression_data(n=16)
  opt = optax.sgd(0.05)
  evals = iter([3.0, 2.0, 1.0, 1.5, 1.2, 1.1, 0.5])  # best at epoch 2, then 3 worse
  seen = []

  def eval_fn(params):
    seen.append(params)
    return {"val_loss": next(evals)}

  res = optim.fit(optim.make_step(mse_loss, opt), fresh(), opt.init(fresh()), data,
                  key=jax.random.key(0), num_epochs=7, eval_fn=eval_fn, progress=False,
                  early_stopping=optim.early_stopping(3, monitor="val_loss"), jit=EAGER)
  assert res.stopped_early and len(res.history) == 6 and res.best_epoch == 2
  assert res.params is seen[2]


def test_early_stopping_pure_functions():
  es = optim.early_stopping(2, mode="max", min_delta=0.1)
  state = es.init()
  state, improved, stop = es.update(0.5, state)
  assert improved and not stop
  state, improved, stop = es.update(0.55, state)  # below min_delta
  assert not improved and not stop
  state, improved, stop = es.update(float("nan"), state)
  assert not improved and stop and state.best == 0.5 and state.best_epoch == 0


# ------------------------------------------------------------------ checkpoints


def test_save_restore_round_trip_with_optax_state(tmp_path):
  opt = optax.adam(0.1)
  data, _ = regression_data(n=16)
  res = optim.fit(optim.make_step(mse_loss, opt), fresh(), opt.init(fresh()), data,
                  key=jax.random.key(0), num_epochs=2, progress=False)
  tree = {"params": res.params, "opt_state": res.opt_state, "step": 8,
          "key": jax.random.key(5)}
  path = tmp_path / "state.npz"
  optim.save(path, tree)
  like = {"params": fresh(), "opt_state": opt.init(fresh()), "step": 0,
          "key": jax.random.key(0)}
  back = optim.restore(path, like=like)
  for got, want in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(tree)):
    if jax.dtypes.issubdtype(getattr(want, "dtype", np.float32), jax.dtypes.prng_key):
      got, want = jax.random.key_data(got), jax.random.key_data(want)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tree)
  # Training continues from the restored state exactly as from the original.
  step = jax.jit(optim.make_step(mse_loss, opt))
  batch = jax.tree_util.tree_map(lambda a: a[:8], data)
  a = step(tree["params"], tree["opt_state"], batch, jax.random.key(0))
  b = step(back["params"], back["opt_state"], batch, jax.random.key(0))
  np.testing.assert_array_equal(a.params["w"], b.params["w"])


def test_plain_trees_restore_without_a_template(tmp_path):
  tree = {"logits": np.arange(4.0), "meta": (np.int32(3), None, [np.ones(2)])}
  optim.save(tmp_path / "t.npz", tree)
  back = optim.restore(tmp_path / "t.npz")
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tree)
  np.testing.assert_array_equal(back["logits"], tree["logits"])


def test_restore_errors(tmp_path):
  opt = optax.adam(0.1)
  optim.save(tmp_path / "s.npz", opt.init(fresh()))
  with pytest.raises(ValueError, match="pass `like=`"):
    optim.restore(tmp_path / "s.npz")
  with pytest.raises(ValueError, match="structure"):
    optim.restore(tmp_path / "s.npz", like=fresh())
  with pytest.raises(ValueError, match="shape"):
    optim.restore(tmp_path / "s.npz", like=opt.init(fresh(d=4)))
  np.savez(tmp_path / "other.npz", a=np.ones(2))
  with pytest.raises(ValueError, match="not written by"):
    optim.restore(tmp_path / "other.npz")


# ------------------------------------------------------------------ REINFORCE


def test_score_function_gradient_is_unbiased():
  losses_per_choice = jnp.array([1.0, 0.2, 0.6, 0.9])
  logits = jnp.array([0.5, -0.2, 0.1, 0.0])
  exact = jax.grad(lambda l: jax.nn.softmax(l) @ losses_per_choice)(logits)

  def estimate(key):
    return jax.grad(lambda l: optim.reinforce(lambda c: losses_per_choice[c], l, key,
                                              num_samples=64).loss)(logits)

  est = jax.jit(jax.vmap(estimate))(jax.random.split(jax.random.key(0), 200)).mean(0)
  np.testing.assert_allclose(est, exact, atol=0.01)


def test_surrogate_value_is_the_mean_sampled_loss():
  out = optim.reinforce(lambda c: c.astype(jnp.float32), jnp.zeros(3), jax.random.key(0),
                        num_samples=6)
  assert out.choices.shape == (6,) and out.losses.shape == (6,)
  np.testing.assert_allclose(out.loss, out.losses.mean())


def test_continuous_params_get_their_exact_gradient_beside_the_estimate():
  def surrogate(params):
    out = optim.reinforce(lambda c: c.astype(jnp.float32) + (params["bias"] - 2.0) ** 2,
                          params["logits"], jax.random.key(0), num_samples=4)
    return out.loss

  g = jax.grad(surrogate)({"logits": jnp.zeros(3), "bias": jnp.float32(0.5)})
  np.testing.assert_allclose(g["bias"], 2 * (0.5 - 2.0), rtol=1e-6)
  assert np.abs(np.asarray(g["logits"])).sum() > 0


def test_reinforce_with_adam_finds_the_best_of_several_slots():
  # Two independent choices (e.g. instruction and demo), each among 4.
  table = jnp.array([[0.9, 0.1, 0.8, 0.7], [0.5, 0.6, 0.0, 0.9]])

  def loss_fn(logits, batch, key):
    out = optim.reinforce(lambda c: table[jnp.arange(2), c].sum(), logits, key,
                          num_samples=8)
    return out.loss, {}

  opt = optax.adam(0.3)
  logits = jnp.zeros((2, 4))
  res = optim.fit(optim.make_step(loss_fn, opt), logits, opt.init(logits),
                  {"i": np.arange(1)}, key=jax.random.key(0), num_epochs=60,
                  progress=False, jit=jax.jit)
  assert optim.greedy_choice(res.params).tolist() == [1, 2]


def test_reinforce_bad_inputs():
  with pytest.raises(ValueError, match="at least 2 samples"):
    optim.reinforce(lambda c: 1.0 * c, jnp.zeros(3), jax.random.key(0), num_samples=1)
  with pytest.raises(ValueError, match="baseline"):
    optim.reinforce(lambda c: 1.0 * c, jnp.zeros(3), jax.random.key(0), baseline="ema")
  with pytest.raises(TypeError, match="float array"):
    optim.reinforce(lambda c: 1.0 * c, jnp.zeros(3, jnp.int32), jax.random.key(0))
  with pytest.raises(ValueError, match="scalar loss per choice"):
    optim.reinforce(lambda c: jnp.ones(2), jnp.zeros(3), jax.random.key(0))


# ------------------------------------------------------------------ bad inputs


def test_bad_inputs_are_clear_errors():
  opt = optax.sgd(0.1)
  with pytest.raises(TypeError, match="GradientTransformation"):
    optim.make_step(mse_loss, lambda g: g)
  with pytest.raises(TypeError, match="callable"):
    optim.make_step(3, opt)
  with pytest.raises(ValueError, match="same leading"):
    list(optim.minibatches({"x": np.ones((4, 2)), "y": np.ones(3)}, 2))
  with pytest.raises(ValueError, match="larger than the dataset"):
    list(optim.minibatches({"x": np.ones(4)}, 8))
  with pytest.raises(ValueError, match="patience"):
    optim.early_stopping(0)
  data, _ = regression_data(n=8)
  step = optim.make_step(mse_loss, opt)
  with pytest.raises(ValueError, match="num_epochs"):
    optim.fit(step, fresh(), opt.init(fresh()), data, key=jax.random.key(0), num_epochs=0)
  with pytest.raises(KeyError, match="'acc'.*lacks"):
    optim.fit(step, fresh(), opt.init(fresh()), data, key=jax.random.key(0),
              progress=False, early_stopping=optim.early_stopping(1, monitor="acc"),
              jit=EAGER)


def test_minibatches_cover_the_data_once_per_epoch():
  data = {"i": np.arange(10)}
  seen = np.concatenate([b["i"] for b in optim.minibatches(data, 3, key=jax.random.key(0))])
  assert len(seen) == 9 and len(set(seen.tolist())) == 9
  tail = list(optim.minibatches(data, 3, drop_remainder=False))
  assert [len(b["i"]) for b in tail] == [3, 3, 3, 1]


# ------------------------------------------------------------------ continuous params


@pytest.mark.parametrize("estimator", ["central", "spsa"])
def test_ensemble_weights_learned_through_an_estimator(estimator):
  """Softmax weights over 3 model calls, pooled by a host-side evaluator."""
  labels = ("red", "blue")
  y = np.arange(12) % 2
  seen = [f"the color is {labels[t]} today" for t in y]       # member 0 sees the answer
  blind = [f"item number {i}" for i in range(12)]             # members 1, 2 do not
  llm = xcs_jax.models.bind("fake:echo")

  @jax.jit
  def members(a, b):
    return jnp.stack([jax.nn.log_softmax(llm.score_options(p, labels), axis=-1)
                      for p in (a, b, b)], axis=1)              # [N, 3, 2]

  member_logp = np.asarray(members(xcs_jax.text.encode(seen, 32),
                                   xcs_jax.text.encode(blind, 32)))

  def pooled_nll(theta, logp, labels_):
    w = np.exp(theta - theta.max())
    z = np.einsum("k,bkc->bc", w / w.sum(), logp) * 3.0
    z = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return np.float32(-np.take_along_axis(z, labels_[:, None], 1).mean())

  evaluator = xcs_jax.host_op(pooled_nll, out_spec=jax.ShapeDtypeStruct((), jnp.float32),
                              grad=estimator)
  opt = optax.adam(0.2)
  theta = jnp.zeros(3)
  res = optim.fit(optim.make_step(lambda p, b, k: (evaluator(p, b["m"], b["y"]), {}), opt),
                  theta, opt.init(theta), {"m": member_logp, "y": y},
                  key=jax.random.key(0), num_epochs=25, progress=False, jit=jax.jit)
  w = np.asarray(jax.nn.softmax(res.params))
  assert w[0] > 0.8, w
  assert res.history[-1]["loss"] < 0.7 * res.history[0]["loss"]


# ------------------------------------------------------------------ review fixes


def test_fit_per_step_postfix_does_not_force_a_redraw(monkeypatch):
  from xcs_jax._src.optim import loop
  refreshes = []

  class Recording(loop.tqdm):
    def set_postfix(self, *args, refresh=True, **kwargs):
      refreshes.append(refresh)
      return super().set_postfix(*args, refresh=refresh, **kwargs)

  monkeypatch.setattr(loop, "tqdm", Recording)
  data, _ = regression_data(n=16)
  opt = optax.sgd(0.01)
  optim.fit(optim.make_step(mse_loss, opt), fresh(), opt.init(fresh()), data,
            key=jax.random.key(0), num_epochs=2, batch_size=4, jit=jax.jit)
  assert refreshes.count(False) == 2 * 4  # every step: no forced redraw
  assert refreshes.count(True) == 2       # one redraw per epoch, with its record


def test_loss_fn_returning_a_bare_scalar_is_a_clear_error():
  opt = optax.sgd(0.1)
  step = optim.make_step(lambda p, b, k: jnp.sum(p ** 2), opt)
  with pytest.raises(TypeError, match=r"`loss_fn` must return `\(loss, metrics\)`; "
                                      r"return `\(loss, \{\}\)`"):
    step(jnp.ones(2), opt.init(jnp.ones(2)), None, jax.random.key(0))


def test_fit_without_a_key_says_what_key_must_be():
  opt = optax.sgd(0.1)
  with pytest.raises(TypeError, match=r"fit\(key=...\).*PRNG key.*jax\.random\.key\(0\)"):
    optim.fit(optim.make_step(mse_loss, opt), fresh(), opt.init(fresh()),
              regression_data(n=8)[0], key=None, progress=False)
