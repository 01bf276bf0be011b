"""Softmax heads over features, fit with optax, L2 chosen by cross-validation.

Two heads, one fitting path:

- `'linear'`: multinomial logistic regression, `logits = standardize(x) @ w + b`,
  minimizing mean cross-entropy + `l2 * ||w||^2`;
- `'calibration'`: a per-class bias and one temperature over K option
  log-probabilities, `logits = x / exp(log_t) + b` (no penalty), the
  calibration of examples/calibrate_classifier.py.

Both are fit full batch with `optax.adam` for a fixed number of steps (the
problems are small and convex). The fits of one cross-validation fold, one
per L2 strength, run as ONE vmapped, jitted optimization; a fold is a 0/1
weight per training example, so every fold's fits share one shape, and
feature widths are padded to a few sizes, so a run compiles a few times.
A fitted head of either kind is a `LinearHead`.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

KINDS = ("linear", "calibration")
DEFAULT_L2_GRID = tuple(float(x) for x in np.logspace(-4, 1, 11))
DEFAULT_FOLDS = 5
DEFAULT_STEPS = 500
LEARNING_RATE = 0.05


class Standardizer(NamedTuple):
  """Per-feature shift and scale, from training data only (numpy, float32)."""
  mean: np.ndarray   # [F]
  scale: np.ndarray  # [F]

  def __call__(self, x: np.ndarray) -> np.ndarray:
    return ((np.asarray(x, np.float32) - self.mean) / self.scale).astype(np.float32)


class LinearHead(NamedTuple):
  """`logits = standardizer(x) @ w + b` (numpy: predicting compiles nothing)."""
  standardizer: Standardizer
  w: np.ndarray  # [F, K]
  b: np.ndarray  # [K]

  def logits(self, x: np.ndarray) -> np.ndarray:
    return self.standardizer(x) @ self.w + self.b


def identity_head(num_classes: int) -> LinearHead:
  """`logits = x`: the argmax of K scores, nothing learned."""
  k = num_classes
  return LinearHead(Standardizer(np.zeros(k, np.float32), np.ones(k, np.float32)),
                    np.eye(k, dtype=np.float32), np.zeros(k, np.float32))


class CrossValidation(NamedTuple):
  """Held-out metrics per L2 strength, over the folds.

  Attributes:
    l2_grid: the strengths tried.
    nll, accuracy: `[len(l2_grid)]`, mean over the held-out examples.
    logits: `[len(l2_grid), N, K]`, each example's logits from the fit that
      did not see it (out-of-fold).
  """
  l2_grid: tuple[float, ...]
  nll: np.ndarray
  accuracy: np.ndarray
  logits: np.ndarray

  @property
  def best_index(self) -> int:
    """The strength with the lowest held-out NLL (ties: the strongest L2)."""
    nll = np.round(self.nll, 6)
    return int(np.flatnonzero(nll == nll.min())[-1])

  @property
  def best_l2(self) -> float:
    return self.l2_grid[self.best_index]

  @property
  def best_logits(self) -> np.ndarray:
    """Out-of-fold logits `[N, K]` at the chosen strength."""
    return self.logits[self.best_index]


def fit_standardizer(x: np.ndarray, group_sizes: Sequence[int] | None = None) -> Standardizer:
  """Zero mean, unit variance per feature; a group of d features is scaled by
  a further `1/sqrt(d)`, so every group (one model call's output) weighs the
  same under one L2 penalty whatever its width (4 log-probs or a 576-d
  embedding). Constant features get scale 1 (they become 0)."""
  x = np.asarray(x, np.float64)
  std = x.std(0)
  std = np.where(std > 1e-8, std, 1.0)
  if group_sizes is not None:
    std = std * np.sqrt(np.repeat(np.asarray(group_sizes, np.float64), group_sizes))
  return Standardizer(x.mean(0).astype(np.float32), std.astype(np.float32))


def _init(kind: str, num_features: int, num_classes: int):
  if kind == "linear":
    return (jnp.zeros((num_features, num_classes)), jnp.zeros((num_classes,)))
  return (jnp.zeros((num_classes,)), jnp.zeros(()))


def _logits(kind: str, params, x):
  if kind == "linear":
    w, b = params
    return x @ w + b
  b, log_t = params
  return x * jnp.exp(-log_t) + b


def _loss(kind, params, x, y, weights, l2):
  nll = optax.softmax_cross_entropy_with_integer_labels(_logits(kind, params, x), y)
  penalty = l2 * jnp.sum(params[0] ** 2) if kind == "linear" else 0.0
  return jnp.sum(weights * nll) / jnp.sum(weights) + penalty


def _fit_one(kind, x, y, weights, l2, num_classes: int, steps: int):
  """Adam, full batch, a fixed number of steps.

  A fixed step count (no line search, no convergence test) keeps the fits of
  a vmapped grid in lock step, so 11 strengths cost little more than one.
  """
  params = _init(kind, x.shape[1], num_classes)
  optimizer = optax.adam(LEARNING_RATE)
  grad = jax.grad(lambda p: _loss(kind, p, x, y, weights, l2))

  def step(carry, _):
    params, state = carry
    updates, state = optimizer.update(grad(params), state, params)
    return (optax.apply_updates(params, updates), state), None

  (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), None, length=steps)
  return params


@jax.jit(static_argnames=("kind", "num_classes", "steps"))
def _fit_grid(x, y, weights, l2, *, kind, num_classes, steps):
  """One fit per row of `weights` [M, N] and `l2` [M], all at once."""
  return jax.vmap(lambda w, l: _fit_one(kind, x, y, w, l, num_classes, steps))(weights, l2)


def stratified_folds(labels: np.ndarray, num_folds: int, seed: int) -> np.ndarray:
  """A fold index per example; each class is spread evenly over the folds."""
  rng = np.random.default_rng(seed)
  fold = np.empty(len(labels), np.int32)
  offset = 0
  for k in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == k))
    fold[idx] = (offset + np.arange(len(idx))) % num_folds
    offset += len(idx)
  return fold


def _standardizer(kind, x, group_sizes):
  if kind == "calibration":  # reads raw log-probabilities
    return Standardizer(np.zeros(x.shape[1], np.float32), np.ones(x.shape[1], np.float32))
  return fit_standardizer(x, group_sizes)


def _padded_width(num_features: int) -> int:
  """Widths are padded with zero features to a few sizes, so the fit compiles a
  few times per run instead of once per subset of sources (zero features get
  zero weights: only the L2 penalty reaches them)."""
  if num_features <= 128:
    return max(8, 1 << (num_features - 1).bit_length())
  return -(-num_features // 128) * 128


def _pad(x: np.ndarray, kind: str) -> np.ndarray:
  if kind == "calibration":
    return x
  return np.pad(x, ((0, 0), (0, _padded_width(x.shape[1]) - x.shape[1])))


def _fit(kind, xs, y, weights, l2, num_classes, steps):
  """`_fit_grid` on padded features; numpy params, unpadded."""
  f = xs.shape[1]
  params = _fit_grid(jnp.asarray(_pad(xs, kind)), jnp.asarray(y), jnp.asarray(weights),
                     jnp.asarray(l2, jnp.float32), kind=kind, num_classes=num_classes,
                     steps=steps)
  params = [np.asarray(p) for p in params]
  if kind == "linear":
    params[0] = params[0][:, :f]
  return params


def _np_logits(kind, params, xs):
  """Logits of every fit of a grid: `[M, N, K]`."""
  if kind == "linear":
    return np.einsum("nf,mfk->mnk", xs, params[0]) + params[1][:, None]
  b, log_t = params
  return xs[None] * np.exp(-log_t)[:, None, None] + b[:, None]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def cross_validate(x: np.ndarray, y: np.ndarray, num_classes: int, *, kind: str = "linear",
                   group_sizes: Sequence[int] | None = None,
                   l2_grid: Sequence[float] = DEFAULT_L2_GRID,
                   num_folds: int = DEFAULT_FOLDS, seed: int = 0,
                   steps: int = DEFAULT_STEPS) -> CrossValidation:
  """Held-out NLL and accuracy of a head for each L2 strength, over k folds.

  The standardizer is fit inside each fold on its training part, so no
  statistic of a held-out example leaks into its own prediction. Folds are
  stratified; with fewer examples of some class than `num_folds`, there are
  as many folds as the largest class has examples (at least 2).
  """
  x, y = np.asarray(x, np.float32), np.asarray(y, np.int32)
  l2_grid = tuple(l2_grid) if kind == "linear" else (0.0,)
  num_folds = max(2, min(num_folds, int(np.bincount(y).max())))
  fold = stratified_folds(y, num_folds, seed)
  logits = np.zeros((len(l2_grid), len(y), num_classes), np.float32)
  for f in range(num_folds):
    train, held = fold != f, fold == f
    xs = _standardizer(kind, x[train], group_sizes)(x)
    params = _fit(kind, xs, y, np.tile(train.astype(np.float32), (len(l2_grid), 1)),
                  l2_grid, num_classes, steps)
    logits[:, held] = _np_logits(kind, params, xs[held])
  nll, acc = scores(logits, y)
  return CrossValidation(l2_grid, nll, acc, logits)


def scores(logits: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean NLL and accuracy of `logits [..., N, K]` for labels `y [N]`."""
  logp = _log_softmax(np.asarray(logits, np.float64))
  nll = -np.take_along_axis(logp, np.broadcast_to(y[:, None], logp.shape[:-1] + (1,)),
                            -1)[..., 0].mean(-1)
  return nll, (logp.argmax(-1) == y).mean(-1)


def fit_head(x: np.ndarray, y: np.ndarray, num_classes: int, *, kind: str = "linear",
             l2: float = 0.0, group_sizes: Sequence[int] | None = None,
             steps: int = DEFAULT_STEPS) -> LinearHead:
  """A head of `kind` fit on all of `x` (at L2 strength `l2` for `'linear'`)."""
  x, y = np.asarray(x, np.float32), np.asarray(y, np.int32)
  std = _standardizer(kind, x, group_sizes)
  # As many rows as a cross-validation grid: the same compiled fit serves.
  rows = len(DEFAULT_L2_GRID) if kind == "linear" else 1
  params = _fit(kind, std(x), y, np.ones((rows, len(y)), np.float32), [l2] * rows,
                num_classes, steps)
  first = [p[0] for p in params]
  if kind == "linear":
    return LinearHead(std, first[0], first[1])
  b, log_t = first
  k = b.shape[0]
  return LinearHead(Standardizer(np.zeros(k, np.float32), np.full(k, np.exp(log_t), np.float32)),
                    np.eye(k, dtype=np.float32), b.astype(np.float32))


def mean_of_heads(heads: Sequence[LinearHead]) -> LinearHead:
  """One head over the concatenated inputs whose logits are the mean of
  `heads`' logits (a linear map of linear heads is linear)."""
  n = len(heads)
  return LinearHead(
      Standardizer(np.concatenate([h.standardizer.mean for h in heads]),
                   np.concatenate([h.standardizer.scale for h in heads])),
      np.concatenate([h.w for h in heads], axis=0) / n,
      np.mean([h.b for h in heads], axis=0).astype(np.float32))
