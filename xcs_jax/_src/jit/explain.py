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
           f"segment(s), {a.orchestration_ops} orchestration node(s)"]
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
  path = " -> ".join(f"#{i}" for i in a.critical_path) or "(no host calls)"
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


def render_run(plan) -> list[str]:
  """The plan as it runs: after batching sibling calls, vectorizing, folding
  and forming streams (empty for a program that is one XLA executable)."""
  if plan.whole is not None:
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
