"""`fit`: epochs of minibatch steps, with a progress bar and early stopping."""
from __future__ import annotations

import sys
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
import optax
from tqdm.auto import tqdm

from xcs_jax._src import checks
from xcs_jax._src.jit.api import jit as xcs_jit
from xcs_jax._src.optim.data import dataset_size, minibatches, num_batches
from xcs_jax._src.optim.early_stopping import EarlyStopping
from xcs_jax._src.optim.step import StepOutput


class FitResult(NamedTuple):
  """What `fit` returns.

  Attributes:
    params: the best epoch's params when early stopping restores the best,
      else the last.
    opt_state: the optimizer state after the last step.
    history: one dict per epoch: `epoch`, `steps`, `loss` (mean training
      loss), the mean of each training metric, and `eval_fn`'s results.
    stopped_early: whether early stopping ended training.
    best_epoch: the epoch early stopping judged best (None without it).
  """
  params: optax.Params
  opt_state: optax.OptState
  history: list
  stopped_early: bool
  best_epoch: int | None


def default_jit() -> Callable:
  """`xcs_jax.jit`: model calls in a step run concurrently."""
  return xcs_jit


def fit(step: Callable[..., StepOutput], params: optax.Params, opt_state: optax.OptState,
        data: Any, *, key: jax.Array, num_epochs: int = 1, batch_size: int | None = None,
        eval_fn: Callable[[optax.Params], dict] | None = None,
        early_stopping: EarlyStopping | None = None, progress: bool = True,
        jit: Callable | None = None, desc: str = "fit") -> FitResult:
  """Trains `params` with `step` over epochs of shuffled minibatches of `data`.

  Args:
    step: `step(params, opt_state, batch, key) -> StepOutput`, e.g. from
      `make_step`; compiled once with `jit`.
    params: initial params (any pytree).
    opt_state: the optimizer's state, e.g. `optimizer.init(params)`.
    data: a pytree of arrays sharing a leading example axis.
    key: a JAX PRNG key; shuffling and each step's key derive from it, so a run
      is reproducible.
    num_epochs: passes over `data`.
    batch_size: examples per step (None: the whole dataset). A last, smaller
      batch is dropped so the step compiles once.
    eval_fn: `eval_fn(params) -> dict of floats`, run after every epoch (e.g.
      held-out accuracy); its keys go into `history` and the progress bar.
    early_stopping: from `xcs_jax.optim.early_stopping(...)`; its `monitor`
      names a key of the epoch's record (`'loss'`, a metric or an eval key).
    progress: show a tqdm bar (on stderr) with the loss and metrics.
    jit: how to compile `step` (default: `xcs_jax.jit` where present, else
      `jax.jit`; pass `lambda f: f` to run eagerly).
    desc: the progress bar's label.

  Returns:
    A `FitResult`.
  """
  checks.check_callable(step, "fit(step, ...)", "a step function (e.g. from `make_step`)")
  num_epochs = checks.check_int(num_epochs, "fit(num_epochs=...)", min_value=1)
  if early_stopping is not None and not isinstance(early_stopping, EarlyStopping):
    checks.fail(TypeError, "fit(early_stopping=...)", "an `EarlyStopping` or None",
                early_stopping, "Make one with `xcs_jax.optim.early_stopping(...)`.")
  checks.check_prng_key(key, "fit(key=...)")
  batch_size = checks.check_int(batch_size, "fit(batch_size=...)", min_value=1,
                                none_ok=True)
  checks.check_callable(eval_fn, "fit(eval_fn=...)", "a callable `eval_fn(params) -> dict`",
                        none_ok=True)
  checks.check_callable(jit, "fit(jit=...)", "a callable that compiles `step`",
                        none_ok=True)
  progress = checks.check_bool(progress, "fit(progress=...)")
  checks.check_str(desc, "fit(desc=...)")
  n = dataset_size(data)
  batch_size = n if batch_size is None else batch_size
  steps_per_epoch = num_batches(n, batch_size) if batch_size <= n else 0
  compiled = (jit or default_jit())(step)
  data_key, step_key = jax.random.split(key)
  stop_state = early_stopping.init() if early_stopping else None
  history, best_params, stopped = [], params, False
  bar = tqdm(total=num_epochs * max(steps_per_epoch, 1), desc=desc, disable=not progress,
             file=sys.stderr, dynamic_ncols=True)
  global_step = 0
  try:
    for epoch in range(num_epochs):
      losses, metrics = [], {}
      for batch in minibatches(data, batch_size, key=jax.random.fold_in(data_key, epoch)):
        out = compiled(params, opt_state, batch, jax.random.fold_in(step_key, global_step))
        params, opt_state = out.params, out.opt_state
        losses.append(float(out.loss))
        for name, value in out.metrics.items():
          metrics.setdefault(name, []).append(float(value))
        global_step += 1
        # refresh=False: update() redraws (rate-limited by tqdm's mininterval)
        # with the new postfix; set_postfix's default forces a redraw every step.
        bar.set_postfix(_postfix({"loss": np.mean(losses),
                                  **{k: np.mean(v) for k, v in metrics.items()}}),
                        refresh=False)
        bar.update(1)
      record = {"epoch": epoch, "steps": global_step, "loss": float(np.mean(losses)),
                **{k: float(np.mean(v)) for k, v in metrics.items()}}
      if eval_fn is not None:
        record.update({k: float(v) for k, v in dict(eval_fn(params)).items()})
      history.append(record)
      bar.set_postfix(_postfix({k: v for k, v in record.items()
                                if k not in ("epoch", "steps")}))
      if early_stopping is not None:
        if early_stopping.monitor not in record:
          raise KeyError(f"early stopping monitors {early_stopping.monitor!r}, which "
                         f"the epoch's record lacks; it has {sorted(record)}.")
        stop_state, improved, stop = early_stopping.update(
            record[early_stopping.monitor], stop_state)
        if improved:
          best_params = params
        if stop:
          stopped = True
          break
  finally:
    bar.close()
  best_epoch = None
  if early_stopping is not None:
    best_epoch = stop_state.best_epoch
    if early_stopping.restore_best:
      params = best_params
  return FitResult(params, opt_state, history, stopped, best_epoch)


def _postfix(values: dict) -> dict:
  return {k: f"{v:.4g}" for k, v in values.items()}
