"""Host calls on a Ray cluster: `xcs_jax.runtime(executor="ray")`.

What moves to the cluster is the provider request and the host function;
everything around them stays on the driver, in its runtime: the plan and its
tensor segments (on the driver's JAX devices), the response cache, retries
and deadlines, concurrency limits, rate limiters and budgets (so they hold
cluster-wide for the calls this driver makes), usage counters and traces.

- **Actors.** One `HostActor` per alive node (an async actor, pinned to its
  node), each with a runtime of its own: it holds that node's provider
  clients and local models (`local` loads its model once per actor: one
  replica per node) and runs the requests sent to it, async ones on its
  event loop, sync ones (the local model, host functions) on its threads.
- **Batching.** Requests submitted in one turn of the driver's event loop go
  out as one remote call per actor (`run_many`), spread over the actors by
  how many each has in flight, so a batch of 1,024 calls costs a few Ray
  messages, not 1,024.
- **Faults.** When an actor or its node dies, the requests it held are sent
  again to the actors left (a replacement actor is started where a node is
  alive): at-least-once, so a host function with side effects may run twice
  for one call. Each call's result is taken once. A request no actor can run
  fails with `RemoteUnavailableError`.
- **Functions** (`host_op`) are shipped with Ray's own serialization
  (cloudpickle), put in the object store once per function.

Ray is imported only here, and only when such a runtime is made.
"""
from __future__ import annotations

import asyncio
import collections
import functools
import pickle
import threading
from typing import Any, Callable

from xcs_jax._src.errors import XCSError
from xcs_jax._src.providers import base
from xcs_jax._src.providers import retry
from xcs_jax._src.scope import CallContext

EXTRA = "ray"


class RemoteUnavailableError(XCSError, RuntimeError):
  """No Ray actor is left to run a call (every node died, or the cluster went away)."""


def _import_ray():
  try:
    import ray  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("`xcs_jax.runtime(executor='ray')` needs Ray: "
                      f"pip install 'xcs_jax[{EXTRA}]'") from e
  return ray


class _HostActorImpl:
  """What runs on each node (see the module doc); made a Ray actor class lazily.

  `make_runtime` is `xcs_jax.runtime` (sent by reference: the actor's process
  imports xcs_jax from the same environment).
  """

  def __init__(self, make_runtime: Callable):
    self._ray = _import_ray()
    self._runtime = make_runtime(name="xcs-ray-actor", cache=False)
    self._functions: dict = {}

  def node_id(self) -> str:
    return self._ray.get_runtime_context().get_node_id()

  async def run_many(self, requests: list) -> list:
    """Runs requests concurrently; each result is ("ok", value) or ("error", exc)."""
    outs = await asyncio.gather(*(self._run(r) for r in requests), return_exceptions=True)
    return [("error", _portable(o)) if isinstance(o, BaseException) else ("ok", o)
            for o in outs]

  async def _run(self, request: tuple) -> Any:
    kind = request[0]
    loop = asyncio.get_running_loop()
    if kind == "provider":
      _, provider_name, method_name, binding, args, timeout_s = request
      provider = self._runtime.provider(provider_name)
      method = getattr(provider, method_name)
      ctx = CallContext(timeout_s=timeout_s)
      if base.is_async_method(method):
        return await method(binding, *args, ctx)
      return await loop.run_in_executor(None, functools.partial(method, binding, *args, ctx))
    _, fn_ref, args, retries = request
    fn = self._functions.get(fn_ref.hex())
    if fn is None:
      fn = self._functions[fn_ref.hex()] = self._ray.get(fn_ref)
    call = functools.partial(fn, *args)
    if retries:      # as `host_op(..., retries=)` does locally
      policy = retry.RetryPolicy(retries, None, retry.transient_only,
                                 lambda e: getattr(e, "retry_after_s", None))
      call = functools.partial(retry.attempts, call, policy, CallContext())
    return await loop.run_in_executor(None, call)


def _portable(error: BaseException) -> BaseException:
  """`error` if it can travel back to the driver, else a RuntimeError naming it."""
  try:
    pickle.loads(pickle.dumps(error))
    return error
  except Exception:  # noqa: BLE001 - any error that cannot be pickled
    return RuntimeError(f"{type(error).__name__}: {error}")


class _Actor:
  __slots__ = ("handle", "node", "in_flight", "alive")

  def __init__(self, handle, node: str):
    self.handle, self.node, self.in_flight, self.alive = handle, node, 0, True


