"""Runs every `benchmarks/bench_*.py`, one after another (`make bench`).

Usage:
  python benchmarks/run_all.py [NAME_SUBSTRING ...]

With arguments, only the benchmarks whose file name contains one of them run.
Each runs in its own process (fresh jax, fresh thread pools), so one cannot
warm or slow down the next. Exits non-zero if any benchmark failed or missed
its bar.
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import time


def main(argv: list[str]) -> int:
  here = os.path.dirname(os.path.abspath(__file__))
  scripts = sorted(glob.glob(os.path.join(here, "bench_*.py")))
  if argv:
    scripts = [s for s in scripts if any(a in os.path.basename(s) for a in argv)]
  if not scripts:
    print("no benchmarks matched", argv)
    return 1
  failed = []
  for script in scripts:
    name = os.path.basename(script)
    print(f"\n## {name}\n", flush=True)
    start = time.perf_counter()
    rc = subprocess.call([sys.executable, script], cwd=os.path.dirname(here))
    print(f"\n({name}: exit {rc}, {time.perf_counter() - start:.1f} s)", flush=True)
    if rc:
      failed.append(name)
  if failed:
    print("\nfailed or missed a bar:", ", ".join(failed))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
