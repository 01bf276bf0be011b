"""The classify recipe: learn a text classifier on a small model's numbers.

`fit` learns a `Program` from labelled texts (see `learn.py` for what it
fits and why); `run` is the whole recipe the command line runs:
plan the calls within a budget, learn (or load) a program, run the
prompt-search baseline (with a budget, on the same share of it as the
program), evaluate both, and return a summary. `main` is the command line
(`python -m xcs_jax.recipes.classify`).
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Any, Sequence

import numpy as np

from xcs_jax._src.models import bind
from xcs_jax._src.recipes import baseline as baseline_lib
from xcs_jax._src.recipes import budget as budget_lib
from xcs_jax._src.recipes import features as features_lib
from xcs_jax._src.recipes import learn as learn_lib
from xcs_jax._src.recipes import program as program_lib
from xcs_jax._src.recipes import prompts
from xcs_jax._src.recipes import table as table_lib
from xcs_jax._src.recipes.learn import FitResult
from xcs_jax._src.runtime import current_runtime

DEFAULT_MODEL = "local:smollm2"


def fit(texts: Sequence[str], labels: Sequence[Any], *, model: str = DEFAULT_MODEL,
        label_names: dict[str, str] | None = None,
        instructions: Sequence[str] = prompts.DEFAULT_INSTRUCTIONS,
        embeddings: bool = True, max_sources: int | None = None, seed: int = 0,
        batch_size: int = features_lib.DEFAULT_BATCH_SIZE,
        progress: bool = True) -> FitResult:
  """Learns a classification program from labelled texts.

  Makes each candidate source's calls once per text (a label-contrast
  embedding, option log-probabilities under each instruction, embeddings),
  then fits a linear head per source (L2 by cross-validation on these texts
  alone, no further calls); the program averages their logits.

  Args:
    texts: the training texts.
    labels: their labels, any hashable values (compared as strings); at
      least two classes.
    model: a binding spec that can score options and embed, e.g.
      `"local:smollm2"`.
    label_names: the word the model reads for a label, e.g.
      `{"0": "negative", "1": "positive"}` (default: the label itself).
    instructions: candidate instructions, templates with `{labels}` and
      optionally `{text}` (see `xcs_jax.recipes.classify.DEFAULT_INSTRUCTIONS`).
    embeddings: also try embeddings of the texts.
    max_sources: use only the first this-many candidate sources (fewer
      calls: see `default_sources` for the order and `Source.calls_per_text`).
    seed: the cross-validation folds.
    batch_size: texts per batched host call.
    progress: tqdm bars on stderr.

  Returns:
    A `FitResult`: `.program` predicts (`program.predict(texts)`) and saves
    (`program.save(folder)`); `.trials` is what was tried.

  Examples:
    >>> result = fit(texts, labels, model="local:smollm2",
    ...              label_names={"0": "negative", "1": "positive"})
    >>> result.program.predict(["a gorgeous, witty film"])
  """
  labels = [str(label) for label in labels]
  if len(texts) != len(labels):
    raise ValueError(f"`texts` and `labels` must have the same length; got {len(texts)} "
                     f"texts and {len(labels)} labels.")
  for i, t in enumerate(texts):
    if not isinstance(t, str) or not t.strip():
      raise ValueError(f"`texts[{i}]` must be a non-empty string; got {t!r}.")
  labelset = table_lib.label_set(labels, label_names, "the training data")
  y = np.asarray(labelset.indices(labels, "the training data"), np.int32)
  sources = learn_lib.default_sources(labelset.names, instructions, embeddings)
  if max_sources is not None:
    sources = sources[:max_sources]
  if not sources:
    raise ValueError("no sources to learn from: give at least one instruction, or "
                     "`embeddings=True`, and `max_sources` >= 1.")
  features, _ = _compute(bind(model), sources, texts, "train", batch_size, progress)
  return learn_lib.learn(model, labelset, sources, features, y, seed=seed,
                         progress=progress)


def _compute(binding, sources, texts, split: str, batch_size: int, progress: bool
             ) -> tuple[list[np.ndarray], list[float]]:
  """Every source's features of `texts`, and the seconds each took."""
  features, seconds = [], []
  for i, source in enumerate(sources):
    start = time.perf_counter()
    features.append(features_lib.compute_features(
        binding, source, texts, batch_size=batch_size, progress=progress,
        desc=f"{split}: source {i + 1}/{len(sources)}"))
    seconds.append(time.perf_counter() - start)
  return features, seconds


