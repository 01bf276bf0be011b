"""Readable text for a plan: what `xcs_jax.explain` prints."""
from __future__ import annotations

from xcs_jax._src.jit.classify import Kind


def describe_node(node) -> str:
  """One orchestration node of the graph, as `explain` shows it."""
  eqn = node.eqn
  if node.kind is Kind.HOST:
    p = eqn.params
    return f"{p['op'].kind} {p['op'].describe()} at {p['source']}"
  if node.kind is Kind.STREAM:
    return eqn.params["spec"].describe()
  return f"{eqn.name} (control flow holding host calls)"


def render_plan(plan, title: str = "plan") -> str:
  a = plan.analysis
  lines = [f"{title}: strategy {a.execution_strategy!r}, {a.tensor_ops} tensor "
           f"segment(s), {a.orchestration_ops} orchestration node(s)"
           + (f", {a.xla_call_ops} op(s) making host calls inside XLA (pmap, ...)"
              if a.xla_call_ops else "")]
  eqns = {n.index: n.eqns for n in plan.graph.nodes}
  for node in plan.graph.nodes:
    if node.kind is Kind.TENSOR:
      what = f"tensor segment [{_eqn_names(eqns[node.index])}]"
    else:
      what = describe_node(node)
    deps = ", ".join(f"#{d}" for d in sorted(node.deps)) or "inputs"
    lines.append(f"  #{node.index}: {what}  <- {deps}")
  if a.parallel_groups:
    lines.append("parallel groups (run together):")
    for g in a.parallel_groups:
      lines.append("  " + ", ".join(f"#{i}" for i in g))
  else:
    lines.append("parallel groups: none")
  path = " -> ".join(f"#{i}" for i in a.critical_path) or (
      "(host calls only inside XLA)" if a.xla_call_ops else "(no host calls)")
  lines.append(f"critical path ({len(a.critical_path)} call(s)): {path}")
  lines.append(f"estimated speedup over one-at-a-time: {a.estimated_speedup:.2f}x")
  lines.extend(render_run(plan))
  return "\n".join(lines)


def _describe_step(node) -> str:
  if node.kind is Kind.TENSOR:
    return f"tensor segment [{_eqn_names(node.eqns)}]"
  if node.kind is Kind.HOST:
    p = node.eqn.params
    sources = p["source"]
    if isinstance(sources, tuple):
      return (f"{p['op'].kind} {p['op'].describe()}: one batched call of "
              f"{len(sources)} call sites ({sources[0]}, ...)")
    return f"{p['op'].kind} {p['op'].describe()} at {sources}"
  return describe_node(node)


def step_labels(plan) -> dict[int, str]:
  """`step #i: what it runs`, per step of the plan as run (made once per plan)."""
  labels = getattr(plan, "_step_labels", None)
  if labels is None:
    labels = plan._step_labels = {
        n.index: f"step #{n.index}: {_describe_step(n)}" for n in plan.run_graph.nodes}
  return labels


def render_run(plan) -> list[str]:
  """The plan as it runs: after batching sibling calls, vectorizing, folding
  and forming streams (empty for a program that is one XLA executable)."""
  if plan.whole is not None:
    if plan.analysis.xla_call_ops:
      return ["as run: one XLA executable, its host calls made from inside it "
              "(io_callback, one after another per device)"]
    return ["as run: one XLA executable (no host calls)"]
  c = plan.counts()
  lines = [f"as run: {c['plan_segments']} tensor segment(s), {c['plan_host_calls']} host "
           f"call(s), {c['plan_streams']} stream(s), {c['plan_control_nodes']} control "
           "node(s)"]
  for node in plan.run_graph.nodes:
    deps = ", ".join(f"#{d}" for d in sorted(node.deps)) or "inputs"
    lines.append(f"  step #{node.index}: {_describe_step(node)}  <- {deps}")
  return lines


def _eqn_names(eqns) -> str:
  names = [e.name for e in eqns]
  return ", ".join(names[:8]) + (f", ... ({len(names)} ops)" if len(names) > 8 else "")


def _ms(seconds: float | None) -> str:
  return "-" if seconds is None else f"{seconds * 1e3:.1f} ms"


def render_profile(profile, title: str) -> str:
  """The plan of the last run with its measured times, the critical path
  marked, where the time went, the call sites and hints (`f.profile_report()`)."""
  last = profile.last
  if last is None:
    return (f"{title}: no run measured yet (call it first; a function that runs as one "
            "XLA executable, or falls back to direct execution, has no plan to measure).")
  plan, tl, wall, cp = last.plan, last.timeline, last.wall_s, last.critical_path_s
  lines = [f"{title}, last run: wall {_ms(wall)}, measured critical path {_ms(cp)} "
           f"({cp / wall:.0%} of the wall)" if wall > 0 else f"{title}, last run"]
  b = last.breakdown
  lines.append("where the wall time went (along the steps the run waited on): "
               f"calls {_ms(b['calls_s'])}, tensor segments {_ms(b['segments_s'])}, "
               f"waiting for slots {_ms(b['limits_s'])}, scheduler {_ms(b['scheduler_s'])}, "
               f"tracing and compiling {_ms(b['tracing_s'])}")
  on_path = set(last.critical_path)
  lines.append("steps as run (* on the measured critical path; time from start to "
               "release; a tensor segment's is its dispatch):")
  for node in plan.run_graph.nodes:
    st = tl.steps.get(node.index)
    took = (None if st is None or st.start is None or st.released is None
            else st.released - st.start)
    detail = ""
    if node.kind is Kind.HOST and st is not None and st.jobs:
      j = st.jobs[0]   # its job's summary
      detail = f"  [{j.ran} call(s), longest {_ms(j.longest_s)}"
      waited, longest, _ = j.waits()
      if waited:
        detail += f", {waited} waited for a slot (longest {_ms(longest)})"
      detail += "]"
    deps = ", ".join(f"#{d}" for d in sorted(node.deps)) or "inputs"
    mark = "*" if node.index in on_path else " "
    lines.append(f"  {mark} step #{node.index}: {_describe_step(node)}  {_ms(took)}"
                 f"{detail}  <- {deps}")
  sites = profile.stats()["call_sites"]
  if sites:
    lines.append("call sites (all calls so far):")
    for s in sites:
      lines.append(f"  {s['op']} {s['binding']} at {s['source']}: {s['count']} call(s), "
                   f"p50 {_ms(s['p50_s'])}, p95 {_ms(s['p95_s'])}, max {_ms(s['max_s'])}, "
                   f"{s['errors']} error(s), {s['retries']} retries")
  hints = profile.hints()
  lines.append("hints:" if hints else "hints: none (nothing stands out)")
  lines.extend(f"  - {h}" for h in hints)
  return "\n".join(lines)
