"""Score-function (REINFORCE) gradients for discrete choices.

For choices `c ~ Categorical(softmax(logits))` and a loss `L(c)` that no one
can differentiate (a prompt template, an instruction, a set of few-shot
demonstrations, judged by model calls), the gradient of the expected loss is

    d/dlogits E[L(c)] = E[(L(c) - b) d/dlogits log p(c)]

for any baseline `b` that does not depend on `c`. The default baseline is
leave-one-out: each sample's baseline is the mean loss of the *other* samples,
which keeps the estimate unbiased and needs no state. Parameters that reach
the losses through differentiable code (a calibration bias) keep their
ordinary gradient, so discrete and continuous parameters train together in
one step. The estimate enters
training as a surrogate loss (`score_function_loss`) whose value is the mean
sampled loss and whose gradient is the estimate, so any optax optimizer and
`xcs_jax.optim.make_step` use it unchanged.

`logits` may have shape `[..., K]`: each leading index is an independent
choice among K (e.g. an instruction, and a demonstration per slot).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from xcs_jax._src import checks

BASELINES = ("leave_one_out", "mean", "none")


class ReinforceOutput(NamedTuple):
  """`reinforce`'s result: the surrogate loss, the samples and their losses."""
  loss: jax.Array      # scalar: value = mean sampled loss, grad = the estimate
  choices: jax.Array   # int32 [num_samples, *logits.shape[:-1]]
  losses: jax.Array    # [num_samples]
  aux: Any = None      # `loss_of_choice`'s aux per sample (with `has_aux=True`)


def sample_choices(key: jax.Array, logits: jax.Array, num_samples: int) -> jax.Array:
  """`num_samples` independent draws from `softmax(logits)` along the last axis.

  Returns:
    int32 `[num_samples, *logits.shape[:-1]]`.
  """
  num_samples = checks.check_int(num_samples, "sample_choices(..., num_samples=...)",
                                min_value=1, max_value=checks.MAX_SAMPLES)
  logits = jnp.asarray(logits)
  shape = (num_samples,) + logits.shape[:-1]
  return jax.random.categorical(key, logits, axis=-1, shape=shape).astype(jnp.int32)