def _usage_totals() -> tuple[int, int]:
  """(calls, cache hits) over every binding of the current runtime, as
  `xcs_jax.usage()` reports them (a `cache_hits` counter counts where present)."""
  usage = current_runtime().usage.snapshot().values()
  return (int(sum(u.get("calls", 0) for u in usage)),
          int(sum(u.get("cache_hits", 0) for u in usage)))


def _accuracy(predicted: np.ndarray, truth: np.ndarray) -> float:
  return float(np.mean(np.asarray(predicted) == np.asarray(truth)))


def run(*, train: str | None = None, eval: str | None = None,  # pylint: disable=redefined-builtin
        model: str | None = None, text_column: str | None = None,
        label_column: str | None = None, label_names: str | dict | None = None,
        instructions: Sequence[str] | None = None, budget: int | None = None,
        baseline: bool = True, save: str | None = None, load: str | None = None,
        seed: int = 0, batch_size: int = features_lib.DEFAULT_BATCH_SIZE,
        progress: bool = True, out=print) -> dict:
  """The whole recipe, as the command line runs it; returns its summary.

  Learns a program from the `train` file (or loads one from `load`),
  evaluates it on the `eval` file, runs the prompt-search baseline (with a
  budget, on the same share of it as the program), and prints (through `out`) a table of what was tried.
  Arguments are the command line's options (see `main`).
  """
  start = time.perf_counter()
  calls0, hits0 = _usage_totals()
  if (train is None) == (load is None):
    raise ValueError("give `--train FILE` to learn a program, or `--load DIR` to use a "
                     "saved one (not both).")
  if load is not None and save is not None:
    raise ValueError("`--save` keeps a program learned with `--train`; with `--load` "
                     "there is nothing new to save.")
  if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
    raise ValueError(f"`--batch-size` must be a positive number of texts; got {batch_size!r}.")
  if isinstance(label_names, str) or label_names is None:
    label_names = table_lib.parse_label_names(label_names)
  instructions = tuple(instructions or prompts.DEFAULT_INSTRUCTIONS)
  for instruction in instructions:
    prompts.check_instruction(instruction)
  eval_table = None
  if eval is not None:
    eval_table = table_lib.read_table(eval, text_column=text_column, label_column=label_column)

  if load is not None:
    program = program_lib.load(load)
    if model is not None and model != program.model:
      raise ValueError(f"`--model {model}`: the program in {load} reads features of "
                       f"{program.model!r}; drop `--model`, or learn a program for "
                       f"{model!r} with `--train`.")
    if label_names:
      raise ValueError(f"`--label-names`: the program in {load} keeps the words it was "
                       f"learned with ({dict(zip(program.labels.labels, program.labels.names))});"
                       " drop `--label-names` when loading.")
    return _evaluate_loaded(program, eval_table, budget, batch_size, progress, out,
                            start, calls0, hits0)

  model = model or DEFAULT_MODEL
  train_table = table_lib.read_table(train, text_column=text_column,
                                     label_column=label_column)
  labelset = table_lib.label_set(train_table.labels, label_names, train)
  y_train = np.asarray(labelset.indices(train_table.labels, train), np.int32)
  y_eval = None
  if eval_table is not None:
    y_eval = np.asarray(labelset.indices(eval_table.labels, eval), np.int32)
  n_eval = len(eval_table.texts) if eval_table is not None else 0
  candidates = learn_lib.default_sources(labelset.names, instructions)
  plan = budget_lib.plan(budget, num_train=len(train_table.texts), num_eval=n_eval,
                         source_calls=[c.calls_per_text for c in candidates],
                         num_instructions=len(instructions),
                         num_classes=labelset.num_classes, baseline=baseline)
  order = budget_lib.stratified_order(y_train, seed)
  keep = np.sort(order[:plan.num_train])
  texts = [train_table.texts[i] for i in keep]
  y = y_train[keep]
  binding = bind(model)
  sources = candidates[:plan.num_sources]
  out(f"model {binding}; {len(texts)} training texts"
      f"{f' (of {len(train_table.texts)}, to fit --budget {budget})' if len(texts) < len(train_table.texts) else ''}"
      f", {n_eval} evaluation texts; classes "
      + ", ".join(f"{l}={n}" if l != n else l for l, n in zip(labelset.labels, labelset.names)))
  features, seconds = _compute(binding, sources, texts, "train", batch_size, progress)
  learn_start = time.perf_counter()
  result = learn_lib.learn(model, labelset, sources, features, y, seed=seed,
                           progress=progress)
  learn_seconds = time.perf_counter() - learn_start
  eval_features = None
  if eval_table is not None:
    eval_features, eval_seconds = _compute(binding, sources, eval_table.texts, "eval",
                                           batch_size, progress)
    seconds = [a + b for a, b in zip(seconds, eval_seconds)]
  program_calls = _usage_totals()[0] - calls0
  if save is not None:
    result.program.save(save)

  base = None
  if plan.baseline_instructions:
    templates = [c.template for c in candidates if c.kind == "score"]
    base_keep = np.sort(order[:plan.baseline_train])
    base = _run_baseline(binding, templates[:plan.baseline_instructions],
                         [train_table.texts[i] for i in base_keep], y_train[base_keep],
                         labelset, eval_table, y_eval, batch_size, progress)
  rows = [(trial, *_accuracies(trial.program, sources, features, y, eval_features, y_eval))
          for trial in result.trials]
  chosen = next(r for r in rows if r[0].chosen)
  out("")
  out(format_table(rows, sources, seconds, base, len(texts), n_eval))
  out(f"fitting every head above: {learn_seconds:.1f} s")
  calls, hits = _usage_totals()
  summary = {
      "eval_accuracy": chosen[2], "train_accuracy": chosen[1],
      "cv_accuracy": chosen[0].cv_accuracy, "calls": calls - calls0,
      "cache_hits": hits - hits0, "seconds": round(time.perf_counter() - start, 2),
      "program": chosen[0].description, "program_calls": program_calls,
      "calls_per_text": chosen[0].program.calls_per_text,
      "source_seconds": [round(x, 2) for x in seconds],
      "learn_seconds": round(learn_seconds, 2), "baseline": base, "model": model,
      "train_texts": len(texts), "eval_texts": n_eval,
      "classes": list(labelset.labels), "budget": budget, "seed": seed,
  }
  return summary


