"""Profiling: a Perfetto / Chrome trace of the host calls, segments and waits.

`with xcs_jax.profiler.trace("run.json"): ...` records everything inside the
block (named like `jax.profiler.trace`); the spans also appear inside a
`jax.profiler` trace. Per-call-site timings are in `xcs_jax.get_jit_stats`,
and a jitted function's last run with its measured times in
`f.profile_report()` (docs/profiling.md).
"""
from xcs_jax._src.profiler import trace

__all__ = ["trace"]
