"""Measured times of a jitted function: per call site, per segment, per run.

After every call of a jitted function, `Profile.record_run` reduces what the
run measured (the `RunTimeline` of its steps, the item log of every job in
its scope, control-flow bodies and streams included) to

- per call site (op, binding, the user's line): calls, errors, retries and
  the duration of each call, kept over all calls of the function
  (percentiles over the last `RECENT` calls of the site);
- per tensor segment of the plan as run: dispatches and their durations;
- the last run's timeline: its measured critical path and where its wall
  time went (timeline.py), and what the hints read.

Stats and hints are made from these on demand (`stats()`, `hints()`), never
on the call path.
"""
from __future__ import annotations

import collections
import functools
import threading

import numpy as np

from xcs_jax._src.jit import timeline as timeline_lib
from xcs_jax._src.jit.classify import Kind
from xcs_jax._src.jit.explain import step_labels

RECENT = 1024
"""Durations kept per call site and per segment for the percentiles."""


class Durations:
  """Count, errors, retries and durations of one call site or segment."""

  __slots__ = ("count", "errors", "retries", "total_s", "max_s", "recent")

  def __init__(self):
    self.count = self.errors = self.retries = 0
    self.total_s = self.max_s = 0.0
    self.recent: collections.deque = collections.deque(maxlen=RECENT)

  def add(self, durations: list, errors: int = 0, retries: int = 0,
          longest: float | None = None) -> None:
    """Folds in calls that took `durations` (their `longest`, if known)."""
    self.count += len(durations)
    self.errors += errors
    self.retries += retries
    if durations:
      self.total_s += sum(durations)
      self.max_s = max(self.max_s, max(durations) if longest is None else longest)
      self.recent.extend(durations)

  def as_dict(self) -> dict:
    p50, p95 = (np.percentile(self.recent, [50, 95]).tolist() if self.recent
                else (None, None))
    return dict(count=self.count, p50_s=p50, p95_s=p95, max_s=self.max_s,
                total_s=self.total_s, errors=self.errors, retries=self.retries)


class LastRun:
  """The last successful run: its plan, timeline and job summaries; its
  critical path and breakdown are worked out when first read."""

  def __init__(self, plan, tl: timeline_lib.RunTimeline, jobs: list):
    self.plan, self.timeline, self.jobs = plan, tl, jobs
    self.wall_s = tl.end - tl.start

  @functools.cached_property
  def _critical(self) -> tuple[float, list[int]]:
    return timeline_lib.critical_path(self.plan, self.timeline)

  @property
  def critical_path_s(self) -> float:
    return self._critical[0]

  @property
  def critical_path(self) -> list[int]:
    return self._critical[1]

  @functools.cached_property
  def breakdown(self) -> dict:
    return timeline_lib.breakdown(self.plan, self.timeline)


class Profile:
  """What the calls of one jitted function measured (thread-safe)."""

  def __init__(self):
    self._lock = threading.Lock()
    self._sites: dict = {}       # (kind, binding, line) -> Durations
    self._segments: dict = {}    # segment label -> Durations
    self._described: dict = {}   # op -> op.describe(), made once
    self.last: LastRun | None = None

  def record_run(self, plan, tl: timeline_lib.RunTimeline, scope, ok: bool) -> None:
    """Folds one run in (`ok`: it succeeded, so its timeline is complete)."""
    summaries = tl.summarize()
    jobs = list(summaries.values())
    seen = set(summaries)
    for job in scope.jobs:       # control-flow bodies run jobs of their own
      if id(job) not in seen and job.op is not None:
        jobs.append(timeline_lib.JobSummary(job))
    labels = step_labels(plan)
    segment_times = [(labels[i], st.end - st.start) for i, st in tl.steps.items()
                     if plan.steps[i].kind is Kind.TENSOR and st.end is not None]
    with self._lock:
      for s in jobs:
        self._add_job(s)
      for label, seconds in segment_times:
        self._segments.setdefault(label, Durations()).add([seconds])
      if ok:
        self.last = LastRun(plan, tl, jobs)

  def _add_job(self, s: timeline_lib.JobSummary) -> None:
    kind, binding = s.op.kind, self._described.get(s.op)
    if binding is None:
      binding = self._described[s.op] = s.op.describe()
    lines = s.lines
    if lines is None or len(set(lines)) == 1:   # one call site (a loop, a vmap)
      line = s.source if lines is None else lines[0]
      self._site(kind, binding, line).add(s.durations, s.errors, s.retries, s.longest_s)
      return
    by_line: dict = collections.defaultdict(list)
    for line, d in zip(lines, s.durations):
      by_line[line].append(d)
    for k, (line, ds) in enumerate(by_line.items()):
      # errors and retries are counted per job: given to its first line
      self._site(kind, binding, line).add(ds, s.errors if k == 0 else 0,
                                          s.retries if k == 0 else 0)

  def _site(self, kind, binding, line) -> Durations:
    key = (kind, binding, line)
    d = self._sites.get(key)
    if d is None:
      d = self._sites[key] = Durations()
    return d

  # -- reading -------------------------------------------------------------------

  def stats(self) -> dict:
    """The profiling keys of `get_jit_stats` (see docs/jit.md)."""
    with self._lock:
      sites = [dict(op=k[0], binding=k[1], source=k[2], **d.as_dict())
               for k, d in self._sites.items()]
      segments = [dict(segment=label, **d.as_dict()) for label, d in self._segments.items()]
      last = self.last
    for rows in (sites, segments):
      rows.sort(key=lambda r: -r["total_s"])
    for r in segments:
      del r["errors"], r["retries"]
    return dict(call_sites=sites, segments=segments,
                last_critical_path_s=last.critical_path_s if last else None,
                last_breakdown=dict(last.breakdown) if last else None)

  def hints(self) -> list[str]:
    """Advice from the last run (empty when nothing stands out)."""
    last = self.last
    if last is None:
      return []
    return [*_limit_hints(last), *_serial_hints(last), *_run_limit_hints(last),
            *_tracing_hints(last)]