def _run_baseline(binding, templates, texts, y, labelset, eval_table, y_eval, batch_size,
                  progress) -> dict:
  """The prompt-search baseline and its summary."""
  calls_before, start = _usage_totals()[0], time.perf_counter()
  found = baseline_lib.search_instructions(
      binding, templates, texts, y, labelset.names,
      eval_table.texts if eval_table is not None else None, batch_size=batch_size,
      progress=progress)
  return {"instruction": templates[found.best],
          "train_accuracy": found.train_accuracy[found.best],
          "candidates_train_accuracy": list(found.train_accuracy),
          "train_texts": len(texts),
          "eval_accuracy": (_accuracy(found.eval_predictions, y_eval)
                            if y_eval is not None else None),
          "calls": _usage_totals()[0] - calls_before,
          "seconds": round(time.perf_counter() - start, 2)}


def _accuracies(program, sources, features, y, eval_features, y_eval):
  """(train, eval) accuracy of `program` from every source's features."""
  picked = [sources.index(s) for s in program.sources]
  train = _accuracy(program.logits([features[i] for i in picked]).argmax(-1), y)
  if eval_features is None:
    return train, None
  return train, _accuracy(program.logits([eval_features[i] for i in picked]).argmax(-1),
                          y_eval)


def _evaluate_loaded(program, eval_table, budget, batch_size, progress, out, start,
                     calls0, hits0) -> dict:
  if eval_table is None:
    raise ValueError("`--load` needs `--eval FILE`: the texts to classify and score.")
  n = len(eval_table.texts)
  need = program.calls_per_text * n
  if budget is not None and need > budget:
    raise ValueError(f"`--budget {budget}` is too small: the loaded program makes "
                     f"{program.calls_per_text} call(s) per text, {need} for {n} texts. "
                     f"Raise `--budget` to at least {need}.")
  y_eval = np.asarray(program.labels.indices(eval_table.labels, eval_table.path), np.int32)
  predicted = program.predict_indices(eval_table.texts, batch_size=batch_size,
                                      progress=progress)
  calls, hits = _usage_totals()
  acc = _accuracy(predicted, y_eval)
  out(f"loaded program: {program.description} ({program.model}); eval accuracy "
      f"{acc:.3f} on {n} texts")
  return {"eval_accuracy": acc, "train_accuracy": None, "cv_accuracy": None,
          "calls": calls - calls0, "cache_hits": hits - hits0,
          "seconds": round(time.perf_counter() - start, 2), "program": program.description,
          "program_calls": calls - calls0, "calls_per_text": program.calls_per_text,
          "baseline": None,
          "model": program.model, "train_texts": 0, "eval_texts": n,
          "classes": list(program.labels.labels), "budget": budget, "seed": None}


