"""Numeric model outputs: `score_options` and `embed` through the primitives.

(a) The embedded local model (SmolLM2-135M, llama.cpp), per item, through the
    public API under plain `jax.jit` on a batch of N reviews from
    examples/data/sentiment.jsonl, formatted with the calibration example's
    prompt (instruction first, review last): generating a few-token answer
    (`max_tokens=4`) against `score_options` with K = 2 and K = 4 options,
    with the prompt's KV state reused (`reuse_prompt_state=True`, the default:
    the prompt is evaluated once for all K options, and the part shared with
    the previous prompt is not evaluated again) and without (prompt + option
    evaluated afresh per option); and `embed`. One model instance per kind
    of call (`pool_size=1`, 2 threads), so these are per-item costs, not
    concurrency. Values with and without reuse are compared. No bar: the
    numbers depend on the shared cores' load, which is printed.
(b) `vmap` of 64 `fake` `score_options` / `embed` calls of 100 ms under plain
    `jax.jit`: one batched host call that fans out concurrently. Bar: wall <=
    1.2 x ceil(64 / limit) x 100 ms (limit 256, the fake default), the same as
    generation. Beside it, a plain `io_callback` under `vmap` (64 x 100 ms, one
    row after another), and one function making both a `score_options` and an
    `embed` call under `jax.jit` (run one after the other) and `xcs_jax.jit`
    (run at once).

Usage:
  python benchmarks/bench_numeric.py [--n 24] [--skip-local] [--repeats 3]
      [--out benchmarks/results/numeric.json]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import jax
import numpy as np

import environment
import xcs_jax
from xcs_jax import models, text

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))
import calibrate_classifier as example  # noqa: E402  (the data set and its prompt)

OPTIONS = {2: ("positive", "negative"), 4: ("positive", "negative", "neutral", "mixed")}
LATENCY_S = 0.1
N_FAKE = 64


def _best(fn, repeats: int) -> float:
  """Best wall seconds of `fn()` (blocked on) over `repeats`, after a warm-up."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return min(times)


def bench_local(n: int) -> tuple[list[dict], float]:
  data = example.load_dataset()
  texts = (data["test"].texts + data["train"].texts)[:n]
  prompts = example.encode_prompts(texts)
  base = models.bind("local:smollm2", pool_size=1, n_threads=2, max_tokens=4,
                     output_bytes=64, overflow="truncate")
  cases = [("generate, max_tokens=4", jax.jit(base))]
  for k, options in OPTIONS.items():
    for reuse in (True, False):
      b = base.replace(reuse_prompt_state=reuse)
      cases.append((f"score_options K={k}, reuse_prompt_state={reuse}",
                    jax.jit(lambda p, b=b, o=options: b.score_options(p, o))))
  cases.append(("embed", jax.jit(base.embed)))
  # Load every instance and compile every function before timing.
  for _, f in cases:
    jax.block_until_ready(f(prompts[:2]))
  rows, values = [], {}
  for name, f in cases:
    start = time.perf_counter()
    out = jax.block_until_ready(f(prompts))
    seconds = time.perf_counter() - start
    values[name] = np.asarray(out)
    rows.append(dict(case=name, n=n, total_s=seconds, ms_per_item=1000 * seconds / n))
  gen = rows[0]["ms_per_item"]
  for r in rows:
    r["vs_generate"] = r["ms_per_item"] / gen
  diff = max(float(np.abs(values[f"score_options K={k}, reuse_prompt_state=True"]
                          - values[f"score_options K={k}, reuse_prompt_state=False"]).max())
             for k in OPTIONS)
  return rows, diff


