"""Ensemble building blocks, written on the primitives (nothing special-cased).

- `ensemble`: N samples of one binding, one key each, as ONE batched call.
- `majority_vote`: the most frequent answer, as tensor code (after a light
  normalization: ASCII case, surrounding spaces and final punctuation).
- `judge`: a model reads the question and the candidates and writes the
  final answer; the prompt is assembled by a host op.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from xcs_jax._src import checks
from xcs_jax._src import text as text_lib
from xcs_jax._src.host_op import host_op
from xcs_jax._src.models import ModelBinding

JUDGE_TEMPLATE = (
    "Question: {question}\n"
    "Candidate answers:\n{candidates}\n"
    "Considering the candidates, write the single best final answer to the question.")

# Bytes ignored when comparing answers at their ends: NUL, tab, newline, space, '!', '.'.
_STRIP = np.array([0, 9, 10, 13, 32, 33, 46], np.uint8)  # numpy: no backend at import


def ensemble(binding: ModelBinding, prompts: jax.Array, *, n: int, key: jax.Array
             ) -> jax.Array:
  """`n` samples of `binding` on `prompts`, one PRNG key each.

  Args:
    binding: the model (use a temperature > 0 for varied samples).
    prompts: uint8 text array `[..., max_len]`.
    n: number of samples.
    key: a JAX PRNG key; split into `n` keys.

  Returns:
    uint8 text array `[n, ..., output_bytes]`.
  """
  if not isinstance(binding, ModelBinding):
    checks.fail(TypeError, "ensemble(binding, ...)",
                "a ModelBinding (from `xcs_jax.models.bind`)", binding)
  n = checks.check_int(n, "ensemble(..., n=...)", min_value=1,
                       max_value=checks.MAX_SAMPLES)
  checks.check_prng_key(key, "ensemble(..., key=...)")
  keys = jax.random.split(key, n)
  return jax.vmap(lambda k: binding(prompts, key=k))(keys)


def normalize_answers(answers: jax.Array) -> jax.Array:
  """Lower-cases ASCII and strips spaces and final '.'/'!' at both ends (tensor code)."""
  lower = jnp.where((answers >= 65) & (answers <= 90), answers + 32, answers)
  keep = ~jnp.isin(lower, _STRIP)
  length = answers.shape[-1]
  start = jnp.argmax(keep, axis=-1)
  end = length - jnp.argmax(keep[..., ::-1], axis=-1)
  idx = jnp.arange(length) + start[..., None]
  shifted = jnp.take_along_axis(lower, jnp.clip(idx, 0, length - 1), axis=-1)
  valid = (idx < end[..., None]) & keep.any(-1, keepdims=True)
  return jnp.where(valid, shifted, 0).astype(jnp.uint8)


def majority_vote(answers: jax.Array) -> jax.Array:
  """The most frequent of `n` answers (ties go to the earliest).

  Args:
    answers: uint8 text array `[n, ..., L]`.

  Returns:
    `[..., L]`: the first answer (as written) whose normalized form is the
    most frequent.
  """
  text_lib.check_text_array(answers, "answers")
  if answers.ndim < 2:
    raise TypeError("`answers` must be `[n, ..., L]` (n answers); got shape "
                    f"{answers.shape}.")
  norm = normalize_answers(answers)
  same = jnp.all(norm[:, None] == norm[None, :], axis=-1)   # [n, n, ...]
  counts = same.sum(axis=1)                                # [n, ...]
  winner = jnp.argmax(counts, axis=0)                      # [...]
  return jnp.take_along_axis(answers, winner[None, ..., None], axis=0)[0]


def _judge_prompt_spec(question, answers):
  capacity = question.shape[-1] + answers.shape[0] * (answers.shape[-1] + 8) + len(
      JUDGE_TEMPLATE) + 64
  return jax.ShapeDtypeStruct((capacity,), jnp.uint8)


@host_op(out_spec=_judge_prompt_spec, name="format_judge_prompt")
def _format_judge_prompt(question: np.ndarray, answers: np.ndarray) -> np.ndarray:
  candidates = "\n".join(f"{i + 1}. {text_lib.decode_one(a).strip()}"
                         for i, a in enumerate(answers))
  prompt = JUDGE_TEMPLATE.format(question=text_lib.decode_one(question).strip(),
                                 candidates=candidates)
  capacity = _judge_prompt_spec(question, answers).shape[0]
  return text_lib.encode_one(prompt, capacity, what="judge prompt")


def judge(binding: ModelBinding, question: jax.Array, answers: jax.Array) -> jax.Array:
  """A judge model synthesizes one final answer from `n` candidates.

  Args:
    binding: the judge model.
    question: uint8 text array `[max_len]`.
    answers: uint8 text array `[n, L]`.

  Returns:
    uint8 text array `[output_bytes]` of `binding`.
  """
  if not isinstance(binding, ModelBinding):
    checks.fail(TypeError, "judge(binding, ...)",
                "a ModelBinding (from `xcs_jax.models.bind`)", binding)
  text_lib.check_text_array(question, "question")
  text_lib.check_text_array(answers, "answers")
  if question.ndim != 1 or answers.ndim != 2:
    raise TypeError("`judge` takes one question `[max_len]` and its answers `[n, L]`; "
                    f"got shapes {question.shape} and {answers.shape}. Use jax.vmap "
                    "for batches.")
  return binding(_format_judge_prompt(question, answers))
