"""Runtime benchmark: errors, interrupts, deep queues and per-call overhead.

Every number is a wall-clock time measured in this run, beside a baseline
measured in the same run (the ratio is wall / baseline). The runs go in the
order (d), (c), (a), (b), so the sleeps that (a) and (b) abandon in the
background cannot slow down (c) or (d).

(a) Error surfacing. Under `xcs_jax.jit`, one function makes a failing
    `fake:echo` call (`fail_on`, a prompt containing the substring) beside two
    sibling `host_op` calls that `time.sleep` S seconds (uncancellable) on an
    input independent of the failing call, for S in {1, 15}. Time from the
    call to the exception being caught (after a warm-up call with a passing
    prompt and S = 0, so no trace or compile is timed). Bar: < 0.1 s.
    Baseline: the same failing call alone under `xcs_jax.jit`. Right after
    each, a follow-up, unrelated `xcs_jax.jit(jax.vmap(fake:echo))` call on 8
    prompts at zero latency, while the abandoned sleeps still run. Bar:
    < 0.1 s. Baseline: the same call on an idle runtime, before any failure.
(b) Interrupt latency. In the main thread, `vmap` of 64 `host_op` calls that
    `time.sleep(5)` (concurrency 64), under `xcs_jax.jit` and eagerly; a
    `threading.Timer(0.3, _thread.interrupt_main)` fires. Time from the timer
    firing (taken in the timer just before `interrupt_main`) to the main thread
    catching `KeyboardInterrupt`. Bar: < 0.1 s for both. Baseline: the main
    thread waiting in a `concurrent.futures.wait(..., timeout=0.01)` loop on
    the same 64 sleeps submitted to a bare `ThreadPoolExecutor(64)`. Beside
    it, for reference (no bar), one blocking `concurrent.futures.wait`:
    `interrupt_main` only schedules the handler for the main thread's next
    bytecode, so a main thread blocked in an untimed wait sees it late.
(c) Deep queue and timeouts. `jax.jit(jax.vmap(op))` of 2,048 `host_op`
    calls that sleep 1 s, with `timeout_s=1.5` and `concurrency=2048`.
    Bar: it completes without raising. Baseline: a bare
    `ThreadPoolExecutor(2048).map` of the same 2,048 sleeps.
(d) Per-call overhead at zero latency: 1,000 `fake:echo` calls under
    `jax.jit(jax.vmap(...))` and under `xcs_jax.jit(jax.vmap(...))`, and 1,000
    no-op `host_op` calls under `jax.jit(jax.vmap(...))`, beside a bare
    `ThreadPoolExecutor(256).map` of 1,000 no-ops (the baseline of
    bench_foundation.py). One warm-up run each, then `--repeats` interleaved
    rounds (so machine load hits all alike); medians. Bar: median / the
    pool's median <= 1.2 (the median of the per-round ratios is reported
    beside it).

Each measurement runs in its own try/except: one that fails is reported (and
misses its bar) without hiding the others.

Usage:
  python benchmarks/bench_runtime.py [--repeats 15]
      [--out benchmarks/results/runtime.json]

Prints a markdown table, writes the numbers as JSON (and the table as
markdown beside it), and exits 1 if a bar is missed.
"""
from __future__ import annotations

import _thread
import argparse
import collections
import concurrent.futures as cf
import os
import statistics
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

import environment
import xcs_jax
from xcs_jax import models, text

MAX_LEN = 16
F32 = jax.ShapeDtypeStruct((), jnp.float32)

ERROR_SIBLING_S = (1.0, 15.0)
ERROR_BAR_S = 0.1
FOLLOW_UP_CALLS = 8
FOLLOW_UP_BAR_S = 0.1

INTERRUPT_CALLS = 64
INTERRUPT_SLEEP_S = 5.0
INTERRUPT_AFTER_S = 0.3
INTERRUPT_BAR_S = 0.1

DEEP_CALLS = 2048
DEEP_SLEEP_S = 1.0
DEEP_TIMEOUT_S = 1.5

OVERHEAD_CALLS = 1000
OVERHEAD_BAR_RATIO = 1.2


def _prompts(n: int) -> jax.Array:
  return jnp.asarray(text.encode([f"prompt {i}" for i in range(n)], MAX_LEN))


def _wall(fn) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def _failed(e: BaseException) -> str:
  """The error's type and the last line of its message (jax puts tracebacks in it)."""
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  msg = lines[-1] if lines else ""
  return f"{type(e).__name__}: {msg[:240]}".replace("|", "/")


