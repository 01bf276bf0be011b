"""Learning a classification program from model-call features.

The recipe:

1. make every candidate source's call once per training text (option
   log-probabilities under each candidate instruction, embeddings);
2. try heads over them, each judged by k-fold cross-validation on the
   training texts alone: the zero-shot argmax and a calibrated argmax of the
   first instruction's label log-probabilities, and a linear head (L2 chosen
   by cross-validation) over each source alone;
3. forward selection: starting from the best single source, add the source
   that lowers the cross-validated NLL most, while it lowers it by at least
   `MIN_GAIN` (a source that adds nothing costs a call per text and adds
   noise, so it stays out);
4. the program is the linear head over the selected sources, fit on all
   training texts.

Every trial is a row of the table the recipe prints; every fit goes through
optax (`head.py`).
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

MIN_GAIN = 0.005   # nats of cross-validated NLL a source must save to be added


class Trial(NamedTuple):
  """One program tried, judged on the training texts by cross-validation.

  Attributes:
    description: what it is, in words.
    program: fit on all training texts.
    cv_accuracy, cv_nll: mean over the held-out folds.
    l2: the L2 strength chosen by cross-validation (None: no penalty).
    chosen: whether this is the program the recipe returns.
  """
  description: str
  program: Program
  cv_accuracy: float
  cv_nll: float
  l2: float | None
  chosen: bool = False


def default_sources(names: Sequence[str],
                    instructions: Sequence[str] = prompts.DEFAULT_INSTRUCTIONS,
                    embeddings: bool = True) -> list[Source]:
  """The candidate sources, most useful first (a budget keeps a prefix).

  The first instruction's log-probabilities, then the embedding of the text
  followed by a question naming the labels, then the other instructions,
  then the bare text's embedding.
  """
  options = prompts.answer_options(names)
  scores = [Source("score", prompts.prompt_template(i, names), options) for i in instructions]
  embeds = [Source("embed", prompts.question_template(names)),
            Source("embed", prompts.TEXT_SLOT)] if embeddings else []
  return scores[:1] + embeds[:1] + scores[1:] + embeds[1:]


def describe_sources(sources: Sequence[Source], all_sources: Sequence[Source]) -> str:
  return " + ".join(f"[{all_sources.index(s) + 1}] {s.name}" for s in sources)


class _Trainer:
  """Cross-validates and fits heads over subsets of the training features."""

  def __init__(self, model, labels: LabelSet, sources, features, y, seed, progress):
    self.model, self.labels, self.sources = model, labels, list(sources)
    self.features, self.y, self.seed = features, np.asarray(y, np.int32), seed
    self.bar = tqdm(desc="cross-validating heads", unit="head", disable=not progress,
                    leave=False)

  def linear(self, picked: Sequence[int]) -> Trial:
    x = np.concatenate([self.features[i] for i in picked], axis=1)
    groups = [self.features[i].shape[1] for i in picked]
    cv = head_lib.cross_validate(x, self.y, self.labels.num_classes, group_sizes=groups,
                                 seed=self.seed)
    self.bar.update(1)
    head = head_lib.fit_head(x, self.y, self.labels.num_classes, l2=cv.best_l2,
                             group_sizes=groups)
    program = self._program(picked, [range(g) for g in groups], head,
                            f"linear head: {describe_sources([self.sources[i] for i in picked], self.sources)}")
    i = cv.best_index
    return Trial(program.description, program, float(cv.accuracy[i]), float(cv.nll[i]),
                 cv.best_l2)

  def label_scores(self, source: int, kind: str) -> Trial:
    """Zero-shot (`'argmax'`) or `'calibration'` over the K label words' log-probs."""
    k = self.labels.num_classes
    x = self.features[source][:, :k]
    if kind == "argmax":
      head = head_lib.identity_head(k)
      logp = x - np.logaddexp.reduce(x, axis=1, keepdims=True)
      acc = float(np.mean(x.argmax(1) == self.y))
      nll = float(-logp[np.arange(len(self.y)), self.y].mean())
      what = "zero-shot: argmax of the label words' log-probs"
    else:
      cv = head_lib.cross_validate(x, self.y, k, kind="calibration", seed=self.seed)
      head = head_lib.fit_head(x, self.y, k, kind="calibration")
      acc, nll = float(cv.accuracy[0]), float(cv.nll[0])
      what = "calibrated (bias + temperature): label words' log-probs"
    self.bar.update(1)
    program = self._program([source], [range(k)], head,
                            f"{what}, {describe_sources([self.sources[source]], self.sources)}")
    return Trial(program.description, program, acc, nll, None)

  def _program(self, picked, columns, head, description) -> Program:
    return Program(self.model, self.labels, tuple(self.sources[i] for i in picked),
                   tuple(tuple(int(c) for c in cols) for cols in columns), head, description)


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
  """Steps 2-4 of the recipe on features already computed (no model calls)."""
  trainer = _Trainer(model, labels, sources, features, y, seed, progress)
  try:
    trials = []
    first_score = next((i for i, s in enumerate(sources) if s.kind == "score"), None)
    if first_score is not None:
      trials += [trainer.label_scores(first_score, "argmax"),
                 trainer.label_scores(first_score, "calibration")]
    singles = [trainer.linear([i]) for i in range(len(sources))]
    trials += singles
    best = min(singles, key=lambda t: t.cv_nll)
    picked = [singles.index(best)]
    while len(picked) < len(sources):
      steps = [trainer.linear(sorted(picked + [i]))
               for i in range(len(sources)) if i not in picked]
      step = min(steps, key=lambda t: t.cv_nll)
      trials += steps
      if step.cv_nll > best.cv_nll - MIN_GAIN:
        break
      best = step
      picked = [sources.index(s) for s in step.program.sources]
  finally:
    trainer.bar.close()
  trials = [t._replace(chosen=t is best) for t in trials]
  return FitResult(best.program, trials, tuple(sources), list(features))
