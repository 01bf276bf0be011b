"""The local provider (llama.cpp, SmolLM2-135M) per item: scoring vs generating.

For N prompts, one after another on one model instance (no concurrency, so
the numbers are per-item costs):
- `generate` with `max_tokens=4` (a few-token answer);
- `score_options` with K = 2 and K = 4 options, with the prompt's KV state
  reused across options (`reuse_prompt_state=True`, the default) and without
  (prompt + option evaluated afresh per option);
- `embed` of the prompt.

Values are checked equal with and without reuse (max abs difference printed).

Usage:
  python benchmarks/bench_local_provider.py [--n 8] [--out benchmarks/results/local_provider.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import numpy as np

import xcs_jax
from xcs_jax.extend import CallContext
from xcs_jax._src.providers import base
from xcs_jax.models import bind

# Timed without the response cache, which would answer repeated requests.
os.environ.setdefault("XCS_JAX_CACHE", "off")

PROMPTS = [
    "Is the movie review 'a delight from start to finish' positive or negative?",
    "Is the movie review 'two hours I will never get back' positive or negative?",
    "Is the movie review 'the cast shines in every scene' positive or negative?",
    "Is the movie review 'dull, slow and predictable' positive or negative?",
    "Is the movie review 'I laughed and cried, wonderful' positive or negative?",
    "Is the movie review 'a mess of a plot' positive or negative?",
    "Is the movie review 'beautifully shot and acted' positive or negative?",
    "Is the movie review 'boring beyond words' positive or negative?",
]
OPTIONS = {2: ("Positive.", "Negative."),
           4: ("Positive.", "Negative.", "Neutral.", "Mixed.")}


def per_item(fn, prompts) -> float:
  times = []
  for p in prompts:
    start = time.perf_counter()
    fn(p)
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--n", type=int, default=8)
  parser.add_argument("--out", default="benchmarks/results/local_provider.json")
  args = parser.parse_args()
  prompts = (PROMPTS * (args.n // len(PROMPTS) + 1))[:args.n]
  provider = xcs_jax.current_runtime().provider("local")
  # One instance per kind of call: per-item costs without concurrency.
  m = bind("local:smollm2", max_tokens=4, pool_size=1)
  ctx = CallContext()
  for mode in ("generate", "score", "embed"):      # load every instance first
    {"generate": lambda: provider.generate(m, "hi", 0, ctx),
     "score": lambda: provider.score_options(m, "hi", ("a", "b"), ctx),
     "embed": lambda: provider.embed(m, "hi", ctx)}[mode]()

  rows = [("generate, max_tokens=4", per_item(
      lambda p: provider.generate(m, p, 0, ctx), prompts))]
  max_diff = 0.0
  for k, options in OPTIONS.items():
    values = {}
    for reuse in (True, False):
      b = m.replace(reuse_prompt_state=reuse)
      got = []
      rows.append((f"score_options K={k}, reuse_prompt_state={reuse}", per_item(
          lambda p, b=b, got=got: got.append(provider.score_options(b, p, options, ctx)),
          prompts)))
      values[reuse] = np.stack(got)
    max_diff = max(max_diff, float(np.abs(values[True] - values[False]).max()))
  rows.append(("embed", per_item(lambda p: provider.embed(m, p, ctx), prompts)))

  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  lines = [f"Local provider per item (median of {args.n}; one instance; "
           f"{os.cpu_count()} cores, load average {load:.1f} at the end)", "",
           "| call | ms per item |", "|---|---|"]
  lines += [f"| {name} | {1000 * t:.0f} |" for name, t in rows]
  lines += ["", f"max |reuse - no reuse| over all scores: {max_diff:.2e}",
            "", "Command: .venv/bin/python benchmarks/bench_local_provider.py"]
  table = "\n".join(lines)
  print(table)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"date": datetime.datetime.now().isoformat(timespec="seconds"),
               "machine": platform.platform(), "cores": os.cpu_count(),
               "load_average": load, "n": args.n, "max_reuse_diff": max_diff,
               "ms_per_item": {name: 1000 * t for name, t in rows}}, f, indent=2)
  with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
    f.write(table + "\n")


if __name__ == "__main__":
  main()
