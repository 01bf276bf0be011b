"""`xcs_jax.profiler.trace`: a Perfetto / Chrome trace of everything inside a block."""
from __future__ import annotations

import contextlib
import gzip
import json
import os
from typing import Iterator

from xcs_jax._src import tracing


@contextlib.contextmanager
def trace(path: str | os.PathLike) -> Iterator[None]:
  """Records the host work inside the block into a trace file at `path`.

  The file is Chrome trace event JSON (gzipped when `path` ends in `.gz`),
  which ui.perfetto.dev and chrome://tracing open. It holds:

  - each host call as a slice on the track of the worker thread, or of the
    event-loop lane, that ran it: its op and binding (never a secret), the
    user's source line, the batch item, attempts, how long it queued for a
    slot, tokens (and a cache hit or replica where the provider notes one),
    with each wait before a retry as a slice inside it;
  - each tensor segment's dispatch and the scheduler's own work, on the
    track of the thread that ran the jitted function;
  - each node of a plan (a host call, a stream, control flow) from start to
    release, and each wait for a slot of a concurrency limit, as async
    slices (they overlap).

  The same spans (but the async ones) are `jax.profiler.TraceAnnotation`s,
  so a `jax.profiler.trace` shows them beside XLA's own, with or without
  this one. One trace records at a time.

  Args:
    path: where to write the file (its directory must exist).

  Raises:
    ValueError: `path` is not a path, or its directory does not exist.
    RuntimeError: another `xcs_jax.profiler.trace` is recording.

  Examples:
    >>> with xcs_jax.profiler.trace("/tmp/run.json"):
    ...   answers = f(prompts)
    >>> # open /tmp/run.json at ui.perfetto.dev
  """
  if not isinstance(path, (str, os.PathLike)):
    raise ValueError("`xcs_jax.profiler.trace(path)` needs a file path (str or "
                     f"os.PathLike); got {type(path).__name__}.")
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(directory):
    raise ValueError(f"`xcs_jax.profiler.trace(path)`: the directory {directory!r} of "
                     f"{path!r} does not exist; create it first, or pick another path.")
  recorder = tracing.start()
  try:
    yield
  finally:
    tracing.stop()
    _write(recorder.to_json(), path)


def _write(trace: dict, path: str) -> None:
  text = json.dumps(trace, separators=(",", ":"))   # one C call; json.dump writes in pieces
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "wt") as f:
    f.write(text)
