"""Planning a run's model calls within a budget, before any call is made.

Counting: each item of a provider call counts once, whatever its number of
options (a `score_options` call over 4 options is 1 call); cache hits do not
count (a plan never relies on them: it is an upper bound).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Plan(NamedTuple):
  """How many calls each part of a run may make.

  Attributes:
    num_sources: feature sources of the learned program (a prefix of the
      candidate sources).
    num_train: training texts the program learns from (a stratified subset
      when the budget cannot score them all).
    baseline_instructions: candidate instructions the baseline tries (0: no
      baseline).
    baseline_train: training texts the baseline judges each candidate on.
  """
  num_sources: int
  num_train: int
  baseline_instructions: int
  baseline_train: int

  def program_calls(self, num_eval: int) -> int:
    return self.num_sources * (self.num_train + num_eval)

  def baseline_calls(self, num_eval: int) -> int:
    if not self.baseline_instructions:
      return 0
    return self.baseline_instructions * self.baseline_train + num_eval

  def calls(self, num_eval: int) -> int:
    return self.program_calls(num_eval) + self.baseline_calls(num_eval)


def plan(budget: int | None, *, num_train: int, num_eval: int, num_sources: int,
         num_instructions: int, num_classes: int, baseline: bool) -> Plan:
  """The largest run that fits `budget` calls (None: no cap).

  The program and the baseline get the same share (half each with a
  baseline); the baseline never makes more calls than the program. The
  program keeps every training text and drops sources first (the labels are
  the scarce part); only when one source over all texts does not fit does it
  learn from fewer texts.

  Raises:
    ValueError: the budget cannot pay for one source over the evaluation
      texts and two training texts per class.
  """
  if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool)
                             or budget < 1):
    raise ValueError(f"`--budget` must be a positive number of model calls; got {budget!r}.")
  share = None if budget is None else (budget // 2 if baseline else budget)
  per_text = num_train + num_eval
  sources, train = num_sources, num_train
  if share is not None and share < sources * per_text:
    sources = share // per_text
    if sources == 0:
      sources, train = 1, share - num_eval
  least = 2 * num_classes
  if train < least:
    need = (num_eval + least) * (2 if baseline else 1)
    raise ValueError(
        f"`--budget {budget}` is too small: one call per evaluation text ({num_eval}) and "
        f"per training text for at least {least} training texts (2 per class) needs "
        f"{need} calls{' with the baseline' if baseline else ''}. Raise `--budget` to at "
        f"least {need}{', or pass `--no-baseline`' if baseline else ''}.")
  program = sources * (train + num_eval)
  instructions = baseline_train = 0
  if baseline and num_instructions:
    spare = program - num_eval   # the baseline matches the program's calls
    instructions = min(num_instructions, max(spare, 0))
    baseline_train = min(num_train, spare // instructions) if instructions else 0
    if baseline_train < 1:
      instructions = baseline_train = 0
  return Plan(sources, train, instructions, baseline_train)


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