class RayBackend:
  """The driver's side: actors, batched dispatch, failover (see the module doc).

  Args:
    address: a Ray cluster's address (`ray.init(address=...)`); None: the
      cluster this process is already connected to, or a new local one.
    make_runtime: `xcs_jax.runtime`, for the actors' own runtimes.
  """

  def __init__(self, address: str | None, make_runtime: Callable):
    self._ray = ray = _import_ray()
    self._owns_ray = not ray.is_initialized()
    if self._owns_ray:
      ray.init(address=address, ignore_reinit_error=True, log_to_driver=False,
               include_dashboard=False)
    self._actor_class = ray.remote(num_cpus=0, max_concurrency=100_000)(_HostActorImpl)
    self._make_runtime = make_runtime
    self._lock = threading.Lock()
    self._actors: list[_Actor] = []
    self._pending: collections.deque = collections.deque()
    self._flush_scheduled = False
    self._function_refs: dict = {}       # id(fn) -> (fn, its ObjectRef)
    self.sent = collections.Counter()      # node -> requests sent there
    self.resent = 0                        # requests sent again after an actor died
    self._start_actors()

  # -- actors ----------------------------------------------------------------------

  def _alive_nodes(self) -> list[str]:
    return [n["NodeID"] for n in self._ray.nodes() if n.get("Alive")]

  def _start_actors(self) -> None:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # pylint: disable=g-import-not-at-top
    with self._lock:
      covered = {a.node for a in self._actors if a.alive}
    started = []
    for node in self._alive_nodes():
      if node in covered:
        continue
      handle = self._actor_class.options(
          scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
              self._make_runtime)
      started.append(_Actor(handle, node))
    with self._lock:
      self._actors.extend(started)

  def actors(self) -> list[tuple[str, bool]]:
    """(node, alive) of each actor started so far."""
    with self._lock:
      return [(a.node, a.alive) for a in self._actors]

  # -- requests ----------------------------------------------------------------------

  def function_ref(self, fn: Callable) -> Any:
    """`fn` in the object store (put once per function, kept while the backend is)."""
    with self._lock:
      known = self._function_refs.get(id(fn))
    if known is not None and known[0] is fn:
      return known[1]
    ref = self._ray.put(fn)
    with self._lock:
      self._function_refs[id(fn)] = (fn, ref)
    return ref

  def submit(self, request: tuple) -> asyncio.Future:
    """On the runtime's loop: a future of `request`'s result (sent with the
    other requests of this loop turn)."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    self._pending.append((request, future))
    if not self._flush_scheduled:
      self._flush_scheduled = True
      loop.call_soon(self._flush)
    return future

  def _flush(self) -> None:
    self._flush_scheduled = False
    batch = [(r, f) for r, f in self._pending if not f.done()]
    self._pending.clear()
    if not batch:
      return
    with self._lock:
      live = [a for a in self._actors if a.alive]
    if not live:
      for _, future in batch:
        future.set_exception(RemoteUnavailableError(
            "no Ray actor is left to run this call: every node it could run on died "
            "(or the cluster went away). Add nodes, or use a local runtime."))
      return
    chunks: dict = collections.defaultdict(list)
    for request, future in batch:   # least loaded first
      actor = min(live, key=lambda a: a.in_flight)
      actor.in_flight += 1
      chunks[id(actor)].append((actor, request, future))
    for items in chunks.values():
      actor = items[0][0]
      self.sent[actor.node] += len(items)
      ref = actor.handle.run_many.remote([r for _, r, _ in items])
      asyncio.ensure_future(self._settle(actor, ref, items))

  async def _settle(self, actor: _Actor, ref, items: list) -> None:
    try:
      outs = await asyncio.wrap_future(ref.future())
    except BaseException as e:  # the actor (or its node) died, or the object was lost
      actor.in_flight -= len(items)
      if not self._is_lost_actor(e):
        for _, _, future in items:
          if not future.done():
            future.set_exception(e)
        return
      with self._lock:
        actor.alive = False
      await asyncio.get_running_loop().run_in_executor(None, self._start_actors)
      self.resent += sum(1 for _, _, f in items if not f.done())
      for _, request, future in items:       # at least once: send them again
        if not future.done():
          self._pending.append((request, future))
      if not self._flush_scheduled:
        self._flush_scheduled = True
        asyncio.get_running_loop().call_soon(self._flush)
      return
    actor.in_flight -= len(items)
    for (_, _, future), (status, value) in zip(items, outs):
      if future.done():
        continue                              # the call was cancelled meanwhile
      if status == "ok":
        future.set_result(value)
      else:
        future.set_exception(value)

  def _is_lost_actor(self, error: BaseException) -> bool:
    e = self._ray.exceptions
    return isinstance(error, (e.RayActorError, e.ActorDiedError, e.NodeDiedError,
                              e.WorkerCrashedError, e.ObjectLostError,
                              e.ActorUnavailableError, e.OwnerDiedError))

  # -- what ops call ----------------------------------------------------------------

  def provider_method(self, provider_name: str, method_name: str) -> Callable:
    """An `async def (binding, *args, ctx)` running the provider's method remotely."""
    async def remote(binding, *args):
      *args, ctx = args             # called as the provider method: (binding, *args, ctx)
      ctx.check()
      return await self.submit(("provider", provider_name, method_name, binding, tuple(args),
                                ctx.remaining()))
    remote.__name__ = f"remote_{method_name}"
    return remote

  async def run_function(self, fn: Callable, args: tuple, retries: int = 0) -> Any:
    return await self.submit(("function", self.function_ref(fn), tuple(args), retries))

  def close(self) -> None:
    with self._lock:
      actors, self._actors = list(self._actors), []
    for a in actors:
      try:
        self._ray.kill(a.handle)
      except Exception:  # noqa: BLE001 - closing: nothing left to report to
        pass
    if self._owns_ray:
      self._ray.shutdown()
