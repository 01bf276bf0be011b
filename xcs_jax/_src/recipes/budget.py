"""Planning a run's model calls within a budget, before any call is made.

Counting: each item of a provider call counts once, whatever its number of
options (a `score_options` call over 4 options is 1 call); cache hits do not
count (a plan never relies on them: it is an upper bound).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np


class Plan(NamedTuple):
  """How many calls each part of a run may make.

  Attributes:
    num_sources: feature sources of the learned program (a prefix of the
      candidate sources).
    calls_per_text: the calls those sources make per text.
    num_train: training texts the program learns from (a stratified subset
      when the budget cannot score them all).
    baseline_instructions: candidate instructions the baseline tries (0: no
      baseline).
    baseline_train: training texts the baseline judges each candidate on.
  """
  num_sources: int
  calls_per_text: int
  num_train: int
  baseline_instructions: int
  baseline_train: int

  def program_calls(self, num_eval: int) -> int:
    return self.calls_per_text * (self.num_train + num_eval)

  def baseline_calls(self, num_eval: int) -> int:
    if not self.baseline_instructions:
      return 0
    return self.baseline_instructions * self.baseline_train + num_eval

  def calls(self, num_eval: int) -> int:
    return self.program_calls(num_eval) + self.baseline_calls(num_eval)


def plan(budget: int | None, *, num_train: int, num_eval: int, source_calls: Sequence[int],
         num_instructions: int, num_classes: int, baseline: bool) -> Plan:
  """The largest run that fits `budget` calls (None: no cap).

  `source_calls` are the calls per text of the candidate sources, in the
  order they are kept. The program and the baseline get the same share (half
  each with a baseline); the baseline never makes more calls than the
  program. The program keeps every training text and drops sources from the
  end first (the labels are the scarce part); only when the first source
  over all texts does not fit does it learn from fewer texts.

  Raises:
    ValueError: the budget cannot pay for one source over the evaluation
      texts and two training texts per class.
  """
  if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool)
                             or budget < 1):
    raise ValueError(f"`--budget` must be a positive number of model calls; got {budget!r}.")
  share = None if budget is None else (budget // 2 if baseline else budget)
  texts = num_train + num_eval
  cumulative = np.cumsum(source_calls)
  sources, train = len(source_calls), num_train
  if share is not None and share < cumulative[-1] * texts:
    sources = int(np.sum(cumulative * texts <= share))
    if sources == 0:
      sources, train = 1, share // source_calls[0] - num_eval
  per_text = int(cumulative[sources - 1])
  least = 2 * num_classes
  if train < least:
    need = source_calls[0] * (num_eval + least) * (2 if baseline else 1)
    raise ValueError(
        f"`--budget {budget}` is too small: one call per evaluation text ({num_eval}) and "
        f"per training text for at least {least} training texts (2 per class) needs "
        f"{need} calls{' with the baseline' if baseline else ''}. Raise `--budget` to at "
        f"least {need}{', or pass `--no-baseline`' if baseline else ''}.")
  program = per_text * (train + num_eval)
  instructions = baseline_train = 0
  if baseline and num_instructions:
    spare = program - num_eval   # the baseline matches the program's calls
    instructions = min(num_instructions, max(spare, 0))
    baseline_train = min(num_train, spare // instructions) if instructions else 0
    if baseline_train < 1:
      instructions = baseline_train = 0
  return Plan(sources, per_text, train, instructions, baseline_train)


def stratified_order(labels: np.ndarray, seed: int) -> np.ndarray:
  """A permutation of the examples whose every prefix is as class-balanced as
  the data allows (classes take turns, each shuffled by `seed`)."""
  rng = np.random.default_rng(seed)
  queues = [list(rng.permutation(np.flatnonzero(labels == k))) for k in np.unique(labels)]
  order = []
  while any(queues):
    for q in queues:
      if q:
        order.append(q.pop(0))
  return np.asarray(order, np.int64)
