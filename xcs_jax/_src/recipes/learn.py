"""Learning a classification program from model-call features.

The recipe, on features computed once per training text:

1. a linear head per source (L2 chosen by k-fold cross-validation on the
   training texts);
2. the program: the ensemble that averages those heads' logits. A source
   without signal gets a strong L2 and near-constant logits, so it moves the
   average little; no source is chosen or dropped at run time.

Beside it, for the table: the zero-shot and calibrated argmax of the first
instruction's label log-probabilities, and one linear head over all sources
at once. Why the average: on SST-2 (200 training sentences, 5 resamples of
the 700 labelled sentences the project holds) it beat the joint head, a
stacked ensemble and cross-validated source selection (docs/optimization.md).
Every fit goes through optax (`head.py`).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
from tqdm.auto import tqdm

from xcs_jax._src.recipes import head as head_lib
from xcs_jax._src.recipes import prompts
from xcs_jax._src.recipes.features import Source
from xcs_jax._src.recipes.program import Program
from xcs_jax._src.recipes.table import LabelSet


class Trial(NamedTuple):
  """One program tried, judged on the training texts by cross-validation.

  Attributes:
    description: what it is, in words.
    program: fit on all training texts.
    cv_accuracy, cv_nll: of its out-of-fold predictions.
    chosen: whether this is the program the recipe returns.
  """
  description: str
  program: Program
  cv_accuracy: float
  cv_nll: float
  chosen: bool = False


def default_sources(names: Sequence[str],
                    instructions: Sequence[str] = prompts.DEFAULT_INSTRUCTIONS,
                    embeddings: bool = True) -> list[Source]:
  """The candidate sources, most useful first (a budget keeps a prefix).

  The label-contrast embedding, the first instruction's log-probabilities,
  the embedding of the text followed by a question naming the labels, the
  other instructions (instruction `i` names the labels rotated by `i`), and
  the bare text's embedding.
  """
  options = prompts.answer_options(names)
  scores = [Source("score", prompts.prompt_template(instruction, names, i), options)
            for i, instruction in enumerate(instructions)]
  if not embeddings:
    return scores
  return ([Source("contrast", prompts.contrast_template(), tuple(names))] + scores[:1]
          + [Source("embed", prompts.question_template(names))] + scores[1:]
          + [Source("embed", prompts.TEXT_SLOT)])


def describe_sources(sources: Sequence[Source], all_sources: Sequence[Source]) -> str:
  if len(sources) == len(all_sources):
    return f"all {len(sources)} sources"
  return " + ".join(f"[{all_sources.index(s) + 1}] {s.name}" for s in sources)


class FitResult(NamedTuple):
  """What `fit` returns.

  Attributes:
    program: the learned program (the chosen trial's).
    trials: every program tried, in the order tried (the recipe's table).
    sources: every source whose calls were made on the training texts.
    train_features: their features, one `[N, width]` array per source.
  """
  program: Program
  trials: list
  sources: tuple
  train_features: list


def learn(model: str, labels: LabelSet, sources: Sequence[Source],
          features: Sequence[np.ndarray], y: np.ndarray, *, seed: int = 0,
          progress: bool = True) -> FitResult:
  """Fits the program and the table's other rows on computed features (no calls)."""
  sources, y, k = list(sources), np.asarray(y, np.int32), labels.num_classes

  def program(picked, head, description, columns=None):
    columns = columns or [range(features[i].shape[1]) for i in picked]
    return Program(model, labels, tuple(sources[i] for i in picked),
                   tuple(tuple(int(c) for c in cols) for cols in columns), head, description)

  def trial(picked, head, description, oof_logits, columns=None):
    nll, acc = head_lib.scores(oof_logits, y)
    return Trial(description, program(picked, head, description, columns), float(acc),
                 float(nll))

  def linear(picked):
    x = np.concatenate([features[i] for i in picked], axis=1)
    groups = [features[i].shape[1] for i in picked]
    cv = head_lib.cross_validate(x, y, k, group_sizes=groups, seed=seed)
    head = head_lib.fit_head(x, y, k, l2=cv.best_l2, group_sizes=groups)
    bar.update(1)
    return head, cv.best_logits

  trials = []
  with tqdm(total=len(sources) + 3, desc="fitting heads", unit="head", leave=False,
            disable=not progress) as bar:
    first = next((i for i, s in enumerate(sources) if s.kind == "score"), None)
    if first is not None:
      x = features[first][:, :k]
      what = describe_sources([sources[first]], sources)
      trials.append(trial([first], head_lib.identity_head(k),
                          f"zero-shot: argmax of the label words' log-probs, {what}", x,
                          [range(k)]))
      cv = head_lib.cross_validate(x, y, k, kind="calibration", seed=seed)
      trials.append(trial([first], head_lib.fit_head(x, y, k, kind="calibration"),
                          f"calibrated (bias + temperature) argmax, {what}",
                          cv.best_logits, [range(k)]))
    bar.update(2)
    singles = [linear([i]) for i in range(len(sources))]
    trials += [trial([i], head, f"linear head: {describe_sources([sources[i]], sources)}",
                     oof) for i, (head, oof) in enumerate(singles)]
    if len(sources) > 1:
      picked = list(range(len(sources)))
      head, oof = linear(picked)
      trials.append(trial(picked, head, f"linear head over {describe_sources(sources, sources)}",
                          oof))
      ensemble = trial(picked, head_lib.mean_of_heads([h for h, _ in singles]),
                       f"ensemble: mean of the {len(sources)} per-source heads",
                       np.mean([oof for _, oof in singles], axis=0))
    else:
      ensemble = trials[-1]
      bar.update(1)
  trials = [t for t in trials if t is not ensemble] + [ensemble._replace(chosen=True)]
  return FitResult(trials[-1].program, trials, tuple(sources), list(features))
