"""`xcs_jax.jit`: JAX traces, XCS passes split, the scheduler runs calls concurrently."""
from __future__ import annotations

import asyncio
import collections
import functools
import inspect
import threading
import time
import warnings
from typing import Any, Callable, Sequence

import jax
import numpy as np

from xcs_jax._src import checks
from xcs_jax._src import compat
from xcs_jax._src import progress as progress_lib
from xcs_jax._src.jit.explain import render_plan, render_profile
from xcs_jax._src.jit.plan import Plan, SegmentCache, build_plan
from xcs_jax._src.jit.profile import Profile
from xcs_jax._src.jit.scheduler import RunLimit, run_plan
from xcs_jax._src.jit.timeline import RunTimeline
from xcs_jax._src.primitives import watch_host_calls
from xcs_jax._src.runtime import Runtime, current_runtime
from xcs_jax._src.scope import Scope

DEFAULT_CACHE_SIZE = 64

# Errors that mean "this Python function cannot be traced" (Python control
# flow on a traced value, e.g. on a model's decoded answer).
_UNTRACEABLE = tuple(
    getattr(jax.errors, n) for n in (
        "ConcretizationTypeError", "TracerBoolConversionError",
        "TracerIntegerConversionError", "TracerArrayConversionError")
    if hasattr(jax.errors, n))

_FALLBACK = object()  # cache value for signatures that run directly


def _leaf_key(x: Any) -> Any:
  if isinstance(x, (bool, int, float, complex)):
    return ("py", type(x))
  shape = np.shape(x)
  dtype = getattr(x, "dtype", None)
  if dtype is None:
    dtype = np.result_type(x)
  return (shape, str(dtype), bool(getattr(x, "weak_type", False)))


def _hashable_static(value: Any, where: str) -> Any:
  try:
    hash(value)
  except TypeError as e:
    raise ValueError(f"static argument {where} must be hashable: it keys the plan "
                     f"cache, like jax.jit's static args ({e}). Make it hashable (a "
                     "tuple, a frozen dataclass), or pass its arrays as arrays "
                     "(register the class as a pytree).") from None
  return value


class _Entry:
  __slots__ = ("plan", "out_tree", "objects", "direct")

  def __init__(self, plan: Plan | None, out_tree: Any, objects: tuple = ()):
    self.plan, self.out_tree, self.objects = plan, out_tree, objects
    self.direct = False  # jax.jit(fun) itself can run this signature


def _static_positions_and_names(fun, argnums: tuple, argnames: tuple) -> tuple:
  """Like jax.jit: a static argument is static by position and by name."""
  try:
    params = list(inspect.signature(fun).parameters.values())
  except (TypeError, ValueError):  # no signature (some builtins)
    return argnums, argnames
  kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
  positional = [p.name for p in params if p.kind in kinds]
  names = set(argnames) | {positional[i] for i in argnums if 0 <= i < len(positional)}
  nums = set(argnums) | {positional.index(n) for n in argnames if n in positional}
  keyword = {p.name for p in params if p.kind is not inspect.Parameter.POSITIONAL_ONLY}
  return tuple(sorted(nums)), tuple(sorted(n for n in names if n in keyword))


class _HostCallsFound(Exception):
  """Stops a jax.jit trace on the fast path: this signature makes host calls."""


def _is_array_like(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic, bool, int, float, complex)
                    ) or hasattr(x, "__jax_array__")


