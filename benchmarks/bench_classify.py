"""The classify recipe on real sentences, and how well its calls use the pool.

(a) The recipe end to end, as a user runs it:
      python -m xcs_jax.recipes.classify --train benchmarks/data/sst2_train200.tsv \
          --eval benchmarks/data/sst2_validation.tsv --model local:smollm2 \
          --label-names 0=negative,1=positive
    (200 SST-2 training sentences, 500 validation sentences; see
    benchmarks/data/README.md). Its table and JSON line are kept. No bar on
    accuracy here (docs/optimization.md reports it); the run must finish.
(b) Scoring 600 texts (the 200 training + the first 400 validation
    sentences) with the local model through the recipe's feature path
    (`score_options` under the first instruction, batches of 64 under
    `xcs_jax.jit`): wall time beside the sum of the calls' own time
    (`xcs_jax.usage()[...]['seconds']`) divided by the provider's
    concurrency (the pool's instances). Bar: wall <= 1.2 x that, i.e. the
    pool is busy >= 83% of the wall time (batching, the pool and prompt-state
    reuse leave little idle). The literal sum (no division) is printed too.

Usage:
  python benchmarks/bench_classify.py [--skip-recipe] [--skip-scoring]
      [--out benchmarks/results/classify.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import environment
import xcs_jax
from xcs_jax import models
from xcs_jax._src.recipes import features, learn, table

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TRAIN = os.path.join(HERE, "data", "sst2_train200.tsv")
EVAL = os.path.join(HERE, "data", "sst2_validation.tsv")
RECIPE = ["-m", "xcs_jax.recipes.classify", "--train", os.path.relpath(TRAIN, ROOT),
          "--eval", os.path.relpath(EVAL, ROOT), "--model", "local:smollm2",
          "--label-names", "0=negative,1=positive"]
BAR = 1.2


def bench_recipe() -> dict:
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, *RECIPE, "--no-progress"], cwd=ROOT,
                        capture_output=True, text=True, check=True)
  lines = proc.stdout.strip().splitlines()
  return dict(command="python " + " ".join(RECIPE), wall_s=time.perf_counter() - start,
              summary=json.loads(lines[-1]), table="\n".join(lines[:-1]))


def bench_scoring(n: int = 600) -> dict:
  train = table.read_table(TRAIN)
  val = table.read_table(EVAL)
  texts = list(train.texts + val.texts)[:n]
  names = ("negative", "positive")
  source = learn.default_sources(names)[0]
  binding = models.bind("local:smollm2")
  features.compute_features(binding, source, texts[:4], progress=False)  # load and compile
  xcs_jax.reset_usage()
  start = time.perf_counter()
  features.compute_features(binding, source, texts, progress=False)
  wall = time.perf_counter() - start
  usage = binding.usage()
  concurrency = binding.concurrency()
  per_lane = usage.seconds / concurrency
  return dict(n=len(texts), calls=usage.calls, wall_s=wall, call_seconds=usage.seconds,
              concurrency=concurrency, call_seconds_per_instance=per_lane,
              ratio=wall / per_lane, ratio_to_sum=wall / usage.seconds,
              ms_per_text=1000 * wall / len(texts), bar=BAR, ok=wall <= BAR * per_lane)


def render(recipe, scoring, env) -> str:
  lines = [f"jax {env['jax']}, Python {env['python']}, {env['cpus']} CPUs "
           f"({env['machine']}), {env['date']}; load average {env['load_before']:.1f} "
           f"before, {env['load_after']:.1f} after", ""]
  if recipe:
    s = recipe["summary"]
    lines += [f"(a) `{recipe['command']}`: {recipe['wall_s']:.0f} s", "", "```",
              recipe["table"], "```", "",
              f"eval accuracy {s['eval_accuracy']:.3f} (baseline "
              f"{s['baseline']['eval_accuracy']:.3f}), {s['calls']} calls, "
              f"{s['seconds']:.0f} s", ""]
  if scoring:
    r = scoring
    lines += [
        f"(b) scoring {r['n']} texts (local:smollm2, {r['concurrency']} instances)", "",
        "| wall (s) | sum of call time (s) | / instances (s) | wall / (sum / instances) "
        "| bar | wall / sum | ms per text |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {r['wall_s']:.1f} | {r['call_seconds']:.1f} | {r['call_seconds_per_instance']:.1f} "
        f"| {r['ratio']:.3f} | <= {r['bar']} ({'yes' if r['ok'] else 'NO'}) "
        f"| {r['ratio_to_sum']:.3f} | {r['ms_per_text']:.0f} |"]
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--skip-recipe", action="store_true", help="only (b)")
  parser.add_argument("--skip-scoring", action="store_true", help="only (a)")
  parser.add_argument("--out", default=os.path.join(HERE, "results", "classify.json"))
  args = parser.parse_args(argv)
  env = environment.describe("bench_classify.py", argv)
  scoring = None if args.skip_scoring else bench_scoring()
  recipe = None if args.skip_recipe else bench_recipe()
  env["load_after"] = os.getloadavg()[0]
  out = render(recipe, scoring, env)
  print(out)
  environment.save(args.out, env, dict(recipe=recipe, scoring=scoring), out)
  return 0 if scoring is None or scoring["ok"] else 1


if __name__ == "__main__":
  sys.exit(main())
