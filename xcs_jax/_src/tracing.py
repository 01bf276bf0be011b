"""Spans of host work, for `xcs_jax.profiler.trace` and for `jax.profiler`.

Two listeners can be on at once:

- `xcs_jax.profiler.trace(path)` installs a `Recorder` as `recorder`: every
  span is kept and written, when the block ends, as a Chrome trace event
  file (JSON) that Perfetto (ui.perfetto.dev) and chrome://tracing open;
- a `jax.profiler` trace (`jax.profiler.trace(dir)`): the same spans are
  entered as `jax.profiler.TraceAnnotation`s, so they show beside XLA's own.

Instrumented code asks `listening()` once per job or per run (an attribute
check and, for jax's profiler, one cheap C++ call) and pays nothing per item
when nobody listens. Timestamps are `time.perf_counter()` seconds; the
recorder turns them into microseconds since the trace began.
"""
from __future__ import annotations

import gc
import heapq
import itertools
import os
import threading
import time
from typing import Any

import jax

recorder: "Recorder | None" = None
"""The active `xcs_jax.profiler.trace`, if any (set only by `start`/`stop`)."""

_annotation = jax.profiler.TraceAnnotation
_jax_listening = _annotation.is_enabled   # True inside a jax.profiler trace

LANE_TRACKS = 1 << 30
"""Track ids from here up are async lanes (tasks on the event loop); below it,
threads by their OS id (Linux keeps those under 2**22). Perfetto reads track
ids as 32-bit numbers."""


def listening() -> bool:
  """Whether a trace of either kind records spans now."""
  return recorder is not None or _jax_listening()


class Recorder:
  """The events of one `xcs_jax.profiler.trace` block (thread-safe).

  Tracks: one per OS thread that records (the scheduler's thread, each
  worker), and one per async lane (tasks share the event loop's thread, but
  their calls overlap, so each lane gets a track of its own; a freed lane
  track is reused, so there are as many as lanes ever ran at once).
  """

  def __init__(self):
    self.t0 = time.perf_counter()
    self.pid = os.getpid()
    self._events: list = []   # tuples; list.append is atomic
    self._lock = threading.Lock()
    self._threads: dict[int, str] = {}
    self._free_lanes: list[int] = []
    self._lanes = 0
    self._ids = itertools.count(1)

  # -- tracks ------------------------------------------------------------------

  def thread_track(self) -> int:
    """The track of the calling thread."""
    tid = threading.get_native_id()
    if tid not in self._threads:
      with self._lock:
        self._threads[tid] = threading.current_thread().name
    return tid

  def lane_track(self) -> int:
    """A free async-lane track (give it back with `free_lane_track`)."""
    with self._lock:
      if self._free_lanes:
        return heapq.heappop(self._free_lanes)
      self._lanes += 1
      return LANE_TRACKS + self._lanes - 1

  def free_lane_track(self, track: int) -> None:
    with self._lock:
      heapq.heappush(self._free_lanes, track)

  # -- events ------------------------------------------------------------------

  def complete(self, name: str, cat: str, start: float, end: float, track: int,
               args: dict | None = None) -> None:
    """A slice [start, end] on `track` (slices of one track must nest)."""
    self._events.append(("X", name, cat, start, end, track, args))

  def begin_async(self, name: str, cat: str, start: float, args: dict | None = None) -> int:
    """Opens a slice that may overlap others (a node, a wait); returns its id."""
    ident = next(self._ids)
    self._events.append(("b", name, cat, start, ident, self.thread_track(), args))
    return ident

  def end_async(self, name: str, cat: str, end: float, ident: int) -> None:
    self._events.append(("e", name, cat, end, ident, self.thread_track(), None))

  # -- the file ----------------------------------------------------------------

  def to_json(self) -> dict:
    """The trace as Chrome trace event format: `{"traceEvents": [...]}`."""
    # Many small dicts and no cycles: the cyclic garbage collector would only
    # walk the whole heap again and again while they are made.
    enabled = gc.isenabled()
    gc.disable()
    try:
      return self._to_json()
    finally:
      if enabled:
        gc.enable()

  def _to_json(self) -> dict:
    def us(t):
      return round((t - self.t0) * 1e6, 3)

    events = []
    for ph, name, cat, t, extra, track, args in list(self._events):
      e = {"name": name, "cat": cat, "ph": ph, "ts": us(t), "pid": self.pid, "tid": track}
      if ph == "X":
        e["dur"] = max(0.0, round((extra - t) * 1e6, 3))
      elif ph in ("b", "e"):
        e["id"] = extra
      if args:
        e["args"] = _jsonable(args)
      events.append(e)
    # Sorted per track (a slice before the slices it holds), so that any
    # reader sees each track's timestamps in order.
    events.sort(key=lambda e: (e["ts"], -e.get("dur", 0.0)))
    meta = [{"name": "process_name", "ph": "M", "pid": self.pid, "tid": 0,
             "args": {"name": "xcs_jax"}}]
    with self._lock:
      threads = dict(self._threads)
      lanes = self._lanes
    for order, (tid, name) in enumerate(sorted(threads.items(), key=lambda kv: kv[1])):
      meta.append({"name": "thread_name", "ph": "M", "pid": self.pid, "tid": tid,
                   "args": {"name": name}})
      meta.append({"name": "thread_sort_index", "ph": "M", "pid": self.pid, "tid": tid,
                   "args": {"sort_index": order}})
    for k in range(lanes):
      meta.append({"name": "thread_name", "ph": "M", "pid": self.pid, "tid": LANE_TRACKS + k,
                   "args": {"name": f"event loop lane {k}"}})
      meta.append({"name": "thread_sort_index", "ph": "M", "pid": self.pid,
                   "tid": LANE_TRACKS + k, "args": {"sort_index": 1000 + k}})
    return {"traceEvents": meta + events, "displayTimeUnit": "ms",
            "otherData": {"producer": "xcs_jax.profiler.trace"}}


