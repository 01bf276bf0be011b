"""`Runtime`: the owner of every piece of host-side state.

A runtime holds the worker threads, the asyncio loop of async providers,
the concurrency limits, the provider instances (and so their clients and
loaded models) and the usage counters. A default runtime serves users who
never name one; `with xcs_jax.runtime(...):` scopes another (tests,
notebooks, servers with several tenants) and closes it at the end.

Which runtime serves a call: eagerly and under `xcs_jax.jit`, the one
current in the calling context when the call runs (a contextvar); under
plain `jax.jit`, whose callbacks run on XLA's own threads, the one current
when the function was traced. A jitted function holds no runtime.
"""
from __future__ import annotations

import atexit
import collections
import contextvars
import os
import threading
import warnings
import weakref
from typing import Any, Callable

from xcs_jax._src import executor as executor_lib
from xcs_jax._src import checks
from xcs_jax._src.errors import RuntimeClosedError
from xcs_jax._src.providers import base
from xcs_jax._src.providers import cache as cache_lib
from xcs_jax._src.providers import ratelimit
from xcs_jax._src import budget as budget_lib
from xcs_jax._src import ray_backend
from xcs_jax._src.usage import UsageMeter

DEFAULT_CANCEL_GRACE_S = 0.02
"""After a failure, how long running calls get to notice the cancellation
before they are abandoned (cooperative calls stop well within it)."""

_CURRENT: contextvars.ContextVar["Runtime | None"] = contextvars.ContextVar(
    "xcs_jax_runtime", default=None)


class CallTimes:
  """Measured seconds per call of each call site: an exponential moving
  average keyed by the op and the user's source line, for at most `size`
  sites (least recently used dropped).

  Ops compare by value and lines are text, so the measurements survive a
  retrace. They size a job's thread lanes before it runs (`scope.Job`) and
  order the calls waiting for a slot of a concurrency limit (the scheduler
  starts the one heading the longest remaining path first).
  """

  def __init__(self, size: int = 4096, weight: float = 0.5):
    self._size, self._weight = size, weight
    self._lock = threading.Lock()
    self._by_site: collections.OrderedDict = collections.OrderedDict()

  def get(self, op, line: str) -> float | None:
    """The site's average seconds per call, or None if never measured."""
    return self._by_site.get((op, line))   # a dict read needs no lock

  def record(self, op, line: str, seconds: float) -> None:
    key = (op, line)
    with self._lock:
      old = self._by_site.pop(key, None)
      self._by_site[key] = seconds if old is None else (
          self._weight * seconds + (1 - self._weight) * old)
      if len(self._by_site) > self._size:
        self._by_site.popitem(last=False)


