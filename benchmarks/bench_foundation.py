"""Foundation benchmark: batched model calls under plain `jax.jit(jax.vmap(...))`.

(a) `vmap` of N in {8, 64, 256} `fake:echo` calls of 100 ms each, under plain
    `jax.jit`, with the fake provider's default concurrency limit (256) and a
    limit of 64. Bar: wall <= 1.2 x ceil(N / limit) x 100 ms. Beside it, a
    plain `io_callback` under `vmap` doing the same sleep, which XLA runs one
    row after another (N x 100 ms). That baseline is measured for N in
    {8, 64}; for N = 256 it is extrapolated from the N = 64 run (labelled),
    unless `--full-baseline` (25 s more).
(b) Per-call overhead at zero latency: 1,000 `fake:echo` calls and 1,000
    no-op `host_op` calls under `jax.jit(jax.vmap(...))`, beside a bare
    `ThreadPoolExecutor.map` of 1,000 no-ops on as many workers. Bar:
    <= 100 us per call.

Usage:
  python benchmarks/bench_foundation.py [--full-baseline] [--repeats 3]
      [--out benchmarks/results/foundation.json]

Prints a markdown table and writes the numbers as JSON (and the table as
markdown beside it).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import environment
import xcs_jax
from xcs_jax import models, text

LATENCY_S = 0.1
SIZES = (8, 64, 256)
LIMITS = (256, 64)
OVERHEAD_CALLS = 1000
OVERHEAD_BAR_US = 100.0
MAX_LEN = 16


def _prompts(n: int) -> jax.Array:
  return jnp.asarray(text.encode([f"prompt {i}" for i in range(n)], MAX_LEN))


def _time(fn, repeats: int) -> list[float]:
  """Wall seconds of `fn()` (results blocked on), after one warm-up run."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times


def bench_latency(repeats: int, full_baseline: bool) -> list[dict]:
  """(a): N fake calls of 100 ms, xcs_jax vs a plain io_callback."""
  rows = []
  for limit in LIMITS:
    echo = models.bind("fake:echo", latency_s=LATENCY_S, output_bytes=MAX_LEN,
                       concurrency=limit)
    f = jax.jit(jax.vmap(echo))
    for n in SIZES:
      if n < limit and limit != LIMITS[0]:
        continue  # a limit above N changes nothing
      x = _prompts(n)
      wall = min(_time(lambda: f(x), repeats))
      bar = 1.2 * math.ceil(n / limit) * LATENCY_S
      rows.append(dict(n=n, limit=limit, wall_s=wall, bar_s=bar, ok=wall <= bar))

  def sleepy(row):
    time.sleep(LATENCY_S)
    return np.asarray(row)

  def plain(x):
    return jax.experimental.io_callback(
        sleepy, jax.ShapeDtypeStruct(x.shape, x.dtype), x, ordered=False)

  g = jax.jit(jax.vmap(plain))
  baseline = {}
  for n in SIZES:
    if n == 256 and not full_baseline:
      continue
    x = _prompts(n)
    compiled = g.lower(x).compile()
    start = time.perf_counter()
    jax.block_until_ready(compiled(x))  # one run: N x 100 ms each time
    baseline[n] = (time.perf_counter() - start, "measured")
  if 256 not in baseline:
    baseline[256] = (baseline[64][0] * 256 / 64, "extrapolated from N=64")
  for r in rows:
    r["io_callback_s"], r["io_callback_how"] = baseline[r["n"]]
  return rows


def bench_overhead(repeats: int) -> list[dict]:
  """(b): per-call cost at zero latency, 1,000 calls in one vmapped batch."""
  n = OVERHEAD_CALLS
  x = _prompts(n)
  echo = models.bind("fake:echo", output_bytes=MAX_LEN)  # latency 0, limit 256
  noop_op = xcs_jax.host_op(lambda t: np.float32(0),
                            out_spec=jax.ShapeDtypeStruct((), jnp.float32),
                            name="bench_noop")
  cases = [
      ("xcs_jax fake:echo, jit(vmap)", jax.jit(jax.vmap(echo)), echo.concurrency()),
      ("xcs_jax host_op no-op, jit(vmap)", jax.jit(jax.vmap(noop_op)), 256),
  ]
  rows = []
  for name, f, _ in cases:
    times = _time(lambda: f(x), repeats)
    per_us = statistics.median(times) / n * 1e6
    rows.append(dict(case=name, calls=n, total_ms=statistics.median(times) * 1e3,
                     per_call_us=per_us, bar_us=OVERHEAD_BAR_US, ok=per_us <= OVERHEAD_BAR_US))

  pool = cf.ThreadPoolExecutor(max_workers=256)
  noop = lambda i: i  # noqa: E731
  times = _time(lambda: list(pool.map(noop, range(n))), repeats)
  pool.shutdown()
  rows.append(dict(case="bare ThreadPoolExecutor(256).map of no-ops", calls=n,
                   total_ms=statistics.median(times) * 1e3,
                   per_call_us=statistics.median(times) / n * 1e6,
                   bar_us=None, ok=None))
  return rows


def render(latency: list[dict], overhead: list[dict], env: dict) -> str:
  lines = [
      f"jax {env['jax']}, Python {env['python']}, {env['cpus']} CPUs ({env['machine']}); "
      f"best of {env['repeats']} runs for (a), median for (b).",
      "",
      "(a) `jax.jit(jax.vmap(bind('fake:echo', latency_s=0.1, concurrency=limit)))`, "
      "N calls of 100 ms",
      "",
      "| N | limit | xcs_jax wall (s) | bar 1.2 x ceil(N/limit) x 0.1 s | within bar "
      "| plain io_callback under vmap (s) | speedup |",
      "|---:|---:|---:|---:|:---:|---:|---:|",
  ]
  for r in latency:
    how = "" if r["io_callback_how"] == "measured" else f" ({r['io_callback_how']})"
    lines.append(
        f"| {r['n']} | {r['limit']} | {r['wall_s']:.3f} | {r['bar_s']:.2f} | "
        f"{'yes' if r['ok'] else 'NO'} | {r['io_callback_s']:.2f}{how} | "
        f"{r['io_callback_s'] / r['wall_s']:.0f}x |")
  lines += [
      "",
      f"(b) per-call overhead at zero latency, {OVERHEAD_CALLS:,} calls in one batch",
      "",
      "| case | total (ms) | per call (us) | bar (us) | within bar |",
      "|---|---:|---:|---:|:---:|",
  ]
  for r in overhead:
    bar = "" if r["bar_us"] is None else f"{r['bar_us']:.0f}"
    ok = "" if r["ok"] is None else ("yes" if r["ok"] else "NO")
    lines.append(f"| {r['case']} | {r['total_ms']:.1f} | {r['per_call_us']:.1f} | "
                 f"{bar} | {ok} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--full-baseline", action="store_true",
                      help="also measure the N=256 io_callback baseline (25.6 s)")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "foundation.json"))
  args = parser.parse_args(argv)

  env = environment.describe("bench_foundation.py", argv, repeats=args.repeats)
  latency = bench_latency(args.repeats, args.full_baseline)
  overhead = bench_overhead(args.repeats)
  table = render(latency, overhead, env)
  print(table)

  environment.save(args.out, env, dict(latency=latency, overhead=overhead), table)
  ok = all(r["ok"] for r in latency) and all(r["ok"] is not False for r in overhead)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