def bench_fake(repeats: int) -> list[dict]:
  prompts = text.encode([f"review {i}: great food" for i in range(N_FAKE)], 32)
  b = models.bind("fake:echo", latency_s=LATENCY_S)
  limit = b.concurrency()
  bar = 1.2 * math.ceil(N_FAKE / limit) * LATENCY_S
  rows = []
  for name, f in [
      ("score_options K=2", jax.jit(jax.vmap(lambda p: b.score_options(p, OPTIONS[2])))),
      ("score_options K=4", jax.jit(jax.vmap(lambda p: b.score_options(p, OPTIONS[4])))),
      ("embed D=64", jax.jit(jax.vmap(b.embed))),
  ]:
    wall = _best(lambda: f(prompts), repeats)
    rows.append(dict(case=f"jax.jit(vmap) of {N_FAKE} {name}", wall_s=wall, bar_s=bar,
                     ok=wall <= bar))

  def sleepy(row):
    time.sleep(LATENCY_S)
    return np.zeros(2, np.float32)

  plain = jax.jit(jax.vmap(lambda p: jax.experimental.io_callback(
      sleepy, jax.ShapeDtypeStruct((2,), np.float32), p, ordered=False)))
  compiled = plain.lower(prompts).compile()
  start = time.perf_counter()
  jax.block_until_ready(compiled(prompts))  # one run: 64 x 100 ms
  rows.append(dict(case=f"plain io_callback under jax.jit(vmap), {N_FAKE} rows",
                   wall_s=time.perf_counter() - start, bar_s=None, ok=None))

  def both(p):
    return b.score_options(p, OPTIONS[2]), b.embed(p)
  one = prompts[0]
  for name, f in [("jax.jit", jax.jit(both)), ("xcs_jax.jit", xcs_jax.jit(both))]:
    rows.append(dict(case=f"{name}: one score_options + one embed call (100 ms each)",
                     wall_s=_best(lambda f=f: f(one), repeats), bar_s=None, ok=None))
  return rows


def render(local, diff, fake, env) -> str:
  lines = [f"jax {env['jax']}, Python {env['python']}, {env['cpus']} CPUs "
           f"({env['machine']}), {env['date']}", ""]
  if local:
    lines += [
        f"(a) local:smollm2, {local[0]['n']} reviews in one `jax.jit` batch, one instance "
        f"per kind of call (pool_size=1, n_threads=2); load average "
        f"{env['load_before']:.1f} before, {env['load_after']:.1f} after",
        "",
        "| call | ms per item | x generate |",
        "|---|---:|---:|",
    ]
    lines += [f"| {r['case']} | {r['ms_per_item']:.0f} | {r['vs_generate']:.2f} |"
              for r in local]
    lines += ["", f"max |scores with reuse - without| = {diff:.2e}", ""]
  lines += [
      f"(b) fake, latency 100 ms per call; best of {env['repeats']} after a warm-up "
      "(the io_callback row: one run)",
      "",
      "| case | wall (s) | bar 1.2 x ceil(64/256) x 0.1 s | within bar |",
      "|---|---:|---:|:---:|",
  ]
  for r in fake:
    bar = "" if r["bar_s"] is None else f"{r['bar_s']:.2f}"
    ok = "" if r["ok"] is None else ("yes" if r["ok"] else "NO")
    lines.append(f"| {r['case']} | {r['wall_s']:.3f} | {bar} | {ok} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--n", type=int, default=24, help="reviews for (a)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--skip-local", action="store_true", help="only (b)")
  parser.add_argument("--out", default=os.path.join(HERE, "results", "numeric.json"))
  args = parser.parse_args(argv)
  env = environment.describe("bench_numeric.py", argv, repeats=args.repeats)
  local, diff = ([], 0.0) if args.skip_local else bench_local(args.n)
  env["load_after"] = os.getloadavg()[0]
  fake = bench_fake(args.repeats)
  table = render(local, diff, fake, env)
  print(table)
  environment.save(args.out, env, dict(local=local, max_reuse_diff=diff, fake=fake), table)
  return 0 if all(r["ok"] is not False for r in fake) else 1


if __name__ == "__main__":
  sys.exit(main())