def log_prob(logits: jax.Array, choices: jax.Array) -> jax.Array:
  """Log-probability of each sample's choices, summed over independent choices."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(
      jnp.broadcast_to(logp, choices.shape + logp.shape[-1:]), choices[..., None], axis=-1)
  return picked[..., 0].reshape(choices.shape[0], -1).sum(axis=1)


def _baseline(losses: jax.Array, baseline: Any) -> jax.Array:
  if isinstance(baseline, str):
    if baseline == "leave_one_out":
      n = losses.shape[0]
      if n < 2:
        raise ValueError("`baseline='leave_one_out'` needs at least 2 samples per step; "
                         "raise `num_samples`, or use `baseline='none'`.")
      return (jnp.sum(losses) - losses) / (n - 1)
    if baseline == "mean":
      return jnp.full_like(losses, jnp.mean(losses))
    if baseline == "none":
      return jnp.zeros_like(losses)
    checks.fail(ValueError, "score_function_loss(..., baseline=...)",
                f"one of {', '.join(map(repr, BASELINES))} or an array of baseline values",
                baseline)
  return jnp.broadcast_to(jnp.asarray(baseline, losses.dtype), losses.shape)


def score_function_loss(logits: jax.Array, choices: jax.Array, losses: jax.Array, *,
                        baseline: Any = "leave_one_out") -> jax.Array:
  """A surrogate loss whose gradient in `logits` is the REINFORCE estimate.

  Its value is `mean(losses)` (so a progress bar shows the real sampled loss);
  its gradient in `logits` is `mean((losses - b) * d log p(choices))`. Other
  parameters the losses depend on (a calibration bias, a temperature) get
  their ordinary (pathwise) gradient `mean(d losses)` from the same scalar,
  so one optax step trains discrete and continuous parameters together.

  Args:
    logits: `[..., K]` logits the choices were drawn from.
    choices: int `[num_samples, *logits.shape[:-1]]`, e.g. from `sample_choices`.
    losses: `[num_samples]` loss of each sample.
    baseline: `'leave_one_out'` (default; unbiased, stateless), `'mean'` (the
      batch mean: slightly biased, lower variance for tiny sample counts),
      `'none'`, or an array of baseline values (e.g. a running mean you keep
      in your own state).

  Returns:
    A scalar.
  """
  losses = jnp.asarray(losses)
  if losses.ndim != 1 or losses.shape[0] != choices.shape[0]:
    raise ValueError(f"`losses` must have shape [num_samples] = [{choices.shape[0]}], "
                     f"one per sample of `choices`; got shape {losses.shape}.")
  advantage = jax.lax.stop_gradient(losses - _baseline(losses, baseline))
  logp = log_prob(logits, choices)
  return jnp.mean(losses) + jnp.mean(advantage * (logp - jax.lax.stop_gradient(logp)))


def reinforce(loss_of_choice: Callable[[jax.Array], jax.Array], logits: jax.Array,
              key: jax.Array, *, num_samples: int = 8,
              baseline: Any = "leave_one_out", has_aux: bool = False) -> ReinforceOutput:
  """Samples choices, evaluates their losses together, returns the surrogate.

  `loss_of_choice` is vmapped over the samples, so the model calls of all
  samples (and of all examples inside it) become one batched host call per
  call site, run concurrently.

  Args:
    loss_of_choice: `loss_of_choice(choice) -> scalar`, where `choice` is int32
      with shape `logits.shape[:-1]` (a scalar for a single choice); with
      `has_aux`, `-> (scalar, aux)`.
    logits: `[..., K]` float logits.
    key: a JAX PRNG key.
    num_samples: choices drawn per call (>= 2 for the leave-one-out baseline).
    baseline: see `score_function_loss`.
    has_aux: `loss_of_choice` also returns auxiliary values (e.g. accuracy);
      they come back stacked over samples in `.aux`.

  Returns:
    `ReinforceOutput(loss, choices, losses, aux)`; differentiate `loss`.

  Examples:
    >>> def loss_fn(logits, batch, key):
    ...   out = reinforce(lambda c: (nll(c, batch), accuracy(c, batch)), logits, key,
    ...                   has_aux=True)
    ...   return out.loss, {"acc": out.aux.mean()}
  """
  checks.check_callable(loss_of_choice, "reinforce(loss_of_choice, ...)",
                        "a callable `loss_of_choice(choice) -> loss`")
  num_samples = checks.check_int(num_samples, "reinforce(..., num_samples=...)",
                                 min_value=1, max_value=checks.MAX_SAMPLES)
  has_aux = checks.check_bool(has_aux, "reinforce(..., has_aux=...)")
  checks.check_prng_key(key, "reinforce(..., key=...)")
  logits = jnp.asarray(checks.check_array(logits, "reinforce(..., logits=...)"))
  if logits.ndim < 1 or not jnp.issubdtype(logits.dtype, jnp.floating):
    raise TypeError(f"`logits` must be a float array [..., K]; got dtype {logits.dtype} "
                    f"and shape {logits.shape}.")
  choices = sample_choices(key, jax.lax.stop_gradient(logits), num_samples)
  losses = jax.vmap(loss_of_choice)(choices)
  aux = None
  if has_aux:
    losses, aux = losses
  if losses.shape != (num_samples,):
    raise ValueError("`loss_of_choice` must return a scalar loss per choice; it gave "
                     f"shape {losses.shape[1:]}.")
  return ReinforceOutput(score_function_loss(logits, choices, losses, baseline=baseline),
                         choices, losses, aux)


def greedy_choice(logits: jax.Array) -> jax.Array:
  """The most probable choice per independent slot (argmax of the logits)."""
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)
