"""Ensemble + majority vote + judge on the embedded local model.

For each question, a sampler model answers N times (one PRNG key each), a
majority vote picks the most frequent answer (tensor code) and a judge model
writes a final answer from the candidates. The questions are independent, so
`xcs_jax.jit` runs their calls concurrently; plain `jax.jit` runs every host
call of the compiled program one after another (XLA:CPU, measured: five
independent 200 ms calls in one `jax.jit` take 1 s). The program is
the same for both.

On 2 CPU cores the local model is compute-bound (two llama.cpp instances
share the cores), so the measured speedup here is modest; it grows with
calls that wait on latency (remote APIs, a server elsewhere: try
`--model fake:choice --latency 0.2`).

`--trace run.json` records one more steady-state call of the jitted program
in a Perfetto / Chrome trace (open it at ui.perfetto.dev) and prints the
plan with its measured times (docs/profiling.md walks through one).

Run: .venv/bin/python examples/ensemble_judge.py [--model local:smollm2] [--trace run.json]
"""
from __future__ import annotations

import argparse
import time

import jax

import xcs_jax
from xcs_jax import models, patterns, text

QUESTIONS = [
    "What is the capital of France?",
    "What color is the sky on a clear day?",
    "How many legs does a spider have?",
]


def build(model: str, latency: float, samples: int):
  extra = {"latency_s": latency} if model.startswith("fake:") else {}
  sampler = models.bind(model, temperature=0.8, max_tokens=16, output_bytes=256, **extra)
  judge = models.bind(model, temperature=0.0, max_tokens=32, output_bytes=512, **extra)

  def program(questions, key):
    keys = jax.random.split(key, questions.shape[0])
    results = []
    for i in range(questions.shape[0]):  # independent questions: independent calls
      answers = patterns.ensemble(sampler, questions[i], n=samples, key=keys[i])
      results.append((answers, patterns.majority_vote(answers),
                      patterns.judge(judge, questions[i], answers)))
    return results
  return program


def timed(f, *args):
  start = time.perf_counter()
  out = jax.block_until_ready(f(*args))
  return out, time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="local:smollm2")
  parser.add_argument("--latency", type=float, default=0.2,
                      help="latency_s of a fake model (ignored for real ones)")
  parser.add_argument("--samples", type=int, default=3)
  parser.add_argument("--trace", default=None, metavar="PATH",
                      help="write a trace of one more call of the jitted program to PATH")
  args = parser.parse_args()

  program = build(args.model, args.latency, args.samples)
  questions = text.encode(QUESTIONS, 96)
  key = jax.random.key(0)

  fast = xcs_jax.jit(program)
  plain = jax.jit(program)
  # Timed without the response cache, which would answer the repeated
  # (seeded, so deterministic) requests of the second calls.
  with xcs_jax.runtime(cache=False):
    _, first_xcs = timed(fast, questions, key)    # trace, plan, compile, load the model
    _, first_jax = timed(plain, questions, key)
    out_xcs, t_xcs = timed(fast, questions, key)
    out_jax, t_jax = timed(plain, questions, key)
    if args.trace:
      with xcs_jax.profiler.trace(args.trace):
        timed(fast, questions, key)

  for q, (answers, vote, final) in zip(QUESTIONS, out_xcs):
    print(f"Q: {q}")
    for a in text.decode(answers):
      print(f"   sample: {a.strip()!r}")
    print(f"   vote:   {text.decode(vote).strip()!r}")
    print(f"   judge:  {text.decode(final).strip()!r}")
  same = all(bool((a == b).all()) for a, b in zip(jax.tree_util.tree_leaves(out_xcs),
                                                   jax.tree_util.tree_leaves(out_jax)))
  stats = xcs_jax.get_jit_stats(fast)
  print(f"\nmodel {args.model}: {len(QUESTIONS)} questions x ({args.samples} samples + "
        f"1 judge), strategy {stats['execution_strategy']!r}, "
        f"{stats['orchestration_ops']} host calls, estimated speedup "
        f"{stats['estimated_speedup']:.1f}x")
  print(f"first call (trace+compile+load): xcs_jax.jit {first_xcs:.2f} s, "
        f"jax.jit {first_jax:.2f} s")
  print(f"steady state: xcs_jax.jit {t_xcs:.2f} s, plain jax.jit {t_jax:.2f} s -> "
        f"measured speedup {t_jax / t_xcs:.2f}x (same answers: {same})")
  if args.trace:
    print(f"\ntrace of one more call written to {args.trace} (open it at ui.perfetto.dev)")
    print(fast.profile_report())


if __name__ == "__main__":
  main()
