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
      names = [e.name for e in eqns[node.index]]
      shown = ", ".join(names[:8]) + (f", ... ({len(names)} ops)" if len(names) > 8 else "")
      what = f"tensor segment [{shown}]"
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
  return "\n".join(lines)
