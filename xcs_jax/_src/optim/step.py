"""One optimization step of a hybrid (tensor + model call) loss."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import optax

LossFn = Callable[[optax.Params, Any, jax.Array], tuple[jax.Array, dict]]


class StepOutput(NamedTuple):
  """What a step returns: the new params and optimizer state, the loss, metrics."""
  params: optax.Params
  opt_state: optax.OptState
  loss: jax.Array
  metrics: dict


def make_step(loss_fn: LossFn, optimizer: optax.GradientTransformation
              ) -> Callable[[optax.Params, optax.OptState, Any, jax.Array], StepOutput]:
  """A pure training step: `step(params, opt_state, batch, key) -> StepOutput`.

  The loss may call models and host ops: gradients reach `params` exactly
  through tensor code, and through host ops by their `grad=` estimators or a
  score-function surrogate (`xcs_jax.optim.reinforce`). The step is not
  compiled here; wrap it in `jax.jit` or `xcs_jax.jit` (`fit` does), so the
  model calls of one step run as batched, concurrent host calls.

  Args:
    loss_fn: `loss_fn(params, batch, key) -> (loss, metrics)`, a scalar loss and
      a dict of scalar metrics (may be empty).
    optimizer: any optax `GradientTransformation`.

  Returns:
    `step(params, opt_state, batch, key) -> StepOutput(params, opt_state, loss,
    metrics)`.

  Examples:
    >>> step = make_step(loss_fn, optax.adam(0.1))
    >>> out = jax.jit(step)(params, optax.adam(0.1).init(params), batch, key)
  """
  if not callable(loss_fn):
    raise TypeError(f"`make_step(loss_fn, ...)` needs a callable `loss_fn(params, batch, "
                    f"key) -> (loss, metrics)`; got {type(loss_fn).__name__}.")
  if not isinstance(optimizer, optax.GradientTransformation):
    raise TypeError("`make_step(..., optimizer)` must be an optax GradientTransformation "
                    f"(e.g. `optax.adam(1e-2)`); got {type(optimizer).__name__}.")

  def checked_loss(params, batch, key):
    out = loss_fn(params, batch, key)
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
      raise TypeError(
          "`loss_fn` must return `(loss, metrics)`; return `(loss, {})` for no metrics. "
          f"It returned {type(out).__name__}"
          + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else "") + ".")
    return tuple(out)

  def step(params, opt_state, batch, key):
    (loss, metrics), grads = jax.value_and_grad(checked_loss, has_aux=True)(
        params, batch, key)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return StepOutput(optax.apply_updates(params, updates), opt_state, loss, dict(metrics))

  return step
