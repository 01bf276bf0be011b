"""The prompt-search baseline: the best instruction by its generated answers.

What a DSPy-style optimizer does with a set of candidate instructions and no
numeric outputs: generate an answer to every training text under each
instruction, read the label out of the answer, keep the instruction with the
best training accuracy, and answer the evaluation texts with it.
"""
from __future__ import annotations

import re
from typing import NamedTuple, Sequence

import numpy as np

from xcs_jax._src import text as text_lib
from xcs_jax._src.jit.api import jit as xcs_jit
from xcs_jax._src.recipes import prompts
from xcs_jax._src.recipes.features import DEFAULT_BATCH_SIZE, call_batched

ANSWER_TOKENS = 16    # a label is a word or a few; longer answers are cut
ANSWER_BYTES = 256


def parse_label(answer: str, names: Sequence[str]) -> int:
  """The class whose word the answer names, or -1 (none, or several).

  A label word found as a whole word (case-insensitive) counts; where one
  found word contains another ("very positive", "positive") the longer wins.
  """
  found = [k for k, name in enumerate(names)
           if re.search(rf"(?<!\w){re.escape(name)}(?!\w)", answer, re.IGNORECASE)]
  found = [k for k in found
           if not any(k != j and names[k].lower() in names[j].lower() for j in found)]
  return found[0] if len(found) == 1 else -1


def generation_binding(binding):
  """`binding` for short, deterministic answers."""
  return binding.replace(temperature=0.0, max_tokens=ANSWER_TOKENS,
                         output_bytes=ANSWER_BYTES, overflow="truncate")


def generate_labels(binding, template: str, texts: Sequence[str], names: Sequence[str], *,
                    batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True,
                    desc: str = "answers") -> np.ndarray:
  """The parsed label of the model's answer to each filled template (-1: none)."""
  batches = call_batched(xcs_jit(generation_binding(binding)),
                         [prompts.fill(template, t) for t in texts],
                         batch_size=batch_size, progress=progress, desc=desc)
  return np.asarray([parse_label(a, names) for batch in batches
                     for a in text_lib.decode(batch)], np.int32)


class BaselineResult(NamedTuple):
  """The chosen instruction and how every candidate did on the training texts."""
  best: int                      # index into the candidate templates
  train_accuracy: tuple[float, ...]
  eval_predictions: np.ndarray | None


def search_instructions(binding, templates: Sequence[str], train_texts: Sequence[str],
                        train_labels: np.ndarray, names: Sequence[str],
                        eval_texts: Sequence[str] | None, *,
                        batch_size: int = DEFAULT_BATCH_SIZE,
                        progress: bool = True) -> BaselineResult:
  """Best of `templates` by generated-answer accuracy on the training texts."""
  accuracy = []
  for i, template in enumerate(templates):
    got = generate_labels(binding, template, train_texts, names, batch_size=batch_size,
                          progress=progress, desc=f"baseline: instruction {i + 1} on train")
    accuracy.append(float(np.mean(got == np.asarray(train_labels))))
  best = int(np.argmax(accuracy))
  predictions = None
  if eval_texts is not None:
    predictions = generate_labels(binding, templates[best], eval_texts, names,
                                  batch_size=batch_size, progress=progress,
                                  desc="baseline: eval")
  return BaselineResult(best, tuple(accuracy), predictions)
