"""Endpoints at scale: response-cache hits, the rate limiter's accuracy, faults.

(a) Cache-hit overhead: `xcs_jax.jit(vmap)` of 10,000 `fake:echo` calls whose
    answers are all in the response cache, per hit, beside the same batch
    with the cache off (every call made, zero latency). Bar: <= 5 us per hit.
(b) Limiter accuracy: 300 zero-latency `fake:echo` calls through a binding
    with `rpm` set to 600, 1,200 and 3,000 (10, 20, 50 per second): the rate
    the requests actually went out at, past the first second's burst.
    Bar: within 10% of the set rate.
(c) Faults: 100,000 calls (`fake:echo`, zero latency) at 10% injected
    transient faults (`transient_rate=0.1`) with the default retry rules
    (retries until `deadline_s`), under `xcs_jax.jit(vmap)` and plain
    `jax.jit(vmap)`, beside the same batch without faults.
    Bar: 0 lost, results identical to the fault-free run.

Usage:
  python benchmarks/bench_endpoints.py [--calls 100000] [--out benchmarks/results/endpoints.json]
"""
from __future__ import annotations

import argparse
import gc
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

HITS = 10_000
HIT_BAR_US = 5.0
RATES = (600, 1200, 3000)         # per minute
RATE_CALLS = 300
RATE_BAR = 0.10
FAULT_RATE = 0.1


def _prompts(n: int, tag: str) -> jnp.ndarray:
  return jnp.asarray(text.encode([f"{tag}{i}" for i in range(n)], 16))


def _wall(fn) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def bench_cache(repeats: int) -> dict:
  # A runtime of its own with the cache on (environment.py turns it off for
  # the default runtime of every benchmark).
  with xcs_jax.runtime(name="bench-cache", cache=True):
    return _bench_cache(repeats)


def _bench_cache(repeats: int) -> dict:
  xs = _prompts(HITS, "hit")
  cached = models.bind("fake:echo", output_bytes=16, cache="memory")
  uncached = cached.replace(cache=None)
  f, g = xcs_jax.jit(jax.vmap(cached)), xcs_jax.jit(jax.vmap(uncached))
  f(xs), g(xs)                                   # fill the cache, compile
  times = {"hit": [], "call": []}
  # Interleaved, each round after a full collection: a round of 10,000 calls
  # allocates enough to set off Python's oldest-generation collection (about
  # 80 ms with this heap) in one round out of two, whichever form it is.
  for _ in range(repeats):
    gc.collect()
    times["hit"].append(_wall(lambda: f(xs)))
    gc.collect()
    times["call"].append(_wall(lambda: g(xs)))
  hit_us = statistics.median(times["hit"]) / HITS * 1e6
  call_us = statistics.median(times["call"]) / HITS * 1e6
  assert cached.usage().cache_hits == HITS * repeats
  return dict(hit_us=hit_us, call_us=call_us, ok=hit_us <= HIT_BAR_US)


def bench_limiter() -> list[dict]:
  rows = []
  for rpm in RATES:
    with xcs_jax.runtime(cache=False):
      b = models.bind("fake:echo", output_bytes=16, rpm=rpm, system_prompt=f"rate {rpm}")
      sent = []
      provider = xcs_jax.current_runtime().provider("fake")
      original = type(provider).generate

      async def stamped(binding, prompt, seed, ctx, _orig=original, _p=provider):
        sent.append(time.monotonic())
        return await _orig(_p, binding, prompt, seed, ctx)
      provider.generate = stamped
      xcs_jax.jit(jax.vmap(b))(_prompts(RATE_CALLS, f"r{rpm}-"))
    sent.sort()
    steady = [t for t in sent if t - sent[0] >= 1.0]
    measured = (len(steady) - 1) / (steady[-1] - steady[0]) * 60
    error = measured / rpm - 1
    rows.append(dict(rpm=rpm, measured_rpm=measured, error=error,
                     ok=abs(error) <= RATE_BAR))
  return rows


def bench_faults(calls: int) -> list[dict]:
  xs = _prompts(calls, "f")
  rows = []
  for form, wrap in (("xcs_jax.jit(vmap)", xcs_jax.jit), ("jax.jit(vmap)", jax.jit)):
    with xcs_jax.runtime(cache=False):
      clean = models.bind("fake:echo", output_bytes=16, system_prompt=f"clean {form}")
      faulty = clean.replace(transient_rate=FAULT_RATE, system_prompt=f"faulty {form}")
      want = np.asarray(wrap(jax.vmap(clean))(xs))
      start = time.perf_counter()
      got = np.asarray(wrap(jax.vmap(faulty))(xs))
      wall = time.perf_counter() - start
      u = faulty.usage()
    lost = int(np.sum(~np.all(got == want, axis=-1)))
    rows.append(dict(form=form, calls=calls, retries=u.retries, errors=u.errors, lost=lost,
                     identical=bool(np.array_equal(got, want)), wall_s=wall,
                     ok=lost == 0 and u.errors == 0 and np.array_equal(got, want)))
  return rows


def yes(ok: bool) -> str:
  return "yes" if ok else "**NO**"


def render(res: dict, env: dict) -> str:
  c = res["cache"]
  lines = [
      f"jax {env['jax']}, Python {env['python']}, {env['cpus']} CPUs ({env['machine']}), "
      f"load {env['load_before']:.1f} before; (a): medians of {env['repeats']} interleaved "
      "rounds, each after a `gc.collect()`.",
      "",
      f"(a) {HITS:,} calls answered by the response cache, `xcs_jax.jit(vmap)`. "
      f"Bar: <= {HIT_BAR_US:.0f} us per hit.",
      "",
      "| per hit (us) | the same calls made, cache off (us per call) | within bar |",
      "|---:|---:|:---:|",
      f"| {c['hit_us']:.2f} | {c['call_us']:.2f} | {yes(c['ok'])} |",
      "",
      f"(b) {RATE_CALLS} calls through `rpm=...`: the rate they went out at after the first "
      f"second. Bar: within {RATE_BAR:.0%}.",
      "",
      "| rpm set | rpm measured | error | within bar |",
      "|---:|---:|---:|:---:|",
  ]
  for r in res["limiter"]:
    lines.append(f"| {r['rpm']} | {r['measured_rpm']:.0f} | {r['error']:+.1%} | "
                 f"{yes(r['ok'])} |")
  lines += [
      "",
      f"(c) {res['faults'][0]['calls']:,} calls at {FAULT_RATE:.0%} injected transient faults, "
      "default retry rules. Bar: 0 lost, results identical to the fault-free run.",
      "",
      "| form | retries | errors | lost | identical to fault-free | wall (s) | within bar |",
      "|---|---:|---:|---:|:---:|---:|:---:|",
  ]
  for r in res["faults"]:
    lines.append(f"| {r['form']} | {r['retries']:,} | {r['errors']} | {r['lost']} | "
                 f"{yes(r['identical'])} | {r['wall_s']:.1f} | {yes(r['ok'])} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--calls", type=int, default=100_000)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "endpoints.json"))
  args = parser.parse_args(argv)
  env = environment.describe("bench_endpoints.py", argv, repeats=args.repeats)
  start = time.perf_counter()
  res = dict(cache=bench_cache(args.repeats), limiter=bench_limiter(),
             faults=bench_faults(args.calls))
  env["total_s"] = time.perf_counter() - start
  table = render(res, env)
  print(table)
  print(f"\n(total {env['total_s']:.0f} s)")
  environment.save(args.out, env, res, table)
  ok = (res["cache"]["ok"] and all(r["ok"] for r in res["limiter"])
        and all(r["ok"] for r in res["faults"]))
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
