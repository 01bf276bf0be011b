"""Critical-path-first: which waiting call gets a free slot first.

When more calls are ready than a concurrency limit has slots (a provider's
`concurrency`, a host op's, `max_concurrency`), the order they start in can
stretch the run: a call at the head of a long chain that waits behind
independent short calls delays the whole chain. So each host node of a run
gets a priority, the expected length of the longest path from it to the end
of the plan (its own time included), and the limits hand free slots to the
highest priority first (`executor.Limits`).

Expected times are the runtime's measured `call_times`, kept per call site
(op and source line), so they survive a retrace and improve as calls run. A
site never measured counts as the median of the plan's measured sites (1 s
when none is measured: then every call counts the same, and the longest
chain of calls goes first).
"""
from __future__ import annotations

from xcs_jax._src.jit.classify import Kind

CRITICAL_PATH_FIRST = True
"""False: slots go first come, first served (for comparisons in benchmarks)."""

UNMEASURED_S = 1.0


def _line(source):
  return source[0] if isinstance(source, tuple) and source else source


def _host_sites(step) -> list:
  """(op, line) of each call a step makes one after another, per item."""
  if step.kind is Kind.HOST:
    p = step.eqn.params
    return [(p["op"], _line(p["source"]))]
  if step.kind is Kind.STREAM:
    return [(s.eqn.params["op"], _line(s.eqn.params["source"]))
            for s in step.eqn.params["spec"].stages]
  return []


def remaining_paths(plan, call_times, base: float = 0.0) -> dict[int, float]:
  """Each step's expected seconds from its start to the end of the plan,
  plus `base` (the remaining path after the plan, for control-flow bodies)."""
  steps = plan.steps
  measured: dict[int, list] = {}
  known = []
  for i, step in steps.items():
    if step.kind is Kind.TENSOR:
      continue
    times = [call_times.get(op, line) for op, line in _host_sites(step)]
    measured[i] = times
    known.extend(t for t in times if t is not None)
  default = sorted(known)[len(known) // 2] if known else UNMEASURED_S   # a median
  remaining: dict[int, float] = {}
  for i in reversed(list(steps)):      # `plan.steps` is in topological order
    step = steps[i]
    own = 0.0
    if step.kind is not Kind.TENSOR:
      times = measured[i]
      own = sum(default if t is None else t for t in times) if times else default
    after = max((remaining[d] for d in step.dependents), default=base)
    remaining[i] = own + after
  return remaining