class Sleeps:
  """Host functions that sleep their input's seconds, counting those in flight.

  The count tells whether abandoned sleeps still run, and lets a measurement
  wait for the previous one's to end.
  """

  def __init__(self):
    self._lock = threading.Lock()
    self._running = collections.Counter()

  def fn(self, label: str):
    def sleep(s):
      with self._lock:
        self._running[label] += 1
      try:
        time.sleep(float(s))
      finally:
        with self._lock:
          self._running[label] -= 1
      return np.float32(s)
    sleep.__name__ = f"sleep_{label}"
    return sleep

  def running(self, label: str) -> int:
    with self._lock:
      return self._running[label]

  def settle(self, label: str, max_s: float) -> float:
    """Waits (up to `max_s`) until no `label` sleep runs; returns the seconds waited."""
    start = time.perf_counter()
    while self.running(label) and time.perf_counter() - start < max_s:
      time.sleep(0.02)
    return time.perf_counter() - start


SLEEPS = Sleeps()


def row(section, case, wall, unit, bar, ok, baseline=None, baseline_wall=None, note="",
        **extra) -> dict:
  """One line of the table; `wall` and `baseline_wall` in seconds (us per call for (d))."""
  ratio = None if wall is None or not baseline_wall else wall / baseline_wall
  return dict(section=section, case=case, wall=wall, unit=unit, baseline=baseline,
              baseline_wall=baseline_wall, ratio=ratio, bar=bar, ok=ok, note=note, **extra)


# --- (d) per-call overhead ---------------------------------------------------------------

def bench_overhead(repeats: int) -> list[dict]:
  n = OVERHEAD_CALLS
  x = _prompts(n)
  echo = models.bind("fake:echo", output_bytes=MAX_LEN)  # latency 0, limit 256
  noop_op = xcs_jax.host_op(lambda t: np.float32(0), out_spec=F32, name="bench_runtime_noop")
  pool = cf.ThreadPoolExecutor(max_workers=256)
  noop = lambda i: i  # noqa: E731
  cases = {
      "bare ThreadPoolExecutor(256).map of no-ops": lambda: list(pool.map(noop, range(n))),
      "fake:echo, jax.jit(vmap)": lambda f=jax.jit(jax.vmap(echo)): f(x),
      "fake:echo, xcs_jax.jit(vmap)": lambda f=xcs_jax.jit(jax.vmap(echo)): f(x),
      "host_op no-op, jax.jit(vmap)": lambda f=jax.jit(jax.vmap(noop_op)): f(x),
  }
  times, errors = {name: [] for name in cases}, {}
  for name, run in cases.items():  # warm-up: traces, compiles, starts threads
    try:
      _wall(run)
    except Exception as e:  # noqa: BLE001
      errors[name] = _failed(e)
  for _ in range(repeats):  # interleaved, so all see the same machine load
    for name, run in cases.items():
      if name in errors:
        continue
      try:
        times[name].append(_wall(run))
      except Exception as e:  # noqa: BLE001
        errors[name] = _failed(e)
  pool.shutdown()

  base_name = next(iter(cases))
  base_us = (statistics.median(times[base_name]) / n * 1e6
             if base_name not in errors else None)
  rows = []
  for name in cases:
    if name == base_name:
      continue
    if name in errors:
      rows.append(row("d", f"{n:,} zero-latency calls: {name}", None, "us/call",
                      f"<= {OVERHEAD_BAR_RATIO} x pool", False, note=f"failed: {errors[name]}"))
      continue
    per_us = statistics.median(times[name]) / n * 1e6
    paired = (statistics.median(t / b for t, b in zip(times[name], times[base_name]))
              if base_us is not None else None)
    note = f"median of {repeats}" + ("" if paired is None else
                                     f"; median of the per-round ratios {paired:.2f}")
    r = row("d", f"{n:,} zero-latency calls: {name}", per_us, "us/call",
            f"<= {OVERHEAD_BAR_RATIO} x pool", None, baseline=base_name, baseline_wall=base_us,
            note=note, times_s=times[name], baseline_times_s=times[base_name],
            paired_ratio=paired)
    r["ok"] = r["ratio"] is not None and r["ratio"] <= OVERHEAD_BAR_RATIO
    if base_us is None:
      r["note"] += f"; baseline failed: {errors[base_name]}"
    rows.append(r)
  return rows


