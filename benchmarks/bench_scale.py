"""`xcs_jax.jit` on code as people write it, at scale.

(f) 1,000 call sites combined by ordinary Python: `sum(op(x + i) for i in
    range(1000))`, with `op` a zero-latency no-op `host_op` (threads), and
    `sum(echo(prompts[i])[0] for i in range(1000))` with a zero-latency
    `fake:echo` model call (the async path; its first byte summed). First call (trace, passes, compile, run) beside plain
    `jax.jit`'s first call of the same function; steady state per call beside
    a bare `ThreadPoolExecutor(256).map` and a bare `asyncio.gather` of the
    same number of no-op coroutines, interleaved.
    Bars: first call <= 2 x jax.jit's; steady state <= 10 us per call.
(g) Vmapped two-call chains: `jax.vmap(lambda a: second(first(a) + 1))` over 8
    items, `host_op`s sleeping 50 / 200 ms alternately (item i: 50 ms then
    200 ms, or 200 then 50), so every item takes 250 ms while a level-by-level
    schedule takes 200 + 200 ms. Beside a level-by-level `ThreadPoolExecutor`.
    Bar: wall <= 1.05 x the critical path (250 ms).
(h) Memory of 10,000 calls in flight: `xcs_jax.jit(vmap)` of 10,000 `fake`
    calls sleeping 2 s (the async path), and of 10,000 `host_op` calls
    sleeping 2 s with `concurrency=10000` (one thread each), each in a fresh
    process: resident memory at the peak minus before the call.
    Bar (fake, async): <= 200 MB. host_op on threads: measured and reported.

Usage:
  python benchmarks/bench_scale.py [--repeats 5] [--out benchmarks/results/scale.json]
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import functools
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import environment
import xcs_jax
from xcs_jax import models, text

F32 = jax.ShapeDtypeStruct((), jnp.float32)
SUM_CALLS = 1000
FIRST_CALL_BAR = 2.0
PER_CALL_BAR_US = 10.0
CHAIN_ITEMS = 8
CHAIN_FAST_S, CHAIN_SLOW_S = 0.05, 0.2
CHAIN_BAR = 1.05
INFLIGHT = 10_000
INFLIGHT_SLEEP_S = 2.0
MEMORY_BAR_MB = 200.0


def _wall(fn) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


# --- (f) a Python sum over 1,000 call sites -------------------------------------------

def _noop(x):
  return np.float32(0)


def _sum_programs():
  noop = xcs_jax.host_op(_noop, out_spec=F32, name="bench_scale_noop")
  echo = models.bind("fake:echo", output_bytes=8)
  prompts = jnp.asarray(text.encode([f"p{i}" for i in range(SUM_CALLS)], 8))

  def host_sum(x):
    return sum(noop(x + i) for i in range(SUM_CALLS))

  def model_sum(x):
    return sum(echo(prompts[i])[0].astype(jnp.float32) * x for i in range(SUM_CALLS))

  return {"`host_op` no-op (threads)": host_sum, "`fake:echo` (async)": model_sum}


def bench_sum(repeats: int) -> list[dict]:
  x = jnp.float32(1.0)
  rows = []
  pool = cf.ThreadPoolExecutor(max_workers=256)
  items = [np.float32(i) for i in range(SUM_CALLS)]
  loop = asyncio.new_event_loop()

  async def nothing():
    return None

  async def gather():
    return await asyncio.gather(*(nothing() for _ in range(SUM_CALLS)))

  baselines = {
      "tpe": lambda: list(pool.map(_noop, items)),
      "asyncio": lambda: loop.run_until_complete(gather()),
  }
  for name, program in _sum_programs().items():
    # First calls: fresh functions (jax.jit caches per function object).
    xcs_first = _wall(lambda: xcs_jax.jit(functools.partial(program))(x))
    jax_first = _wall(lambda: jax.jit(functools.partial(program))(x))
    jitted = xcs_jax.jit(program)
    np.testing.assert_array_equal(jitted(x), jax.jit(program)(x))
    cases = {"xcs": functools.partial(jitted, x), **baselines}
    times = {k: [] for k in cases}
    for run in cases.values():
      _wall(run)
    for _ in range(repeats):     # interleaved: all see the same machine load
      for k, run in cases.items():
        times[k].append(_wall(run))
    per = {k: statistics.median(v) / SUM_CALLS * 1e6 for k, v in times.items()}
    stats = xcs_jax.get_jit_stats(jitted)
    rows.append(dict(op=name, xcs_first_s=xcs_first, jax_first_s=jax_first,
                     first_ratio=xcs_first / jax_first, per_call_us=per["xcs"],
                     tpe_us=per["tpe"], asyncio_us=per["asyncio"],
                     segments=stats["plan_segments"], host_calls=stats["plan_host_calls"],
                     ok=xcs_first / jax_first <= FIRST_CALL_BAR
                     and per["xcs"] <= PER_CALL_BAR_US))
  pool.shutdown()
  loop.close()
  return rows


# --- (g) vmapped chains ------------------------------------------------------------------

def _sleeper(name):
  def host(x, seconds):
    time.sleep(float(seconds))
    return np.float32(x + 1)
  return xcs_jax.host_op(host, out_spec=F32, name=name)


def bench_chain(repeats: int) -> dict:
  first, second = _sleeper("first"), _sleeper("second")
  lat1 = jnp.asarray([CHAIN_FAST_S if i % 2 == 0 else CHAIN_SLOW_S
                      for i in range(CHAIN_ITEMS)], jnp.float32)
  lat2 = jnp.asarray([CHAIN_SLOW_S if i % 2 == 0 else CHAIN_FAST_S
                      for i in range(CHAIN_ITEMS)], jnp.float32)

  def chain(a, l1, l2):
    return jax.vmap(lambda x, s1, s2: second(first(x, s1) + 1.0, s2))(a, l1, l2)

  a = jnp.arange(float(CHAIN_ITEMS))
  jitted = xcs_jax.jit(chain)
  _wall(lambda: jitted(a, lat1, lat2))
  xcs_s = min(_wall(lambda: jitted(a, lat1, lat2)) for _ in range(repeats))
  pool = cf.ThreadPoolExecutor(max_workers=CHAIN_ITEMS)

  def level_by_level():
    list(pool.map(time.sleep, np.asarray(lat1).tolist()))
    list(pool.map(time.sleep, np.asarray(lat2).tolist()))

  level_by_level()
  level_s = min(_wall(level_by_level) for _ in range(repeats))
  pool.shutdown()
  critical = CHAIN_FAST_S + CHAIN_SLOW_S
  return dict(xcs_s=xcs_s, critical_path_s=critical, level_s=level_s,
              ratio=xcs_s / critical, level_ratio=level_s / critical,
              streams=xcs_jax.get_jit_stats(jitted)["plan_streams"],
              ok=xcs_s / critical <= CHAIN_BAR)


# --- (h) memory of 10,000 calls in flight -------------------------------------------------

_MEMORY_CHILD = r"""
import sys, threading, time
import jax, jax.numpy as jnp, numpy as np
import xcs_jax
from xcs_jax import models, text

