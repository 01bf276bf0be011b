"""What every benchmark records about where and how it ran, and the helpers they
share (timing a call, saving the results)."""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time

import jax

# Benchmarks measure calls, not the response cache: a benchmark repeats the
# same requests, which the cache would answer after the first time. The
# default runtime reads this when it is made; runtimes a benchmark makes
# itself pass `cache=False` (bench_endpoints measures the cache on purpose).
os.environ.setdefault("XCS_JAX_CACHE", "off")


def describe(script: str, argv=None, **extra) -> dict:
  """jax and Python versions, CPUs, time, load and the command that ran `script`."""
  args = sys.argv[1:] if argv is None else list(argv)
  return dict(jax=jax.__version__, python=platform.python_version(), cpus=os.cpu_count(),
              machine=platform.machine(), load_before=os.getloadavg()[0],
              date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              command=" ".join(["python", f"benchmarks/{script}", *args]),
              response_cache=os.environ["XCS_JAX_CACHE"], **extra)


def wall(fn) -> float:
  """Seconds `fn()` takes, its result blocked on (JAX dispatches asynchronously)."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def save(out: str, env: dict, res: dict, table: str) -> None:
  """Writes the results as JSON to `out` and the table beside it (`.md`)."""
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump(dict(env=env, **res), f, indent=2)
  with open(os.path.splitext(out)[0] + ".md", "w") as f:
    f.write(table + "\n")
  print(f"wrote {out}")
