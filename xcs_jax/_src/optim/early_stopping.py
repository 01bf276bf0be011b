"""Early stopping as a pair of pure functions over a small state."""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

from xcs_jax._src import checks


class EarlyStoppingState(NamedTuple):
  best: float       # best monitored value so far
  best_epoch: int   # the epoch that reached it (-1 before any)
  epochs: int       # values seen so far


class EarlyStopping(NamedTuple):
  """`init() -> state`; `update(value, state) -> (state, improved, stop)`."""
  init: Callable[[], EarlyStoppingState]
  update: Callable[[float, EarlyStoppingState], tuple[EarlyStoppingState, bool, bool]]
  monitor: str
  restore_best: bool


def early_stopping(patience: int, *, monitor: str = "loss", mode: str = "min",
                   min_delta: float = 0.0, restore_best: bool = True) -> EarlyStopping:
  """Stops when `monitor` has not improved by `min_delta` for `patience` epochs.

  Args:
    patience: epochs without improvement tolerated before stopping (>= 1).
    monitor: the metric watched: `'loss'` (the epoch's mean training loss),
      another training metric, or a key of `fit(..., eval_fn=...)`'s result.
    mode: `'min'` (lower is better) or `'max'`.
    min_delta: the least change that counts as an improvement.
    restore_best: `fit` returns the params of the best epoch, not the last.

  Returns:
    An `EarlyStopping` for `fit(..., early_stopping=...)`.
  """
  patience = checks.check_int(patience, "early_stopping(patience=...)", min_value=1)
  checks.check_str(monitor, "early_stopping(monitor=...)", empty_ok=False)
  checks.check_one_of(mode, "early_stopping(mode=...)", ("min", "max"))
  min_delta = checks.check_number(min_delta, "early_stopping(min_delta=...)", min_value=0)
  restore_best = checks.check_bool(restore_best, "early_stopping(restore_best=...)")
  sign = 1.0 if mode == "min" else -1.0

  def init() -> EarlyStoppingState:
    return EarlyStoppingState(math.inf * sign, -1, 0)

  def update(value, state):
    value, epoch = float(value), state.epochs
    improved = not math.isnan(value) and (
        state.best_epoch < 0 or sign * (state.best - value) > min_delta)
    if improved:
      return EarlyStoppingState(value, epoch, epoch + 1), True, False
    state = state._replace(epochs=epoch + 1)
    return state, False, epoch - state.best_epoch >= patience

  return EarlyStopping(init, update, monitor, bool(restore_best))