# --- (c) deep queue ------------------------------------------------------------------------

def bench_deep_queue() -> list[dict]:
  n = DEEP_CALLS
  case = (f"{n:,} x {DEEP_SLEEP_S:.0f} s host_op, timeout_s={DEEP_TIMEOUT_S}, "
          f"concurrency={n}, jax.jit(vmap)")
  base_name = f"bare ThreadPoolExecutor({n}).map"
  base_s, note = None, ""
  try:
    pool = cf.ThreadPoolExecutor(max_workers=n)
    list(pool.map(time.sleep, [0.0] * n))  # warm-up
    base_s = _wall(lambda: list(pool.map(time.sleep, [DEEP_SLEEP_S] * n)))
    pool.shutdown()
  except Exception as e:  # noqa: BLE001
    note = f"baseline failed: {_failed(e)}; "

  op = xcs_jax.host_op(SLEEPS.fn("deep"), out_spec=F32, name="bench_runtime_deep",
                       concurrency=n, timeout_s=DEEP_TIMEOUT_S)
  f = jax.jit(jax.vmap(op))
  start = None
  try:
    jax.block_until_ready(f(jnp.zeros((n,), jnp.float32)))  # warm-up: compile, threads
    start = time.perf_counter()
    out = jax.block_until_ready(f(jnp.full((n,), DEEP_SLEEP_S, jnp.float32)))
    wall = time.perf_counter() - start
    ok = bool(np.all(np.asarray(out) == np.float32(DEEP_SLEEP_S)))
    raised = None if ok else "wrong outputs"
  except Exception as e:  # noqa: BLE001
    wall = None if start is None else time.perf_counter() - start
    ok, raised = False, _failed(e)
  if raised:
    note += f"raised after {wall:.2f} s: {raised}" if wall is not None else f"failed: {raised}"
    waited = SLEEPS.settle("deep", 10.0)
    note += f"; waited {waited:.1f} s for its sleeps to end"
    if SLEEPS.running("deep"):
      note += f" ({SLEEPS.running('deep')} still running)"
  else:
    note += "no error"
  return [row("c", case, wall, "s", "no error", ok, baseline=base_name,
              baseline_wall=base_s, note=note, raised=raised)]


# --- (a) error surfacing ----------------------------------------------------------------------

def bench_errors(repeats: int) -> list[dict]:
  fail = models.bind("fake:echo", fail_on="BOOM", output_bytes=MAX_LEN)
  sib_a = xcs_jax.host_op(SLEEPS.fn("sibling"), out_spec=F32, name="bench_runtime_sibling_a")
  sib_b = xcs_jax.host_op(SLEEPS.fn("sibling"), out_spec=F32, name="bench_runtime_sibling_b")
  echo = models.bind("fake:echo", output_bytes=MAX_LEN)
  good = jnp.asarray(text.encode("all fine", MAX_LEN))
  bad = jnp.asarray(text.encode("BOOM, it fails", MAX_LEN))

  def with_siblings(prompt, s):
    return fail(prompt), sib_a(s), sib_b(s)  # the siblings do not read `prompt`

  f = xcs_jax.jit(with_siblings)
  alone = xcs_jax.jit(lambda prompt: fail(prompt))
  follow_up = xcs_jax.jit(jax.vmap(echo))
  prompts = _prompts(FOLLOW_UP_CALLS)

  def time_to_error(run):
    """Seconds from the call to the exception, and the error ('' if none was raised)."""
    start = time.perf_counter()
    try:
      jax.block_until_ready(run())
    except Exception as e:  # noqa: BLE001  (xcs_jax.XCSExecutionError expected)
      return time.perf_counter() - start, type(e).__name__
    return time.perf_counter() - start, ""

  rows = []
  alone_s, idle_s, setup_note = None, None, ""
  try:  # warm-ups (passing prompt, 0 s sleeps) and the baselines
    jax.block_until_ready(f(good, jnp.float32(0.0)))
    jax.block_until_ready(alone(good))
    _wall(lambda: follow_up(prompts))
    idle_s = statistics.median(_wall(lambda: follow_up(prompts)) for _ in range(repeats))
    alone_times = []
    for _ in range(repeats):
      t, err = time_to_error(lambda: alone(bad))
      if not err:
        raise RuntimeError("the failing call alone did not raise")
      alone_times.append(t)
    alone_s = statistics.median(alone_times)
  except Exception as e:  # noqa: BLE001
    setup_note = f"warm-up/baseline failed: {_failed(e)}; "

  for sleep_s in ERROR_SIBLING_S:
    case = f"error beside 2 sibling host_ops sleeping {sleep_s:.0f} s, xcs_jax.jit"
    try:
      wall, err = time_to_error(lambda: f(bad, jnp.float32(sleep_s)))
      running = SLEEPS.running("sibling")
      note = (f"caught {err}" if err else "NO error raised") + (
          f"; {running} sibling sleeps still running")
      rows.append(row("a", case, wall, "s", f"< {ERROR_BAR_S} s",
                      bool(err) and wall < ERROR_BAR_S, baseline="failing call alone",
                      baseline_wall=alone_s, note=setup_note + note, error=err))
    except Exception as e:  # noqa: BLE001
      rows.append(row("a", case, None, "s", f"< {ERROR_BAR_S} s", False,
                      note=f"failed: {_failed(e)}"))
    case = (f"then {FOLLOW_UP_CALLS} zero-latency fake:echo, xcs_jax.jit(vmap) "
            f"(after the {sleep_s:.0f} s case)")
    try:
      running = SLEEPS.running("sibling")
      wall = _wall(lambda: follow_up(prompts))
      rows.append(row("a", case, wall, "s", f"< {FOLLOW_UP_BAR_S} s", wall < FOLLOW_UP_BAR_S,
                      baseline="same call, idle runtime", baseline_wall=idle_s,
                      note=f"{running} sibling sleeps running when it started"))
    except Exception as e:  # noqa: BLE001
      rows.append(row("a", case, None, "s", f"< {FOLLOW_UP_BAR_S} s", False,
                      note=f"failed: {_failed(e)}"))
  return rows