def rss_mb():
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024

n, sleep_s, kind = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
if kind == "fake":
  b = models.bind("fake:echo", latency_s=sleep_s, concurrency=n, output_bytes=16,
                  timeout_s=60.0)
  f = xcs_jax.jit(jax.vmap(b))
  arg = jnp.asarray(text.encode([f"p{i}" for i in range(n)], 16))
  warm = arg[:8]
else:
  op = xcs_jax.host_op(lambda x: (time.sleep(sleep_s), np.float32(x))[1],
                       out_spec=jax.ShapeDtypeStruct((), jnp.float32), concurrency=n)
  f = xcs_jax.jit(jax.vmap(op))
  arg = jnp.arange(float(n))
  warm = arg[:8]
f(warm)                      # compile, start the loop: not counted
f(arg[:8] if kind != "fake" else arg[:8])
before = rss_mb()
peak = [before]
done = threading.Event()

def sample():
  while not done.is_set():
    peak[0] = max(peak[0], rss_mb())
    time.sleep(0.05)

t = threading.Thread(target=sample, daemon=True)
t.start()
start = time.perf_counter()
f(arg).block_until_ready()
wall = time.perf_counter() - start
done.set(); t.join()
print(f"{peak[0] - before:.1f} {wall:.3f}")
"""


def bench_memory() -> list[dict]:
  rows = []
  for kind in ("fake", "host_op"):
    out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(INFLIGHT),
                          str(INFLIGHT_SLEEP_S), kind], capture_output=True, text=True,
                         timeout=600)
    if out.returncode != 0:
      raise RuntimeError(f"memory child ({kind}) failed:\n{out.stderr[-2000:]}")
    extra_mb, wall_s = map(float, out.stdout.split()[-2:])
    rows.append(dict(kind=kind, extra_mb=extra_mb, wall_s=wall_s,
                     bar_mb=MEMORY_BAR_MB if kind == "fake" else None,
                     ok=extra_mb <= MEMORY_BAR_MB if kind == "fake" else True))
  return rows


# --- report --------------------------------------------------------------------------------

def yes(ok: bool) -> str:
  return "yes" if ok else "**NO**"


def render(res: dict, env: dict) -> str:
  lines = [
      f"jax {env['jax']}, Python {env['python']}, {env['cpus']} CPUs ({env['machine']}), "
      f"load {env['load_before']:.1f} before; (f): medians of {env['repeats']} interleaved "
      f"rounds; (g): best of {env['repeats']}; (h): one run each in a fresh process.",
      "",
      f"(f) {SUM_CALLS:,} call sites combined by Python `sum`. Bars: first call <= "
      f"{FIRST_CALL_BAR} x `jax.jit`'s; steady state <= {PER_CALL_BAR_US:.0f} us per call.",
      "",
      "| op | first call: xcs_jax.jit (s) | jax.jit (s) | ratio | per call (us) "
      "| bare TPE (us) | bare asyncio (us) | plan: segments / host calls | within bars |",
      "|---|---:|---:|---:|---:|---:|---:|---|:---:|",
  ]
  for r in res["sum"]:
    lines.append(
        f"| {r['op']} | {r['xcs_first_s']:.2f} | {r['jax_first_s']:.2f} | "
        f"{r['first_ratio']:.2f} | {r['per_call_us']:.1f} | {r['tpe_us']:.1f} | "
        f"{r['asyncio_us']:.1f} | {r['segments']} / {r['host_calls']} | {yes(r['ok'])} |")
  c = res["chain"]
  lines += [
      "",
      f"(g) `vmap` of a two-call chain over {CHAIN_ITEMS} items, {CHAIN_FAST_S * 1e3:.0f} / "
      f"{CHAIN_SLOW_S * 1e3:.0f} ms alternating. Bar: wall <= {CHAIN_BAR} x the critical "
      "path.",
      "",
      "| critical path (ms) | xcs_jax.jit (ms) | xcs / critical path | streams in the plan "
      "| level-by-level TPE (ms) | level-by-level / critical path | within bar |",
      "|---:|---:|---:|---:|---:|---:|:---:|",
      f"| {c['critical_path_s'] * 1e3:.0f} | {c['xcs_s'] * 1e3:.0f} | {c['ratio']:.3f} | "
      f"{c['streams']} | {c['level_s'] * 1e3:.0f} | {c['level_ratio']:.2f} | "
      f"{yes(c['ok'])} |",
      "",
      f"(h) {INFLIGHT:,} calls in flight at once ({INFLIGHT_SLEEP_S:.0f} s each), "
      f"`xcs_jax.jit(vmap)`. Bar (fake, async path): <= {MEMORY_BAR_MB:.0f} MB.",
      "",
      "| calls | extra resident memory at the peak (MB) | wall (s) | bar | within bar |",
      "|---|---:|---:|---:|:---:|",
  ]
  names = {"fake": "`fake` (async: no thread per call)",
           "host_op": "`host_op`, `concurrency=10000` (one thread per call)"}
  for r in res["memory"]:
    bar = f"{r['bar_mb']:.0f} MB" if r["bar_mb"] else "reported"
    lines.append(f"| {names[r['kind']]} | {r['extra_mb']:.0f} | {r['wall_s']:.2f} | {bar} | "
                 f"{yes(r['ok'])} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "scale.json"))
  args = parser.parse_args(argv)
  env = environment.describe("bench_scale.py", argv, repeats=args.repeats)
  start = time.perf_counter()
  res = dict(sum=bench_sum(args.repeats), chain=bench_chain(args.repeats),
             memory=bench_memory())
  env["total_s"] = time.perf_counter() - start
  table = render(res, env)
  print(table)
  print(f"\n(total {env['total_s']:.0f} s)")
  environment.save(args.out, env, res, table)
  ok = (all(r["ok"] for r in res["sum"]) and res["chain"]["ok"]
        and all(r["ok"] for r in res["memory"]))
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