class Runtime:
  """Host-side state: workers, event loop, limits, providers, usage.

  Make one with `xcs_jax.runtime(...)`; use it as a context manager to make
  it current (it is closed when the block ends).

  Attributes:
    name: a readable name (thread names start with it).
    cancel_grace_s: after a failure, how long running calls get to stop
      before they are abandoned.
    clock: the runtime's `Clock` (tests inject one that does not sleep).
    usage: the `UsageMeter` of the calls this runtime served.
    limits: the concurrency limits in use.
    call_times: measured seconds per call of each call site (sizes thread
      lanes, orders calls waiting for a slot).
    budget: the `xcs_jax.Budget` every call of this runtime must fit in, or None.
    cache_enabled: whether calls may be answered from the response cache at
      all (False: every call goes to its provider, whatever its binding says).
  """

  def __init__(self, *, name: str = "xcs", cancel_grace_s: float = DEFAULT_CANCEL_GRACE_S,
               clock: executor_lib.Clock | None = None, cache: bool = True,
               cache_dir: str | None = None,
               cache_entries: int = cache_lib.DEFAULT_MEMORY_ENTRIES,
               budget: budget_lib.Budget | None = None, executor: str = "local",
               ray_address: str | None = None):
    checks.check_one_of(executor, "xcs_jax.runtime(executor=...)", EXECUTORS)
    checks.check_str(ray_address, "xcs_jax.runtime(ray_address=...)", none_ok=True)
    self.executor = executor
    self._ray_address = ray_address
    self._remote: ray_backend.RayBackend | None = None
    self.name = checks.check_str(name, "xcs_jax.runtime(name=...)", empty_ok=False)
    self.cancel_grace_s = checks.check_seconds(
        cancel_grace_s, "xcs_jax.runtime(cancel_grace_s=...)", none_ok=False, zero_ok=True)
    if clock is not None and not isinstance(clock, executor_lib.Clock):
      checks.fail(TypeError, "xcs_jax.runtime(clock=...)",
                  "an `xcs_jax.extend.Clock` or None", clock)
    self.cache_enabled = checks.check_bool(cache, "xcs_jax.runtime(cache=...)")
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
      checks.fail(TypeError, "xcs_jax.runtime(cache_dir=...)", "a directory path or None",
                  cache_dir)
    self._cache_entries = checks.check_int(cache_entries, "xcs_jax.runtime(cache_entries=...)",
                                           min_value=1, fix="It counts answers kept in memory.")
    if budget is not None and not isinstance(budget, budget_lib.Budget):
      checks.fail(TypeError, "xcs_jax.runtime(budget=...)", "an `xcs_jax.Budget` or None",
                  budget)
    self.budget = budget
    self._limiters: dict = {}
    self._cache_dir = None if cache_dir is None else os.path.abspath(os.fspath(cache_dir))
    self._response_cache: cache_lib.ResponseCache | None = None
    self.clock = clock or executor_lib.REAL_CLOCK
    self.usage = UsageMeter()
    self.limits = executor_lib.Limits()
    self.call_times = CallTimes()
    self._lock = threading.Lock()
    self._pool: executor_lib.WorkerPool | None = None
    self._loop: executor_lib.EventLoopThread | None = None
    self._providers: dict[str, base.Provider] = {}
    self._components: dict = {}
    self._closed = False
    self._abandoned = 0
    self._warned_abandoned = False
    self._tokens: list = []

  # -- what it owns ----------------------------------------------------------

  @property
  def pool(self) -> executor_lib.WorkerPool:
    """The runtime's worker threads (started on first use)."""
    pool = self._pool
    if pool is None:
      with self._lock:
        self._check_open()
        if self._pool is None:
          self._pool = executor_lib.WorkerPool(self.name)
        pool = self._pool
    return pool

  @property
  def remote(self) -> ray_backend.RayBackend | None:
    """Where host calls run when not here: the Ray backend of a runtime made
    with `executor="ray"` (connected on first use), else None."""
    if self.executor == "local":
      return None
    backend = self._remote
    if backend is None:
      with self._lock:
        self._check_open()
        if self._remote is None:
          self._remote = ray_backend.RayBackend(self._ray_address, runtime)
        backend = self._remote
    return backend

  @property
  def response_cache(self) -> cache_lib.ResponseCache:
    """The runtime's response cache (made on first use)."""
    cache = self._response_cache
    if cache is None:
      with self._lock:
        self._check_open()
        if self._response_cache is None:
          self._response_cache = cache_lib.ResponseCache(self._cache_entries, self._cache_dir)
        cache = self._response_cache
    return cache

  def limiter(self, endpoint: str) -> ratelimit.EndpointLimiter:
    """The rate limiter of `endpoint` (a provider's `limit_scope`)."""
    limiter = self._limiters.get(endpoint)
    if limiter is None:
      with self._lock:
        limiter = self._limiters.get(endpoint)
        if limiter is None:
          limiter = self._limiters[endpoint] = ratelimit.EndpointLimiter(endpoint,
                                                                        self.limits)
    return limiter

  def event_loop(self) -> executor_lib.EventLoopThread:
    """The runtime's asyncio loop for async providers (started on first use)."""
    loop = self._loop
    if loop is None:
      with self._lock:
        self._check_open()
        if self._loop is None:
          self._loop = executor_lib.EventLoopThread(self.name)
        loop = self._loop
    return loop

  def provider(self, name: str) -> base.Provider:
    """This runtime's instance of provider `name` (made on first use)."""
    inst = self._providers.get(name)
    if inst is None:
      factory = base.provider_factory(name)
      with self._lock:
        inst = self._providers.get(name)
        if inst is None:
          inst = self._providers[name] = factory()
    return inst

  def component(self, key, make: Callable[[], Any]) -> Any:
    """This runtime's object for `key`, made by `make()` on first use: state
    that a part of the library keeps per runtime (a mesh's router: the health,
    load and latencies of its replicas)."""
    value = self._components.get(key)
    if value is None:
      self._check_open()
      made = make()     # outside the lock: making it may use the runtime
      with self._lock:
        value = self._components.setdefault(key, made)
    return value

  @property
  def abandoned_calls(self) -> int:
    """Calls abandoned so far (still running, or finished, in the background)."""
    return self._abandoned

  def _note_abandoned(self, n: int) -> None:
    with self._lock:
      self._abandoned += n
      warn = not self._warned_abandoned
      self._warned_abandoned = True
    if warn:
      warnings.warn(
          f"xcs_jax: {n} host call(s) did not stop when their run failed or timed out "
          "(a host function that ignores cancellation, or a blocking provider call); "
          "they go on in the background, their results discarded, on workers of their "
          "own, so later calls do not wait for them. `xcs_jax.usage()` counts them as "
          "`abandoned`. (Warned once per runtime.)", RuntimeWarning, stacklevel=2)

  def _check_open(self) -> None:
    if self._closed:
      raise RuntimeClosedError(
          f"xcs_jax runtime {self.name!r} is closed: make calls inside its `with` block, "
          "or make a new one with `xcs_jax.runtime()`.")

  @property
  def closed(self) -> bool:
    return self._closed

  # -- being current ---------------------------------------------------------

  def _make_current(self):
    return _CURRENT.set(self)

  @staticmethod
  def _reset_current(token) -> None:
    _CURRENT.reset(token)

  def __enter__(self) -> "Runtime":
    self._check_open()
    self._tokens.append(_CURRENT.set(self))
    return self

  def __exit__(self, *exc) -> None:
    _CURRENT.reset(self._tokens.pop())
    self.close()

  def close(self) -> None:
    """Shuts the runtime down: idle workers end, async clients and the event
    loop close, loaded models are freed. Calls still running (abandoned
    ones) end in the background; nothing new starts."""
    with self._lock:
      if self._closed:
        return
      self._closed = True
      providers = list(self._providers.values())
      pool, loop, cache = self._pool, self._loop, self._response_cache
      remote = self._remote
    for p in providers:
      p.close(self)
    if loop is not None:
      loop.close()
    if pool is not None:
      pool.close()
    if cache is not None:
      cache.close()
    if remote is not None:
      remote.close()

  def __repr__(self) -> str:
    state = "closed" if self._closed else "open"
    return f"xcs_jax.Runtime(name={self.name!r}, {state})"


