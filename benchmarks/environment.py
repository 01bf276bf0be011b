"""What every benchmark records about where and how it ran."""
from __future__ import annotations

import datetime
import os
import platform
import sys

import jax


def describe(script: str, argv=None, **extra) -> dict:
  """jax and Python versions, CPUs, time, load and the command that ran `script`."""
  args = sys.argv[1:] if argv is None else list(argv)
  return dict(jax=jax.__version__, python=platform.python_version(), cpus=os.cpu_count(),
              machine=platform.machine(), load_before=os.getloadavg()[0],
              date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              command=" ".join(["python", f"benchmarks/{script}", *args]), **extra)