# --- (b) interrupt latency ---------------------------------------------------------------------

def interrupt_latency(call) -> tuple[float | None, str]:
  """Seconds from `interrupt_main` (fired after 0.3 s) to catching KeyboardInterrupt."""
  fired = {}

  def fire():
    fired["t"] = time.perf_counter()
    _thread.interrupt_main()

  timer = threading.Timer(INTERRUPT_AFTER_S, fire)
  caught, note = None, ""
  try:
    try:
      start = time.perf_counter()
      timer.start()
      jax.block_until_ready(call())
      returned = time.perf_counter() - start
      note = f"returned after {returned:.2f} s without KeyboardInterrupt"
      time.sleep(0.5)  # an interrupt still pending lands here
    except KeyboardInterrupt:
      caught = time.perf_counter()
  except KeyboardInterrupt:  # landed outside the inner try
    caught = time.perf_counter()
    note += "; KeyboardInterrupt landed late"
  finally:
    timer.cancel()
  if caught is None or "t" not in fired:
    return None, note or "KeyboardInterrupt not caught"
  if note:
    note = f"{note}; caught {caught - fired['t']:.2f} s after firing"
  return caught - fired["t"], note


def bench_interrupt() -> list[dict]:
  n = INTERRUPT_CALLS
  slow = xcs_jax.host_op(SLEEPS.fn("slow"), out_spec=F32, name="bench_runtime_slow",
                         concurrency=n)
  zeros = jnp.zeros((n,), jnp.float32)
  x = jnp.full((n,), INTERRUPT_SLEEP_S, jnp.float32)
  jitted = xcs_jax.jit(jax.vmap(slow))
  eager = jax.vmap(slow)

  rows = []
  base_name = f"cf.wait(timeout=0.01) loop on a bare ThreadPoolExecutor({n})"
  base_s, base_note = None, ""
  pools = [cf.ThreadPoolExecutor(max_workers=n) for _ in range(2)]
  for pool in pools:
    list(pool.map(time.sleep, [0.0] * n))  # start the threads

  def bare_polling():
    pending = [pools[0].submit(time.sleep, INTERRUPT_SLEEP_S) for _ in range(n)]
    while pending:
      pending = cf.wait(pending, timeout=0.01).not_done

  def bare_blocking():
    cf.wait([pools[1].submit(time.sleep, INTERRUPT_SLEEP_S) for _ in range(n)])

  try:
    base_s, base_note = interrupt_latency(bare_polling)
  except Exception as e:  # noqa: BLE001
    base_note = f"failed: {_failed(e)}"
  base_note = f"; baseline: {base_note}" if base_note else ""
  try:  # informational: interrupt_main cannot wake a main thread blocked in a wait
    wall, note = interrupt_latency(bare_blocking)
    rows.append(row("b", f"(reference) interrupt a blocking cf.wait on a bare "
                    f"ThreadPoolExecutor({n}) of the same sleeps", wall, "s", "-", None,
                    baseline=base_name, baseline_wall=base_s,
                    note=note or "interrupt_main runs the handler at the main thread's "
                    "next bytecode; a blocked wait has none"))
  except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001
    rows.append(row("b", "(reference) blocking cf.wait", None, "s", "-", None,
                    note=f"failed: {_failed(e)}"))
  for pool in pools:
    pool.shutdown(wait=False, cancel_futures=True)  # their sleeps end in the background

  for form, f in (("xcs_jax.jit(vmap)", jitted), ("eager vmap", eager)):
    case = (f"interrupt {n} x {INTERRUPT_SLEEP_S:.0f} s time.sleep host_op, {form}, "
            f"at {INTERRUPT_AFTER_S} s")
    try:
      jax.block_until_ready(f(zeros))  # warm-up: trace, compile, threads
      wall, note = interrupt_latency(lambda: f(x))
      waited = SLEEPS.settle("slow", INTERRUPT_SLEEP_S + 5.0)
      note = (note + "; " if note else "") + f"{waited:.1f} s until its sleeps ended"
      rows.append(row("b", case, wall, "s", f"< {INTERRUPT_BAR_S} s",
                      wall is not None and wall < INTERRUPT_BAR_S,
                      baseline=base_name,
                      baseline_wall=base_s, note=note + base_note))
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001
      SLEEPS.settle("slow", INTERRUPT_SLEEP_S + 5.0)
      rows.append(row("b", case, None, "s", f"< {INTERRUPT_BAR_S} s", False,
                      note=f"failed: {_failed(e)}"))
  return rows


