"""What one run of a plan did, and when: the measurements behind the stats.

The scheduler stamps each step of the top-level plan: when it became ready
(its last input was released), when it started, when a `max_concurrency`
slot was granted, when its work ended and when the scheduler released its
dependents; a host step also keeps how long reading its inputs took (where
JAX's asynchronous dispatch makes it wait for the tensor segments that
compute them) and a summary of its jobs' items. From these:

- `critical_path`: the longest chain of measured step times, a host call
  counting its longest item (what it takes when every item has a slot):
  the best wall time a schedule could reach with unlimited concurrency;
- `breakdown`: the wall time along the chain the run actually followed
  (from its end, back through each step's input released last), split into
  host calls, tensor segments, waiting for slots of concurrency limits, the
  scheduler's own work, and tracing and compiling (a cache miss).
"""
from __future__ import annotations

import operator

from xcs_jax._src.jit.classify import Kind


QUEUED_S = 1e-3
"""An item of a job that met its limit (`Job.limited`) and waited longer than
this between being ready and starting queued for a slot."""


class JobSummary:
  """One job of a run, reduced to what the stats and hints need.

  Made at the end of every run, so it costs little per item (column-wise,
  in C); what only hints and reports read (waits) is worked out on demand.
  """

  def __init__(self, job):
    self.op, self.source, self.n, self.limit = job.op, job.source, job.n, job.limit
    self.errors, self.retries, self.limited = job.failures, job.retries, job.limited
    starts, ends = job.starts, job.ends
    if job.finished_items == job.n and not job.resolved:
      items = None           # all of them ran, in order
    else:                    # failed, cancelled, or answered by the cache: those that ran
      items = [i for i, e in enumerate(ends) if e is not None and starts[i] is not None]
      starts, ends = [starts[i] for i in items], [ends[i] for i in items]
    self.items, self.starts, self.ends = items, starts, ends
    self.ran = len(ends)
    self.durations = list(map(operator.sub, ends, starts))
    self.longest_s = max(self.durations, default=0.0)
    self._started_at, self._fed = job.started_at, job._fed_at
    self._waits = None

  @property
  def lines(self) -> list | None:
    """The line of each item that ran (call sites batched together), or None."""
    if not isinstance(self.source, tuple):
      return None
    return list(self.source) if self.items is None else [self.source[i] for i in self.items]

  def _fed_at(self, k: int) -> float:
    if not self._fed:
      return self._started_at
    i = k if self.items is None else self.items[k]
    return self._fed.get(i, self._started_at)

  @property
  def last(self) -> tuple | None:
    """(fed, start, end) of the item that ended last."""
    if not self.ends:
      return None
    k = self.ends.index(max(self.ends))
    return self._fed_at(k), self.starts[k], self.ends[k]

  def waits(self) -> tuple[int, float, float]:
    """(items that queued for a slot, the longest wait, all waits of those);
    nothing for a job that never met its limit (its items waited only for
    lanes to start)."""
    if self._waits is None:
      waits = ([s - self._fed_at(k) for k, s in enumerate(self.starts)] if self.limited
               else [])
      queued = [w for w in waits if w > QUEUED_S]
      self._waits = (len(queued), max(waits, default=0.0), sum(queued))
    return self._waits


class StepTimes:
  """The stamps of one step (perf_counter seconds; None: did not happen)."""

  __slots__ = ("ready", "start", "inputs_s", "granted", "end", "released", "jobs")

  def __init__(self):
    self.ready = self.start = self.granted = self.end = self.released = None
    self.inputs_s = 0.0
    self.jobs: list = []     # Job while running, JobSummary once summarized


