"""The calibration loop of examples/calibrate_classifier.py, on `fake` and the local model."""
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xcs_jax import models, text

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "examples",
                     "calibrate_classifier.py")
_spec = importlib.util.spec_from_file_location("calibrate_classifier", _PATH)
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)

OPTIONS = ("good", "bad")


def _fake_scores(texts):
  """`fake` scores with a built-in preference for "bad": by the fake rule the
  option named in the text gets +2, the jitter is < 1, and the bias gives "bad"
  +3, so the raw argmax says "bad" for every text."""
  b = models.bind("fake:echo", option_bias=(0.0, 3.0))
  return np.asarray(jax.jit(lambda p: b.score_options(p, OPTIONS))(text.encode(texts, 48)))


def _fake_split(n, offset):
  texts = [f"review {offset + i}: the soup was {OPTIONS[i % 2]}" for i in range(n)]
  return texts, np.arange(n, dtype=np.int32) % 2


def test_calibration_on_fake_fixes_a_label_bias_deterministically():
  train_texts, train_y = _fake_split(20, 0)
  test_texts, test_y = _fake_split(30, 100)
  train, test = _fake_scores(train_texts), _fake_scores(test_texts)
  assert example.accuracy(test.argmax(-1), test_y) == 0.5  # always "bad"

  params, losses = example.fit_calibration(train, train_y, steps=200, progress=False)
  assert losses.shape == (200,)
  assert losses[-1] < 0.25 * losses[0]
  assert np.all(np.diff(losses[:20]) < 0)  # adam descends steadily at first
  calibrated = np.asarray(example.calibrated_logits(params, test)).argmax(-1)
  assert example.accuracy(calibrated, test_y) == 1.0
  assert float(params.bias[0] - params.bias[1]) > 0  # it learned to favour "good"

  again, losses_again = example.fit_calibration(train, train_y, steps=200, progress=False)
  np.testing.assert_array_equal(losses, losses_again)
  np.testing.assert_array_equal(params.bias, again.bias)


def test_calibration_gradient_matches_finite_differences():
  train_texts, train_y = _fake_split(8, 0)
  scores, y = jnp.asarray(_fake_scores(train_texts)), jnp.asarray(train_y)
  params = example.Calibration(jnp.array([0.2, -0.1]), jnp.float32(0.3))
  grads = jax.grad(example.calibration_loss)(params, scores, y)
  eps = 1e-3
  for k in range(2):
    e = jnp.zeros(2).at[k].set(eps)
    up = example.calibration_loss(params._replace(bias=params.bias + e), scores, y)
    down = example.calibration_loss(params._replace(bias=params.bias - e), scores, y)
    np.testing.assert_allclose(grads.bias[k], (up - down) / (2 * eps), rtol=2e-2, atol=1e-4)


def test_parse_label():
  assert example.parse_label("Positive.") == 0
  assert example.parse_label("The sentiment is negative") == 1
  assert example.parse_label("positive or negative") == -1
  assert example.parse_label("nonpositive") == -1
  assert example.parse_label("") == -1


def test_dataset_is_balanced_and_split():
  data = example.load_dataset()
  assert len(data["train"].texts) + len(data["test"].texts) >= 200
  for split in data.values():
    assert np.bincount(split.labels).tolist() == [len(split.labels) // 2] * 2
  assert not set(data["train"].texts) & set(data["test"].texts)
  small = example.load_dataset(limit=3)
  assert [len(s.texts) for s in small.values()] == [6, 6]


def test_example_runs_end_to_end_on_fake(capsys):
  results = example.main(["--model", "fake:echo", "--steps", "20", "--limit", "4"])
  assert set(results) == {"generated answer, parsed", "argmax of option log-probs",
                          "calibrated (bias + temperature)"}
  out = capsys.readouterr().out
  assert "held-out accuracy (8 items)" in out and "calibrated" in out


@pytest.mark.local_model
def test_calibration_on_the_local_model_separates_a_handful_of_reviews():
  pytest.importorskip("llama_cpp")
  data = example.load_dataset(limit=3)  # 6 train, 6 held-out reviews
  b = models.bind("local:smollm2")
  score = jax.jit(lambda p: b.score_options(p, example.LABELS))
  train = np.asarray(score(example.encode_prompts(data["train"].texts)))
  test = np.asarray(score(example.encode_prompts(data["test"].texts)))
  assert train.shape == (6, 2) and np.isfinite(train).all() and (train <= 0).all()
  np.testing.assert_array_equal(
      test, np.asarray(score(example.encode_prompts(data["test"].texts))))
  params, losses = example.fit_calibration(train, data["train"].labels, steps=100,
                                           progress=False)
  assert losses[-1] < losses[0]
  # The margin positive - negative is higher for every positive review than
  # for every negative one on these items, so a learned bias can split them.
  margin = train[:, 0] - train[:, 1]
  y = data["train"].labels
  assert margin[y == 0].min() > margin[y == 1].max()