# --- report --------------------------------------------------------------------------------------

def _fmt(value, unit) -> str:
  if value is None:
    return "-"
  if unit == "s":
    if value < 0.01:
      return f"{value * 1e3:.2f} ms"
    return f"{value * 1e3:.0f} ms" if value < 10 else f"{value:.1f} s"
  return f"{value:.1f} us"


def render(rows: list[dict], env: dict) -> str:
  lines = [
      f"jax {env['jax']}, Python {env['python']}, {env['cpus']} CPUs ({env['machine']}), "
      f"load average {env['load_before']:.1f} before; (d): median of {env['repeats']} interleaved rounds after a warm-up; (a)-(c): one "
      "timed run each after a warm-up (trace and compile not timed); every baseline "
      "measured in the same run. Run order: (d), (c), (a), (b).",
      "",
      "| | measurement | wall | baseline (same run) | baseline wall | wall / baseline "
      "| bar | within bar | notes |",
      "|---|---|---:|---|---:|---:|---|:---:|---|",
  ]
  for r in sorted(rows, key=lambda r: r["section"]):
    ratio = ("-" if r["ratio"] is None
             else f"{r['ratio']:.2f}" if r["ratio"] < 100 else f"{r['ratio']:,.0f}")
    ok = "" if r["ok"] is None else "yes" if r["ok"] else "**NO**"
    lines.append(
        f"| ({r['section']}) | {r['case']} | {_fmt(r['wall'], r['unit'])} | "
        f"{r['baseline'] or '-'} | {_fmt(r['baseline_wall'], r['unit'])} | {ratio} | "
        f"{r['bar']} | {ok} | {r['note']} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--repeats", type=int, default=15,
                      help="interleaved rounds for (d) and baseline runs for (a)")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "runtime.json"))
  args = parser.parse_args(argv)
  env = environment.describe("bench_runtime.py", argv, repeats=args.repeats)
  start = time.perf_counter()
  rows = []
  for section, bench in (("d", lambda: bench_overhead(args.repeats)),
                         ("c", bench_deep_queue),
                         ("a", lambda: bench_errors(args.repeats)),
                         ("b", bench_interrupt)):
    print(f"running ({section}) ...", flush=True)
    try:
      rows += bench()
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001
      rows.append(row(section, f"({section})", None, "s", "-", False,
                      note=f"failed: {_failed(e)}"))
  env["total_s"] = time.perf_counter() - start
  table = render(rows, env)
  print(table)
  print(f"\n(total {env['total_s']:.0f} s)")
  environment.save(args.out, env, dict(rows=rows), table)
  return 0 if all(r["ok"] is not False for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