class JitFunction:
  """A function wrapped by `xcs_jax.jit`. Call it like the function."""

  def __init__(self, fun: Callable, static_argnums: Sequence[int] = (),
               static_argnames: Sequence[str] = (), max_concurrency: int | None = None,
               cache_size: int = DEFAULT_CACHE_SIZE, progress: bool = True):
    checks.check_callable(fun, "xcs_jax.jit(f)", "a callable (the function to compile)")
    static_argnums, static_argnames = checks.check_static_args(
        fun, static_argnums, static_argnames)
    self.fun = fun
    self.static_argnums, self.static_argnames = _static_positions_and_names(
        fun, static_argnums, static_argnames)
    self.max_concurrency = checks.check_int(
        max_concurrency, "xcs_jax.jit(..., max_concurrency=...)", min_value=1, none_ok=True)
    self._cache_size = checks.check_int(cache_size, "xcs_jax.jit(..., cache_size=...)",
                                        min_value=1, fix="It is the number of plans kept.")
    self.progress = checks.check_bool(progress, "xcs_jax.jit(..., progress=...)")
    self._profile = Profile()
    self._cache: collections.OrderedDict = collections.OrderedDict()
    self._segments = SegmentCache()
    self._lock = threading.Lock()
    self._building: dict = {}
    self._warned_fallback = False
    self._stats = dict(status="cold", cache_hits=0, cache_misses=0)
    self._last: dict = {}
    # Once every signature seen makes no host calls, calls go straight to
    # jax.jit (its C++ dispatch path is what 'as fast as jax.jit' needs). A
    # new signature that does bind a host call stops that trace (see
    # `_no_host_calls`) and takes the scheduler's path.
    self._jax_jit = jax.jit(self._no_host_calls, static_argnums=self.static_argnums,
                            static_argnames=self.static_argnames)
    self._tensor_only = False
    self._fast_calls = 0
    self._fast_traces = 0
    functools.update_wrapper(self, fun)

  def _no_host_calls(self, *args, **kwargs):
    self._fast_traces += 1  # jax.jit traces only for a signature it has not seen
    with watch_host_calls() as count:
      out = self.fun(*args, **kwargs)
    if count[0]:
      raise _HostCallsFound()
    return out

  def __get__(self, obj, objtype=None):
    if obj is None:
      return self
    return functools.partial(self, obj)

  # --- tracing --------------------------------------------------------------
  def _split(self, args, kwargs):
    static = []
    dyn_args = []
    for i, a in enumerate(args):
      if i in self.static_argnums or (i - len(args)) in self.static_argnums:
        static.append(("pos", i, _hashable_static(a, f"#{i}")))
      else:
        dyn_args.append(a)
    dyn_kwargs = {}
    for k, v in sorted(kwargs.items()):
      if k in self.static_argnames:
        static.append(("kw", k, _hashable_static(v, f"{k!r}")))
      else:
        dyn_kwargs[k] = v
    leaves, tree = jax.tree_util.tree_flatten((dyn_args, dyn_kwargs))
    # Leaves that are not arrays (a method's `self`, a config object) are
    # static, like equinox's filter_jit: hashed into the key, not traced.
    objects, arrays = [], []
    for i, x in enumerate(leaves):
      if _is_array_like(x):
        arrays.append(x)
      else:
        objects.append((i, _hashable_static(
            x, f"(a {type(x).__name__} among the arguments, not an array, so static)")))
    return tuple(static), tuple(objects), arrays, tree

  def _flat_fun(self, static, objects, tree, n_args):
    out_tree_box = []

    def flat(*arrays):
      leaves, it = [], iter(arrays)
      by_position = dict(objects)
      for i in range(len(arrays) + len(objects)):
        leaves.append(by_position[i] if i in by_position else next(it))
      dyn_args, kwargs = jax.tree_util.tree_unflatten(tree, leaves)
      args, it = [], iter(dyn_args)
      static_pos = {i: v for kind, i, v in static if kind == "pos"}
      for i in range(n_args):
        args.append(static_pos[i] if i in static_pos else next(it))
      kwargs = dict(kwargs)
      kwargs.update({k: v for kind, k, v in static if kind == "kw"})
      out = self.fun(*args, **kwargs)
      out_leaves, out_tree = jax.tree_util.tree_flatten(out)
      out_tree_box.append(out_tree)
      return out_leaves
    return flat, out_tree_box

  def _build(self, static, objects, leaves, tree, n_args) -> _Entry:
    flat, out_tree_box = self._flat_fun(static, objects, tree, n_args)
    try:
      with watch_host_calls() as binds:
        closed = jax.make_jaxpr(flat)(*leaves)
    except _UNTRACEABLE as e:
      if not self._warned_fallback:
        self._warned_fallback = True
        warnings.warn(
            f"xcs_jax.jit could not trace {getattr(self.fun, '__name__', 'the function')} "
            f"({type(e).__name__}: Python control flow or numpy on a traced value, e.g. "
            "on a model's answer), so it runs the function directly, one call at a time. "
            "Use lax.cond / lax.switch / host_op to keep it traceable.",
            RuntimeWarning, stacklevel=5)
      return _Entry(None, _FALLBACK)
    # Under max_concurrency a batched call would count as one call: keep call sites apart.
    plan = build_plan(closed, batch_calls=self.max_concurrency is None,
                      segments=self._segments)
    entry = _Entry(plan, out_tree_box[0], objects)
    # A call site whose output is unused is dropped from the plan, yet jax.jit's
    # own trace would still bind it: such a function never takes the fast path.
    entry.direct = plan.whole is not None and not objects and not binds[0]
    return entry

  def _entry(self, args, kwargs):
    static, objects, leaves, tree = self._split(args, kwargs)
    key = (static, objects, tree, len(args), tuple(_leaf_key(x) for x in leaves))
    with self._lock:
      entry = self._cache.get(key)
      if entry is not None:
        self._cache.move_to_end(key)
        self._stats["cache_hits"] += 1
        return entry, leaves
      event = self._building.get(key)
      if event is None:
        event = self._building[key] = threading.Event()
        builder = True
      else:
        builder = False
    if not builder:  # another thread builds this plan: wait for it
      event.wait()
      return self._entry(args, kwargs)
    try:
      entry = self._build(static, objects, leaves, tree, len(args))
      with self._lock:
        self._stats["cache_misses"] += 1
        self._cache[key] = entry
        while len(self._cache) > self._cache_size:
          self._cache.popitem(last=False)
        if entry.out_tree is _FALLBACK:
          self._stats["status"] = "fallback"
        elif self._stats["status"] == "cold":
          self._stats["status"] = "compiled"
        self._last_plan = entry.plan
        self._tensor_only = all(e.direct for e in self._cache.values())
    finally:
      with self._lock:
        del self._building[key]
      event.set()
    return entry, leaves

  # --- calling --------------------------------------------------------------
  def __call__(self, *args, **kwargs):
    if self._tensor_only:   # jax.jit's own dispatch, with nothing around it
      try:
        out = self._jax_jit(*args, **kwargs)
        self._fast_calls += 1
        return out
      except (_HostCallsFound,  # a new signature with host calls
              *_UNTRACEABLE):    # or one JAX cannot trace: the fallback path warns
        self._tensor_only = False
    return self._call(current_runtime(), None, args, kwargs)

  async def call_async(self, *args, **kwargs):
    """Awaitable form of calling the function, for async applications.

    The run happens on a worker of the current runtime, so the caller's event
    loop is never blocked; cancelling the awaiting task cancels the run (its
    queued calls never start, its running calls are told to stop).

    Examples:
      >>> answers = await f.call_async(prompts)    # inside `async def`
    """
    runtime = current_runtime()
    scope = Scope(runtime)

    def run():
      token = runtime._make_current()  # eager parts (a fallback) see it too
      try:
        return self._call(runtime, scope, args, kwargs)
      finally:
        runtime._reset_current(token)

    future = runtime.pool.submit_future(run)
    try:
      return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
      scope.cancel("the awaiting task was cancelled")
      raise

  def _call(self, runtime: Runtime, scope: Scope | None, args, kwargs):
    leaves_all = jax.tree_util.tree_leaves((args, kwargs))
    if any(compat.is_tracer(x) for x in leaves_all):
      # Under an outer jax transformation (jit, grad, vmap, or xcs_jax.jit
      # itself): become part of the outer trace. The outer xcs_jax.jit, if
      # any, schedules the calls.
      return self.fun(*args, **kwargs)
    start = time.perf_counter()
    entry, leaves = self._entry(args, kwargs)
    if entry.out_tree is _FALLBACK:
      out = self.fun(*args, **kwargs)
      self._record(start, None, None)
      return out
    if entry.direct:  # no host calls at all: one XLA executable, jax.jit's own
      out = self._jax_jit(*args, **kwargs)
      self._record(start, None, entry.plan)
      return out
    scope = scope or Scope(runtime)
    run_limit = RunLimit(self.max_concurrency) if self.max_concurrency else None
    timeline = RunTimeline(start)
    try:
      with progress_lib.shown(scope, self._progress_label, entry.plan.host_items,
                              self.progress):
        outs = run_plan(entry.plan, leaves, scope=scope, run_limit=run_limit,
                        timeline=timeline)
    except BaseException:  # a failure, or an interrupt (`Scope.wait` cancelled it)
      scope.finish()
      self._profile.record_run(entry.plan, timeline, scope, ok=False)
      raise
    timeline.end = time.perf_counter()
    self._profile.record_run(entry.plan, timeline, scope, ok=True)
    self._record(start, scope, entry.plan, timeline.end)
    return jax.tree_util.tree_unflatten(entry.out_tree, outs)

  def _progress_label(self) -> str:
    return f"{self!r}"

  def _record(self, start, scope, plan, end=None):
    end = time.perf_counter() if end is None else end
    with self._lock:
      self._last = dict(last_wall_s=end - start,
                        last_model_call_s=scope.call_seconds if scope else None)
      if plan is not None:
        self._last_plan = plan

  # --- introspection --------------------------------------------------------
  def trace(self, *args, **kwargs) -> Plan | None:
    """The plan for these arguments (built and cached if new); None on fallback."""
    entry, _ = self._entry(args, kwargs)
    return entry.plan

  def stats(self) -> dict:
    with self._lock:
      plan = getattr(self, "_last_plan", None)
      stats = dict(self._stats, cache_entries=len(self._cache))
      # Fast-path calls: jax.jit's own cache; a trace there is a miss.
      fast_misses = max(0, self._fast_traces - self._stats["cache_misses"])
      stats["cache_hits"] += self._fast_calls - fast_misses
      stats["cache_misses"] += fast_misses
      stats.update(self._last or dict(last_wall_s=None, last_model_call_s=None))
    a = plan.analysis if plan is not None else None
    stats.update(
        parallel_groups=len(a.parallel_groups) if a else 0,
        max_parallelism=a.max_parallelism if a else 0,
        critical_path=len(a.critical_path) if a else 0,
        estimated_speedup=a.estimated_speedup if a else 1.0,
        execution_strategy=a.execution_strategy if a else None,
        tensor_ops=a.tensor_ops if a else 0,
        orchestration_ops=a.orchestration_ops if a else 0,
        xla_call_ops=a.xla_call_ops if a else 0,
        **(plan.counts() if plan is not None else dict(
            plan_segments=0, plan_host_calls=0, plan_streams=0, plan_control_nodes=0)),
        compiled_segments=self._segments.compiled,
        **self._profile.stats(),
    )
    return stats

  def profile_report(self) -> str:
    """The last run's plan with its measured times, as readable text.

    Each step as it ran with its time (the steps on the measured critical
    path marked `*`), where the wall time went (calls, tensor segments,
    waiting for slots of concurrency limits, the scheduler, tracing), every
    call site's count and percentiles over all calls so far, and hints (calls
    waiting on a concurrency limit, a Python loop that serializes calls).

    Examples:
      >>> answer(prompts)
      >>> print(answer.profile_report())
    """
    return render_profile(self._profile, repr(self))

  def __repr__(self):
    return f"xcs_jax.jit({getattr(self.fun, '__qualname__', self.fun)!r})"