EXECUTORS = ("local", "ray")
"""Where a runtime runs host calls: its own threads and event loop, or a Ray cluster."""

CACHE_ENV = "XCS_JAX_CACHE"
"""Set to `off` (or 0, false, no) to turn the response cache off in the default runtime."""
_OFF = ("off", "0", "false", "no")

_default: Runtime | None = None
_default_lock = threading.Lock()


def default_runtime() -> Runtime:
  """The process-wide runtime of users who never name one."""
  global _default
  rt = _default
  if rt is None:
    with _default_lock:
      if _default is None:
        _default = Runtime(name="xcs",
                           cache=os.environ.get(CACHE_ENV, "on").lower() not in _OFF)
        atexit.register(_default.close)
      rt = _default
  return rt


def current_runtime() -> Runtime:
  """The runtime current in this context: the innermost `with xcs_jax.runtime()`
  block, else the default runtime."""
  rt = _CURRENT.get()
  return rt if rt is not None else default_runtime()


def runtime(*, name: str = "xcs", cancel_grace_s: float = DEFAULT_CANCEL_GRACE_S,
            clock: executor_lib.Clock | None = None, cache: bool = True,
            cache_dir: str | None = None,
            cache_entries: int = cache_lib.DEFAULT_MEMORY_ENTRIES,
            budget: budget_lib.Budget | None = None, executor: str = "local",
            ray_address: str | None = None) -> Runtime:
  """A new runtime; `with xcs_jax.runtime() as rt:` makes it current and closes it.

  Args:
    name: a readable name (its worker threads are named after it).
    cancel_grace_s: after a failure, how long running calls get to stop before
      they are abandoned (default 0.02 s).
    clock: a `Clock` (tests inject one that does not sleep).
    cache: False turns the response cache off for every call in this runtime.
    cache_dir: the disk cache's directory (default: `XCS_JAX_CACHE_DIR`, else
      `~/.cache/xcs_jax/responses`).
    cache_entries: answers kept in memory (least recently used dropped).
    budget: an `xcs_jax.Budget` capping the tokens (and cost) of every call
      this runtime makes, for its life.
    executor: "local" (default: this process's threads and event loop) or
      "ray": model calls and host functions run on a Ray cluster's nodes
      (see docs/distributed.md); everything else stays here.
    ray_address: the Ray cluster to connect to (`ray.init(address=...)`);
      None: the cluster this process is connected to, or a new local one.

  Examples:
    >>> with xcs_jax.runtime() as rt:
    ...   answers = f(prompts)
    ...   print(xcs_jax.usage())     # this runtime's calls only
  """
  return Runtime(name=name, cancel_grace_s=cancel_grace_s, clock=clock, cache=cache,
                 cache_dir=cache_dir, cache_entries=cache_entries, budget=budget,
                 executor=executor, ray_address=ray_address)


class TraceRuntime:
  """The runtime a plain `jax.jit` callback uses: the one current at trace time.

  Holds it weakly (a compiled function must not keep a runtime alive); a
  function traced under the default runtime follows the default.
  """

  __slots__ = ("_ref",)

  def __init__(self):
    rt = _CURRENT.get()
    self._ref = None if rt is None else weakref.ref(rt)

  def get(self) -> Runtime:
    if self._ref is None:
      return default_runtime()
    rt = self._ref()
    if rt is None or rt.closed:
      raise RuntimeClosedError(
          "this function was traced by `jax.jit` under an xcs_jax runtime that is now "
          "closed, and its compiled form still calls into it. Trace it again where the "
          "runtime you want is current (`jax.clear_caches()` drops the old "
          "compilation), or use `xcs_jax.jit`, which uses the current runtime at each call.")
    return rt
