"""What profiling costs, and what critical-path-first scheduling gains.

(a) Overhead per call of 1,000 zero-latency calls, three forms:
    `xcs_jax.jit(jax.vmap(noop))` and 1,000 call sites `jnp.stack([noop(x[i])
    ...])` of a no-op `host_op` (threads), and `xcs_jax.jit(jax.vmap(echo))`
    of `fake:echo` (the async path). Three codes take turns in one process:
    tracing off, an `xcs_jax.profiler.trace` recording, and (with
    `--baseline REF`) the code of git revision REF, which has no profiling
    at all, imported beside it under another package name. Per process: the
    fastest of `--repeats` runs of each (the least disturbed by other work
    on the shared cores) and their differences; then the median of those
    differences over `--rounds` fresh processes, and their range.
    Bars: tracing off costs <= 1 us per call more than REF; tracing on
    <= 10 us per call more than off. Writing the trace file is reported
    separately (once per trace, not per call).
(b) Critical-path-first under a limit of 4 calls at once. A DAG given in
    this program order: 12 independent `fake` calls of 100 ms, three chains
    of 3 calls of 50 ms, one call of 600 ms. Its critical path (600 ms) is
    also the best any schedule can do (the work, 2.25 s over 4 slots, fits
    in it). First come, first served starts the 100 ms calls first and
    the 600 ms call only at 300 ms. Run with slots handed out first come,
    first served (FIFO), with critical-path-first on a fresh runtime (no call
    measured yet: every call counts the same), and with it after one run has
    measured every call site. Limits: `max_concurrency=4`, and bindings with
    `concurrency=4` (one limit for the provider; each 100 ms call has a
    binding of its own, so they stay separate calls).
    Bars: FIFO >= 1.3 x best; measured <= 1.1 x best.

Usage:
  python benchmarks/bench_profiling.py [--baseline REF] [--rounds 9] [--repeats 20]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import environment
import xcs_jax
from xcs_jax import models, text

F32 = jax.ShapeDtypeStruct((), jnp.float32)
CALLS = 1000
OFF_BAR_US = 1.0
ON_BAR_US = 10.0
FIFO_BAR = 1.3
MEASURED_BAR = 1.1
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


# --- (a) overhead -------------------------------------------------------------------

BEFORE = "xcs_jax_before"   # the package name the code of `--baseline` is imported under


def _noop(x):
  return np.float32(0)


def _overhead_cases(lib) -> dict:
  """The three forms, built with `lib` (xcs_jax, or the code before profiling)."""
  noop = lib.host_op(_noop, out_spec=F32, name="bench_profiling_noop")
  echo = lib.models.bind("fake:echo", output_bytes=8)
  xs = jnp.arange(float(CALLS), dtype=jnp.float32)
  prompts = jnp.asarray(lib.text.encode([f"p{i}" for i in range(CALLS)], 8))

  def call_sites(x):
    return jnp.stack([noop(x[i]) for i in range(CALLS)])

  return {"`host_op` vmap (threads)": functools.partial(lib.jit(jax.vmap(noop)), xs),
          "`host_op` 1,000 call sites": functools.partial(lib.jit(call_sites), xs),
          "`fake:echo` vmap (async)": functools.partial(lib.jit(jax.vmap(echo)), prompts)}


def overhead_worker(repeats: int, before_path: str | None) -> dict:
  """Per-call microseconds of each form in this process, the fastest of
  `repeats` runs of each code: `off` (no trace), `on` (an
  `xcs_jax.profiler.trace` recording) and `before` (the code of the
  baseline), taking turns so that all see the same load."""
  codes = {"off": _overhead_cases(xcs_jax)}
  if before_path:
    sys.path.insert(0, before_path)
    codes["before"] = _overhead_cases(__import__(BEFORE))
  for cases in codes.values():
    for run in cases.values():
      environment.wall(run)
      environment.wall(run)
  path = os.path.join(tempfile.mkdtemp(), "trace.json")
  times: dict = {}
  write = []
  for _ in range(repeats):
    for form in codes["off"]:
      for code, cases in codes.items():
        times.setdefault((form, code), []).append(environment.wall(cases[form]))
      with xcs_jax.profiler.trace(path):
        times.setdefault((form, "on"), []).append(environment.wall(codes["off"][form]))
        entered = time.perf_counter()
      write.append(time.perf_counter() - entered)
  out: dict = {}
  for (form, code), ts in times.items():
    out.setdefault(form, {})[code] = min(ts) / CALLS * 1e6
  events = len(json.load(open(path))["traceEvents"])
  return dict(forms=out, write_us_per_event=statistics.median(write) / events * 1e6)


def _export(ref: str) -> str:
  """The package at git revision `ref`, importable as `BEFORE` (its own
  imports renamed), in a temporary directory."""
  where = tempfile.mkdtemp(prefix="xcs_baseline_")
  archive = subprocess.run(["git", "-C", REPO, "archive", ref, "xcs_jax"], check=True,
                           capture_output=True).stdout
  subprocess.run(["tar", "-x", "-C", where], input=archive, check=True)
  package = os.path.join(where, BEFORE)
  os.rename(os.path.join(where, "xcs_jax"), package)
  for folder, _, files in os.walk(package):
    for name in files:
      if name.endswith(".py"):
        file = os.path.join(folder, name)
        with open(file) as f:
          source = f.read()
        with open(file, "w") as f:
          f.write(re.sub(r"\bxcs_jax\b", BEFORE, source))
  return where


def bench_overhead(rounds: int, repeats: int, baseline: str | None) -> dict:
  before_path = _export(baseline) if baseline else None
  runs = []
  for _ in range(rounds):       # a fresh process each: fresh heap, threads, jax
    cmd = [sys.executable, os.path.join(HERE, "bench_profiling.py"), "--worker",
           "--repeats", str(repeats)] + (["--before-path", before_path] if before_path else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
    runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
  rows = []
  for form in runs[0]["forms"]:
    per = [r["forms"][form] for r in runs]
    on_cost = [p["on"] - p["off"] for p in per]        # each process's own difference
    row = dict(form=form, off_us=statistics.median(p["off"] for p in per),
               on_us=statistics.median(p["on"] for p in per),
               on_cost_us=statistics.median(on_cost), on_cost_range_us=(min(on_cost),
                                                                        max(on_cost)),
               base_us=None, off_cost_us=None, off_cost_range_us=None)
    if before_path:
      off_cost = [p["off"] - p["before"] for p in per]
      row.update(base_us=statistics.median(p["before"] for p in per),
                 off_cost_us=statistics.median(off_cost),
                 off_cost_range_us=(min(off_cost), max(off_cost)))
    row["ok"] = ((row["off_cost_us"] is None or row["off_cost_us"] <= OFF_BAR_US)
                 and row["on_cost_us"] <= ON_BAR_US)
    rows.append(row)
  write = statistics.median(r["write_us_per_event"] for r in runs)
  return dict(rows=rows, write_us_per_event=write, baseline=baseline)


# --- (b) critical-path-first --------------------------------------------------------------

SHORTS, SHORT_S = 12, 0.1
CHAINS, CHAIN_LEN, CHAIN_S = 3, 3, 0.05
LONG_S = 0.6
SLOTS = 4
BEST_S = LONG_S   # the critical path; the work (2.25 s) / 4 slots = 0.56 s fits in it


def dag_program(concurrency: int | None):
  extra = {} if concurrency is None else {"concurrency": concurrency}
  # Each short call its own binding (system prompts differ; fake ignores them),
  # so that they stay separate calls, each taking its own slot, in order.
  shorts = [models.bind("fake:echo", latency_s=SHORT_S, output_bytes=16,
                        system_prompt=f"short {i}", **extra) for i in range(SHORTS)]
  link = models.bind("fake:echo", latency_s=CHAIN_S, output_bytes=16, **extra)
  long = models.bind("fake:echo", latency_s=LONG_S, output_bytes=16, **extra)

  def program(prompts):
    outs = [short(prompts[i]) for i, short in enumerate(shorts)]
    for c in range(CHAINS):
      x = prompts[SHORTS + c]
      for _ in range(CHAIN_LEN):
        x = link(x)
      outs.append(x)
    outs.append(long(prompts[-1]))
    return jnp.stack(outs)
  return program


def bench_schedule(repeats: int) -> list[dict]:
  from xcs_jax._src.jit import priority   # the switch between FIFO and critical-path-first
  prompts = jnp.asarray(text.encode([f"q{i}" for i in range(SHORTS + CHAINS + 1)], 16))
  rows = []
  for limit_name, jit_kw, concurrency in (
      ("`max_concurrency=4`", dict(max_concurrency=SLOTS), None),
      ("provider `concurrency=4`", {}, SLOTS)):
    f = xcs_jax.jit(dag_program(concurrency), **jit_kw)
    times = {"fifo": [], "unmeasured": [], "measured": []}
    with xcs_jax.runtime(cache=False):
      f(prompts)                                   # trace, compile, measure
      for _ in range(repeats):
        priority.CRITICAL_PATH_FIRST = False
        times["fifo"].append(environment.wall(lambda: f(prompts)))
        priority.CRITICAL_PATH_FIRST = True
        times["measured"].append(environment.wall(lambda: f(prompts)))
        with xcs_jax.runtime(cache=False):         # nothing measured in this one
          times["unmeasured"].append(environment.wall(lambda: f(prompts)))
    best = {k: min(v) for k, v in times.items()}
    rows.append(dict(limit=limit_name, best_s=BEST_S, **{f"{k}_s": v for k, v in best.items()},
                     fifo_ratio=best["fifo"] / BEST_S,
                     unmeasured_ratio=best["unmeasured"] / BEST_S,
                     measured_ratio=best["measured"] / BEST_S,
                     ok=best["fifo"] / BEST_S >= FIFO_BAR
                     and best["measured"] / BEST_S <= MEASURED_BAR))
  return rows


# --- the report ---------------------------------------------------------------------------

def yes(ok: bool) -> str:
  return "yes" if ok else "**no**"


def render(res: dict, env: dict) -> str:
  ov = res["overhead"]
  base = ov["baseline"]
  lines = [
      f"jax {env['jax']}, Python {env['python']}, {env['cpus']} CPUs ({env['machine']}), "
      f"load {env['load_before']:.1f} before; (a): the three codes take turns in each "
      f"process, fastest of {env['repeats']} runs each; median (and range) of the "
      f"differences over {env['rounds']} processes; (b): best of "
      f"{env['schedule_repeats']} runs.",
      "",
      f"(a) Overhead per call, 1,000 zero-latency calls. Bars: tracing off <= "
      f"{OFF_BAR_US:g} us per call over revision `{base or '(not measured)'}` (no "
      f"profiling); tracing on <= {ON_BAR_US:g} us per call over off.",
      "",
      "| form | before (us/call) | tracing off (us/call) | off - before (range) "
      "| tracing on (us/call) | on - off (range) | within bars |",
      "|---|---:|---:|---:|---:|---:|:---:|"]
  for r in ov["rows"]:
    b = "-" if r["base_us"] is None else f"{r['base_us']:.2f}"
    d = ("-" if r["off_cost_us"] is None else "{:+.2f} ({:+.2f} to {:+.2f})".format(
        r["off_cost_us"], *r["off_cost_range_us"]))
    on = "{:+.2f} ({:+.2f} to {:+.2f})".format(r["on_cost_us"], *r["on_cost_range_us"])
    lines.append(f"| {r['form']} | {b} | {r['off_us']:.2f} | {d} | {r['on_us']:.2f} | "
                 f"{on} | {yes(r['ok'])} |")
  lines += [
      "",
      f"Writing the trace file: {ov['write_us_per_event']:.2f} us per event, once, when "
      "the `trace` block ends.",
      "",
      f"(b) Critical-path-first under a limit of {SLOTS} calls at once: {SHORTS} x "
      f"{SHORT_S * 1e3:.0f} ms calls, {CHAINS} chains of {CHAIN_LEN} x "
      f"{CHAIN_S * 1e3:.0f} ms, one {LONG_S * 1e3:.0f} ms call, in that program order. "
      f"Best achievable: {BEST_S * 1e3:.0f} ms (the critical path). Bars: FIFO >= "
      f"{FIFO_BAR} x best; measured <= {MEASURED_BAR} x best.",
      "",
      "| limit | FIFO (ms) | FIFO / best | no measurements (ms) | / best | measured (ms) "
      "| measured / best | within bars |",
      "|---|---:|---:|---:|---:|---:|---:|:---:|"]
  for r in res["schedule"]:
    lines.append(f"| {r['limit']} | {r['fifo_s'] * 1e3:.0f} | {r['fifo_ratio']:.2f} | "
                 f"{r['unmeasured_s'] * 1e3:.0f} | {r['unmeasured_ratio']:.2f} | "
                 f"{r['measured_s'] * 1e3:.0f} | {r['measured_ratio']:.2f} | "
                 f"{yes(r['ok'])} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--baseline", default=None,
                      help="git revision without profiling to compare tracing-off with")
  parser.add_argument("--rounds", type=int, default=9)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--schedule-repeats", type=int, default=3)
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--before-path", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--out", default=os.path.join(HERE, "results", "profiling.json"))
  args = parser.parse_args(argv)
  if args.worker:
    print(json.dumps(overhead_worker(args.repeats, args.before_path)))
    return 0
  env = environment.describe("bench_profiling.py", argv, repeats=args.repeats,
                             rounds=args.rounds, schedule_repeats=args.schedule_repeats)
  start = time.perf_counter()
  res = dict(overhead=bench_overhead(args.rounds, args.repeats, args.baseline),
             schedule=bench_schedule(args.schedule_repeats))
  env["total_s"] = time.perf_counter() - start
  table = render(res, env)
  print(table)
  print(f"\n(total {env['total_s']:.0f} s)")
  environment.save(args.out, env, res, table)
  ok = all(r["ok"] for r in res["overhead"]["rows"]) and all(r["ok"] for r in res["schedule"])
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