def jit(fun: Callable | None = None, *, static_argnums: int | Sequence[int] = (),
        static_argnames: str | Sequence[str] = (), max_concurrency: int | None = None,
        cache_size: int = DEFAULT_CACHE_SIZE, progress: bool = True):
  """Compiles a hybrid function: XLA for tensor code, concurrent host calls.

  The first call for a new argument signature traces `fun` with JAX, splits
  the jaxpr into XLA-compiled tensor segments and host calls (model calls,
  host ops, control flow holding them), and caches that plan; later calls
  with the same shapes, dtypes, weak types and static args reuse it. Each
  call runs every node the moment its inputs are ready, host calls
  concurrently (bounded by each provider's limit and `max_concurrency`).

  Args:
    fun: the function; use as `@xcs_jax.jit` or `@xcs_jax.jit(...)`.
    static_argnums: positions of hashable arguments that are not arrays.
    static_argnames: names of hashable keyword arguments that are not arrays.
    max_concurrency: at most this many host calls (nodes) in flight at once.
    cache_size: plans kept (least recently used dropped first).
    progress: show a progress bar (tqdm) for a call that runs longer than a
      few seconds, on a terminal or in a notebook; False: never (the
      environment variable `XCS_JAX_PROGRESS=0` turns bars off everywhere).

  Returns:
    A `JitFunction`. Under an outer `jax.jit`/`grad`/`vmap` it traces
    inline, so composition works; parallelism is kept where `xcs_jax.jit`
    is outermost. A function JAX cannot trace runs directly (with a
    warning; `get_jit_stats(f)['status'] == 'fallback'`).

  Examples:
    >>> @xcs_jax.jit
    ... def three(p):
    ...   return a(p), b(p), c(p)   # three calls, run at once
  """
  if fun is None:
    return functools.partial(jit, static_argnums=static_argnums,
                             static_argnames=static_argnames,
                             max_concurrency=max_concurrency, cache_size=cache_size,
                             progress=progress)
  return JitFunction(fun, static_argnums, static_argnames, max_concurrency, cache_size,
                     progress)


def get_jit_stats(f: JitFunction) -> dict:
  """Statistics of an `xcs_jax.jit` function (see the docs for the keys)."""
  if isinstance(f, functools.partial) and isinstance(f.func, JitFunction):
    f = f.func  # a method looked up on an instance
  if not isinstance(f, JitFunction):
    raise TypeError(f"`get_jit_stats(f)` needs a function wrapped by `xcs_jax.jit`; "
                    f"got {type(f).__name__}.")
  return f.stats()


def explain(f: Callable, *args, **kwargs) -> str:
  """Readable text: segments, calls with bindings and lines, parallel groups,
  the critical path, for `f` (plain or wrapped by `xcs_jax.jit`) on these args."""
  jf = f if isinstance(f, JitFunction) else JitFunction(f)
  plan = jf.trace(*args, **kwargs)
  if plan is None:
    return (f"{jf!r}: falls back to direct execution (JAX cannot trace it for these "
            "arguments); no plan.")
  return render_plan(plan, title=repr(jf))