_PLAIN = (str, int, float, bool)


def _jsonable(args: dict) -> dict:
  """`args` with None left out and anything but str, int, float, bool as text."""
  if all(type(v) in _PLAIN for v in args.values()):
    return args
  return {k: v if isinstance(v, _PLAIN) else str(v) for k, v in args.items()
          if v is not None}


def _jax_annotation(name: str, args: dict | None):
  """A TraceAnnotation; jax's profiler reads `#` in names as the start of
  metadata (`name#key=value#`), so `#` is left out of ours."""
  meta = {k: (v.replace("#", "") if isinstance(v, str) else v)
          for k, v in _jsonable(args or {}).items()}
  return _annotation(name.replace("#", ""), **meta)


def start() -> Recorder:
  """Installs a new recorder (one at a time)."""
  global recorder
  if recorder is not None:
    raise RuntimeError(
        "an `xcs_jax.profiler.trace` is already recording: end it before starting "
        "another (traces do not nest; one file holds everything inside the block).")
  recorder = Recorder()
  return recorder


def stop() -> Recorder | None:
  global recorder
  rec, recorder = recorder, None
  return rec


class Span:
  """One span on the calling thread: recorded by the trace, and entered as a
  `jax.profiler.TraceAnnotation` inside a jax profiler trace.

  `Span(...)` is made only when `listening()`; `end()` must run on the thread
  that made it (as TraceAnnotation needs).
  """

  __slots__ = ("name", "cat", "args", "start", "track", "_annotation")

  def __init__(self, name: str, cat: str, args: dict | None = None, track: int | None = None):
    self.name, self.cat, self.args = name, cat, args
    rec = recorder
    self.track = track if track is not None or rec is None else rec.thread_track()
    self._annotation = None
    if _jax_listening():
      self._annotation = _jax_annotation(name, args)
      self._annotation.__enter__()
    self.start = time.perf_counter()

  def end(self, args: dict | None = None, end: float | None = None) -> float:
    """Closes the span (`args` are added to its own); returns the end time."""
    t = time.perf_counter() if end is None else end
    if self._annotation is not None:
      self._annotation.__exit__(None, None, None)
    rec = recorder
    if rec is not None:
      if args and self.args:
        args = {**self.args, **args}
      rec.complete(self.name, self.cat, self.start, t, self.track, args or self.args)
    return t


def describe_limit(key: Any, limit: int) -> str:
  """A readable name of a concurrency limit key (see `executor.Limits`)."""
  if isinstance(key, tuple) and key:
    if key[0] == "provider" and len(key) >= 2:
      return f"provider {key[1]}, limit {limit}"
    if key[0] == "host_op":
      return f"host op, limit {limit}"
    if key[0] == "max_concurrency":
      return f"max_concurrency={limit}"
  return f"limit {limit}"


class ItemTrace:
  """The spans of one job's items (made when the job starts while someone listens).

  Each item is a slice named after its op and binding, on its lane's track,
  with the user's line, the batch item, attempts, the time it queued for a
  slot, and what the provider noted (`CallContext.facts`: tokens, cache hit,
  replica); each wait before a retry is a slice inside it.
  """

  __slots__ = ("name", "base", "source", "recorder")

  def __init__(self, op: Any, source: Any):
    kind = getattr(op, "kind", "host_call")
    binding = op.describe() if op is not None else ""
    self.name = f"{kind} {binding}".strip()
    self.base = {"op": kind, "binding": binding}
    self.source = source
    self.recorder = recorder   # the trace it started under (None: jax's only)

  def lane_track(self) -> int | None:
    """A track for an async lane (None: only jax's profiler listens)."""
    return self.recorder.lane_track() if self.recorder is not None else None

  def thread_track(self) -> int | None:
    """The calling thread's track, for a thread lane."""
    return self.recorder.thread_track() if self.recorder is not None else None

  def free_lane_track(self, track: int) -> None:
    self.recorder.free_lane_track(track)

  def _args(self, i: int) -> dict:
    source = self.source[i] if isinstance(self.source, tuple) else self.source
    return {**self.base, "source": source, "item": i}

  def begin(self, i: int, track: int | None = None) -> Span:
    # jax's annotation takes its args now; the recorder's come at the end.
    return Span(self.name, "call", self._args(i) if _jax_listening() else None, track)

  def end(self, span: Span, i: int, ctx: Any, error: BaseException | None,
          queued_s: float) -> None:
    args = self._args(i)
    args["attempts"] = ctx.retries + 1
    args["queued_ms"] = queued_s * 1e3
    facts = ctx.facts
    waits = facts.pop("retry_waits", ()) if facts else ()
    if facts:
      args.update(facts)
    if error is not None:
      args["error"] = type(error).__name__
    end = span.end(args)
    rec = recorder
    if rec is not None:
      for attempt, (t, delay, after) in enumerate(waits, start=1):
        rec.complete("retry wait", "retry", t, min(t + delay, end), span.track,
                     {"attempt": attempt + 1, "after": after, "delay_ms": delay * 1e3})