def _site_text(op, line) -> str:
  return f"{op.kind} {op.describe()} at {line}"


def _limit_hints(last: LastRun) -> list[str]:
  """Call sites whose calls queued for a slot of their concurrency limit."""
  by_site: dict = {}
  for s in last.jobs:
    if s.limit is None:
      continue
    line = s.source[0] if isinstance(s.source, tuple) else s.source
    waited, longest, total = s.waits()
    acc = by_site.setdefault((s.op, line), [0, 0, 0.0, 0.0, s.limit])
    acc[0] += waited
    acc[1] += s.n
    acc[2] = max(acc[2], longest)
    acc[3] += total
  hints = []
  for (op, line), (waited, n, longest, total, limit) in by_site.items():
    if waited < 2 or total < 0.05 * last.wall_s:
      continue
    knob = ("the host op's `concurrency=`" if op.kind == "host_op" else
            "the binding's `concurrency=` if what serves the calls can take more at once "
            "(a remote API's rate limit; a local model's instances and free CPU cores)")
    hints.append(
        f"{waited} of {n} calls of {_site_text(op, line)} waited for a slot of the "
        f"concurrency limit of {limit} (longest wait {longest * 1e3:.0f} ms): raise {knob}.")
  return hints


def _serial_hints(last: LastRun) -> list[str]:
  """Calls of one site that ran one after another on the critical path."""
  plan, hints = last.plan, []
  run, prev = [], None
  for i in last.critical_path + [None]:
    step = plan.steps[i] if i is not None else None
    site = None
    if step is not None and step.kind is Kind.HOST:
      p = step.eqn.params
      line = p["source"][0] if isinstance(p["source"], tuple) else p["source"]
      site = (p["op"], line)
    if site is not None and site == prev:
      run.append(i)
      continue
    if len(run) >= 3:
      op, line = prev
      seconds = sum(last.timeline.steps[j].released - last.timeline.steps[j].ready
                    for j in run)
      hints.append(
          f"{len(run)} calls of {_site_text(op, line)} run one after another, each "
          f"waiting for the one before ({seconds:.3f} s on the critical path): a Python "
          "loop that feeds each call the last one's result. If the iterations do not "
          "need each other, make each call's input independent and `jax.vmap` the "
          "call: one batched call, its items at once.")
    run, prev = ([i] if site is not None else []), site
  for i in last.critical_path:
    step = plan.steps[i]
    if step.kind is Kind.CONTROL and step.eqn.name in ("scan", "while"):
      st = last.timeline.steps[i]
      hints.append(
          f"a `{step.eqn.name}` holding host calls (step #{i}) took "
          f"{st.end - st.start:.3f} s on the critical path: its iterations run one "
          "after another. If they do not depend on each other, `jax.vmap` the body "
          "instead.")
  return hints


def _run_limit_hints(last: LastRun) -> list[str]:
  waits = [st.granted - (st.start + st.inputs_s) for st in last.timeline.steps.values()
           if st.granted is not None]
  waited = [w for w in waits if w > timeline_lib.QUEUED_S]
  if len(waited) < 2 or sum(waited) < 0.05 * last.wall_s:
    return []
  return [f"{len(waited)} host calls waited for `max_concurrency` (longest wait "
          f"{max(waited) * 1e3:.0f} ms): raise it, or drop it and let each provider's "
          "limit bound its calls."]


def _tracing_hints(last: LastRun) -> list[str]:
  t = last.breakdown["tracing_s"]
  if t < 0.5 * last.wall_s:
    return []
  return [f"tracing, the passes and compiling took {t:.3f} s of this call's "
          f"{last.wall_s:.3f} s (a new argument signature): later calls with the same "
          "shapes reuse the plan."]