class RunTimeline:
  """The stamps of one call of a jitted function."""

  def __init__(self, start: float):
    self.start = start          # the call began (plan lookup, tracing on a miss)
    self.plan_start: float | None = None   # the scheduler began
    self.end: float | None = None
    self.steps: dict[int, StepTimes] = {}

  def summarize(self) -> dict:
    """Replaces each step's jobs by their summaries; returns {id(job): summary}."""
    summaries = {}
    for st in self.steps.values():
      out = []
      for job in st.jobs:
        s = summaries.get(id(job))
        if s is None:
          s = summaries[id(job)] = JobSummary(job)
        out.append(s)
      st.jobs = out
    return summaries


def _own_time(step, st: StepTimes) -> float:
  """A step's own work: what it needs even with a free slot for every call."""
  if st.end is None or st.start is None:
    return 0.0
  if step.kind is Kind.TENSOR:
    return st.end - st.start
  if step.kind is Kind.HOST and st.jobs:
    return st.inputs_s + max(j.longest_s for j in st.jobs)
  return st.end - st.start


def critical_path(plan, tl: RunTimeline) -> tuple[float, list[int]]:
  """The longest chain of measured step times: (seconds, step indices)."""
  best: dict[int, float] = {}
  pred: dict[int, int | None] = {}
  for i, step in plan.steps.items():     # topological order
    st = tl.steps.get(i)
    own = _own_time(step, st) if st is not None else 0.0
    p = max(step.deps, key=lambda d: best[d], default=None)
    best[i] = own + (best[p] if p is not None else 0.0)
    pred[i] = p
  if not best:
    return 0.0, []
  end = max(best, key=best.get)
  path = []
  while end is not None:
    path.append(end)
    end = pred[end]
  path.reverse()
  return best[path[-1]], path


BUCKETS = ("calls_s", "segments_s", "limits_s", "scheduler_s", "tracing_s")


def followed_path(plan, tl: RunTimeline) -> list[int]:
  """The chain the run followed: from the step released last back through
  each step's input released last."""
  done = {i: st for i, st in tl.steps.items() if st.released is not None}
  if not done:
    return []
  cur = max(done, key=lambda i: done[i].released)
  path = []
  while cur is not None:
    path.append(cur)
    deps = [d for d in plan.steps[cur].deps if d in done]
    cur = max(deps, key=lambda d: done[d].released, default=None)
  path.reverse()
  return path


def breakdown(plan, tl: RunTimeline) -> dict:
  """The wall time along `followed_path`, by where it went (sums to the wall)."""
  out = dict.fromkeys(BUCKETS, 0.0)
  if tl.end is None or tl.plan_start is None:
    return out
  out["tracing_s"] = tl.plan_start - tl.start
  path = followed_path(plan, tl)
  t = tl.plan_start
  for i in path:
    st = tl.steps[i]
    kind = plan.steps[i].kind
    span = st.released - t
    work = _split_step(kind, st)
    for k, v in work.items():
      out[k] += v
    out["scheduler_s"] += max(0.0, span - sum(work.values()))
    t = st.released
  out["scheduler_s"] += tl.end - t
  return out


def _split_step(kind, st: StepTimes) -> dict:
  """A step's calls, tensor and limit time (the rest of its span is the
  scheduler's: waiting in the ready queue, starting jobs, releasing)."""
  if kind is Kind.TENSOR:
    return {"segments_s": st.end - st.start}
  work = {"segments_s": st.inputs_s, "limits_s": 0.0, "calls_s": 0.0}
  if st.granted is not None:     # waited for a `max_concurrency` slot
    work["limits_s"] += max(0.0, st.granted - (st.start + st.inputs_s))
  jobs = [j for j in st.jobs if j.ran] if kind is Kind.HOST else []
  if jobs:
    job = max(jobs, key=lambda j: j.last[2])
    fed, start, end = job.last
    if job.limited:            # else the wait was lanes starting: the scheduler's
      work["limits_s"] += max(0.0, start - fed)
    work["calls_s"] += end - start
  elif st.end is not None:       # a stream or control node: its calls, end to end
    begun = st.granted if st.granted is not None else st.start + st.inputs_s
    work["calls_s"] += max(0.0, st.end - begun)
  return work