def _pct(x: float | None) -> str:
  return "   -  " if x is None else f"{x:6.3f}"


def format_table(rows, sources, seconds, base, n_train: int, n_eval: int) -> str:
  """What the recipe tried: cross-validated, training and evaluation accuracy."""
  n = n_train + n_eval
  lines = [f"sources (calls for {n_train} + {n_eval} texts, seconds):"]
  for i, (s, secs) in enumerate(zip(sources, seconds)):
    what = {"score": f"option log-probs {list(s.options)} of: {s.template!r}",
            "embed": f"embedding of: {s.template!r}",
            "contrast": f"label-contrast embedding of: {s.template!r} for {{label}} in "
                        f"{list(s.options)}"}[s.kind]
    lines.append(f"  [{i + 1}] {what} ({s.calls_per_text * n} calls, {secs:.0f} s)")
  base_what = ""
  if base is not None:
    base_what = (f"baseline: generated answer, best of {len(base['candidates_train_accuracy'])} "
                 f"instructions on {base['train_texts']} train texts")
  width = max([len(r[0].description) for r in rows] + [len(base_what)])
  lines.append("")
  lines.append(f"  {'program':<{width}}  calls/text  cv acc  train acc  eval acc")
  for trial, train_acc, eval_acc in rows:
    mark = "*" if trial.chosen else " "
    lines.append(f"{mark} {trial.description:<{width}}  {trial.program.calls_per_text:>10}  "
                 f"{_pct(trial.cv_accuracy)}  {_pct(train_acc):>9}  {_pct(eval_acc):>8}")
  if base is not None:
    lines.append(f"  {base_what:<{width}}  {1:>10}  {'   -  '}  {_pct(base['train_accuracy']):>9}  "
                 f"{_pct(base['eval_accuracy']):>8}")
    lines.append(f"  (baseline's choice: {base['instruction']!r}; {base['calls']} calls, "
                 f"{base['seconds']:.0f} s)")
  lines.append(f"* the learned program; {n_train} train / {n_eval} eval texts; cv acc = "
               "accuracy of out-of-fold predictions (5-fold cross-validation on train)")
  return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m xcs_jax.recipes.classify",
      description="Learn a text classifier from a small model's option log-probabilities "
                  "and embeddings (heads trained with optax, chosen by cross-validation "
                  "on the training file), beside a prompt-search baseline. The last line "
                  "printed is a JSON summary.")
  parser.add_argument("--train", help="labelled training file (.tsv, or .csv), header line first")
  parser.add_argument("--eval", help="labelled evaluation file, same columns")
  parser.add_argument("--model", default=None,
                      help=f"binding spec, e.g. local:smollm2 (default {DEFAULT_MODEL}, or "
                           "the loaded program's)")
  parser.add_argument("--text-column", default=None, help="text column name (default: first)")
  parser.add_argument("--label-column", default=None, help="label column name (default: last)")
  parser.add_argument("--label-names", default=None,
                      help="words for labels stored as codes, e.g. 0=negative,1=positive")
  parser.add_argument("--instruction", action="append", default=None, dest="instructions",
                      help="a candidate instruction (repeat for several); may use {labels} "
                           "and {text}. Default: three generic ones")
  parser.add_argument("--budget", type=int, default=None,
                      help="max model calls of the whole run (each item of a provider call "
                           "counts once; cache hits do not count). Default: no cap")
  parser.add_argument("--no-baseline", dest="baseline", action="store_false",
                      help="skip the prompt-search baseline")
  parser.add_argument("--save", default=None, metavar="DIR", help="save the learned program")
  parser.add_argument("--load", default=None, metavar="DIR",
                      help="load a saved program instead of learning one (needs --eval)")
  parser.add_argument("--seed", type=int, default=0,
                      help="cross-validation folds and training subsets")
  parser.add_argument("--batch-size", type=int, default=features_lib.DEFAULT_BATCH_SIZE,
                      help="texts per batched model call")
  parser.add_argument("--no-progress", dest="progress", action="store_false",
                      help="no progress bars")
  return parser


def main(argv: Sequence[str] | None = None) -> dict:
  """The command line; prints the table, then the JSON summary as the last line."""
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    summary = run(**vars(args))
  except (table_lib.TableError, ValueError, FileNotFoundError) as e:
    parser.exit(2, f"{parser.prog}: error: {e}\n")
  print(json.dumps(summary), flush=True)
  return summary
