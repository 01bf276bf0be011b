"""How a mesh's calls reach its replicas: routing, health, failover, hedging.

Each runtime keeps one `MeshRouter` per mesh (`Runtime.component`), made on
first use, with what it learns about the replicas: calls in flight, health,
latencies. The router stands where a binding's provider stands
(`binding_ops.provider_of`), so the op code around it is the same as for any
binding: the response cache (keyed by the mesh, not a replica), the call's
deadline, usage.

A mesh call is one `retry.Request` whose attempt picks a replica and sends
it ONE attempt through that replica's own request (its budgets, rate
limiter, `timeout_s` and usage); the retry loop of `retry.py` retries the
mesh's attempt:

- **routing** (`strategy`): "least_loaded" picks the replica with the fewest
  attempts in flight from this mesh relative to its concurrency (ties in
  turn); "round_robin" takes the replicas in turn; "weighted" spreads calls
  in proportion to `weights` (smooth weighted round robin). A replica that
  is ejected, paused by its endpoint's rate limiter (a 429's `Retry-After`),
  already tried by this call, or full (as many attempts in flight as its
  concurrency) is passed over while another one is usable.
- **failover**: an attempt that fails with an error the replica's provider
  calls transient (rate limited, overloaded, a reset or refused connection,
  a timeout) is retried at once on a replica this call has not tried; once
  every usable replica has been tried, after the usual jittered backoff.
- **health** (a circuit breaker per replica, `mesh_replica.py`):
  `eject_after` transient failures in a row eject a replica for
  `cooldown_s`; after that one call probes it: a success brings it back, a
  failure ejects it again. If every replica is ejected, calls go to them
  anyway rather than fail unsent.
- **hedging** (`hedge_after_s`): an attempt still running after that long
  (with "p95": the 95th percentile of this mesh's latencies for that kind of
  call, once it has `P95_MIN_SAMPLES`) is also sent to a second replica; the
  first answer wins and the other attempt is cancelled (an async replica's
  task; a sync replica runs on one of the runtime's workers with a context
  the router cancels).
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import math
import threading
import time
from typing import Any, Callable

from xcs_jax._src.binding_ops import GenerateOp, reported_tokens
from xcs_jax._src.errors import XCSCancelledError
from xcs_jax._src.mesh_replica import LatencyWindow, Replica, ReplicaStats
from xcs_jax._src.numeric import EmbedOp, ScoreOptionsOp
from xcs_jax._src.providers import base
from xcs_jax._src.providers import retry
from xcs_jax._src.scope import CallContext


class _Plan:
  """What one kind of call (an op: generate, score_options with its options,
  embed) needs from each replica, looked up once per batch."""

  __slots__ = ("method", "requests", "is_async", "replicas")

  def __init__(self, router: "MeshRouter", op):
    runtime = router.runtime
    self.method = op.method
    ops = [dataclasses.replace(op, binding=r.binding) for r in router.replicas]
    self.requests = [o.requests(runtime, single_attempt=True) for o in ops]
    self.is_async = [o.is_async(runtime) for o in ops]
    self.replicas = tuple(r for r in router.replicas if op.method in r.methods)
    if not self.replicas:
      raise NotImplementedError(f"no replica of {op.binding} can make `{op.method}` calls.")


class _Call:
  """One mesh call: the replicas it tried, and the last failure (for the
  retry rules, which ask about the error the attempt raised)."""

  __slots__ = ("router", "plan", "args", "tried", "last_error", "last_replica")

  def __init__(self, router: "MeshRouter", plan: _Plan, args: tuple):
    self.router, self.plan, self.args = router, plan, args
    self.tried: set = set()
    self.last_error = self.last_replica = None

  async def attempt(self, binding, *args_and_ctx):
    """The request's `method(binding, *args, ctx)`: one routed attempt."""
    return await self.router.attempt(self, args_and_ctx[-1])

  def failed(self, replica: Replica, error: BaseException) -> None:
    self.tried.add(replica)
    self.last_error, self.last_replica = error, replica

  def _judge(self, error: BaseException) -> base.Provider:
    # The provider of the replica that raised it; errors of the mesh's own
    # (waiting for a slot past the deadline) are judged by the base rules.
    if error is self.last_error:
      return self.last_replica.provider
    return self.router

  def is_transient(self, error: BaseException) -> bool:
    return self._judge(error).is_transient(error)

  def retry_after(self, error: BaseException) -> float | None:
    # A server's `Retry-After` pauses that replica (its rate limiter), not the
    # call: it waits only when it must go back to a replica it tried.
    return None if self.can_fail_over() else self._judge(error).retry_after(error)

  def can_fail_over(self) -> bool:
    return self.router.has_untried(self.plan, self.tried)


@dataclasses.dataclass(frozen=True)
class _FailoverPolicy(retry.RetryPolicy):
  """`retry.RetryPolicy`, except that a transient failure is retried at once
  when a replica the call has not tried is usable (failover needs no backoff)."""

  fail_over: Callable[[], bool] = lambda: False

  def delay(self, error, attempt, ctx):
    wait = super().delay(error, attempt, ctx)
    if wait is None or wait == math.inf or not self.fail_over():
      return wait
    return 0.0


class _Branch:
  """What a sync replica's attempt on a worker sees as its scope: its call's
  scope (cancellation, budgets), plus a cancellation of its own for when the
  mesh no longer needs the attempt (a hedge answered first, or the mesh call
  was cancelled). Offers what `CallContext` reads from a scope."""

  def __init__(self, scope):
    self.scope = scope
    self.budgets = scope.budgets if scope is not None else ()
    self._cancelled = threading.Event()
    self._reason = ""

  @property
  def cancelled(self) -> bool:
    return self._cancelled.is_set() or (self.scope is not None and self.scope.cancelled)

  @property
  def cancel_reason(self) -> str:
    return self._reason or (self.scope.cancel_reason if self.scope is not None else "")

  def cancel(self, reason: str) -> None:
    self._reason = reason
    self._cancelled.set()

  def context(self, ctx: CallContext) -> CallContext:
    """`ctx` (its deadline, clock, item) under this branch."""
    child = CallContext(self, clock=ctx.clock, index=ctx.index)
    child.deadline, child.timeout_s, child.what = ctx.deadline, ctx.timeout_s, ctx.what
    child.facts = ctx.facts
    return child


class _SlotRequest:
  """A request for a slot of a concurrency limit, from an async caller (the
  limit may grant it on any thread)."""

  __slots__ = ("lock", "granted", "gone", "waiter")

  def __init__(self):
    self.lock = threading.Lock()
    self.granted = self.gone = False
    self.waiter: asyncio.Future | None = None

  def grant(self) -> bool:
    with self.lock:
      if self.gone:
        return False          # its caller stopped waiting: the slot goes to the next
      self.granted = True
      waiter = self.waiter
    if waiter is not None:
      waiter.get_loop().call_soon_threadsafe(_set_done, waiter)
    return True


def _set_done(future: asyncio.Future) -> None:
  if not future.done():
    future.set_result(None)


async def _take_slot(limits, key, limit: int) -> None:
  """Waits (cancellably) for a slot of `key` under `limit`; release it after."""
  request = _SlotRequest()
  limits.request(key, limit, request.grant)
  with request.lock:
    if request.granted:
      return
    request.waiter = asyncio.get_running_loop().create_future()
  try:
    await request.waiter
  except BaseException:
    with request.lock:
      request.gone = True
      held = request.granted
    if held:
      limits.release(key)
    raise


def _error_of(future) -> BaseException | None:
  return asyncio.CancelledError() if future.cancelled() else future.exception()


class MeshRouter(base.Provider):
  """A mesh's router in one runtime; a `Provider` to the op code (see the
  module doc). Its `generate`, `score_options` and `embed` route one attempt;
  `requests` makes whole calls, with failover."""

  name = "mesh"

  def __init__(self, mesh, runtime):
    self.mesh, self.runtime, self.clock = mesh, runtime, runtime.clock
    weights = mesh.get("weights") or (1.0,) * len(mesh.replicas)
    self.replicas = tuple(Replica(i, b, runtime, w)
                          for i, (b, w) in enumerate(zip(mesh.replicas, weights)))
    self._strategy = mesh.get("strategy")
    self._hedge_after = mesh.get("hedge_after_s")
    self._eject_after = mesh.get("eject_after")
    self._cooldown_s = float(mesh.get("cooldown_s"))
    self._lock = threading.Lock()
    self._next = 0                      # where the turn of the next pick starts
    self._latencies: dict[str, LatencyWindow] = collections.defaultdict(LatencyWindow)

  # -- the provider interface the op code uses ----------------------------------------

  def cache_identity(self, binding) -> tuple:
    """The mesh's model and the answer parameters every replica shares: the
    same whichever replica answers (and for any mesh of that model and
    parameters), never a replica's endpoint."""
    identities = [r.provider.cache_identity(r.binding)[2:] for r in self.replicas]
    shared = tuple(x for x in identities[0] if all(x in other for other in identities[1:]))
    return ("mesh", binding.model) + shared

  def concurrency(self, binding) -> int:
    return sum(r.limit for r in self.replicas)

  def limit_scope(self, binding) -> str:
    scopes = ", ".join(r.provider.limit_scope(r.binding) for r in self.replicas)
    return f"mesh[{scopes}]"

  def embedding_dim(self, binding) -> int:
    dim = binding.get("embedding_dim")
    if dim is None:
      raise NotImplementedError("none of the mesh's replicas can embed text")
    return dim

  async def generate(self, binding, prompt, seed, ctx):
    return await self._route_once(GenerateOp(binding), (prompt, seed), ctx)

  async def score_options(self, binding, prompt, options, ctx):
    return await self._route_once(ScoreOptionsOp(binding, options), (prompt, options), ctx)

  async def embed(self, binding, text, ctx):
    return await self._route_once(EmbedOp(binding), (text,), ctx)

  async def _route_once(self, op, args, ctx):
    return await self.attempt(_Call(self, _Plan(self, op), args), ctx)

  def requests(self, op, runtime):
    """`request_for(args)`: one mesh call of `op`, as a `retry.Request` whose
    attempts are routed (see `BindingOp.requests`)."""
    plan = _Plan(self, op)
    mesh, usage, retries = op.binding, runtime.usage, op.binding.get("retries")

    def request_for(args):
      call = _Call(self, plan, args)
      policy = _FailoverPolicy(retries, None, call.is_transient, call.retry_after,
                               fail_over=call.can_fail_over)
      return retry.Request(call.attempt, mesh, policy, usage, tokens=reported_tokens)
    return request_for

  # -- routing -------------------------------------------------------------------------

  def _pick(self, plan: _Plan, exclude, *, hedge: bool = False) -> Replica | None:
    """The replica for the next attempt (counted in flight), or, for a hedge,
    None where no other healthy replica has room."""
    now, wall = self.clock.now(), time.monotonic()
    with self._lock:
      usable = [r for r in plan.replicas if r.usable(now, wall)]
      fresh = [r for r in usable if r not in exclude]
      if hedge:
        candidates = [r for r in fresh if r.healthy and r.has_room]
        if not candidates:
          return None
      else:
        # Every usable replica tried: a new round; none usable: all of them.
        candidates = fresh or usable or list(plan.replicas)
        candidates = [r for r in candidates if r.has_room] or candidates
      # A hedge goes to the least loaded, outside the turn of the strategy.
      chosen = min(candidates, key=lambda r: r.load) if hedge else self._choose(candidates)
      chosen.picked(hedge)
      return chosen

  def _choose(self, candidates: list[Replica]) -> Replica:
    if self._strategy == "weighted":
      total = 0.0
      for r in candidates:
        r.current += r.weight
        total += r.weight
      chosen = max(candidates, key=lambda r: r.current)
      chosen.current -= total
      return chosen
    n, start = len(self.replicas), self._next
    if self._strategy == "least_loaded":     # ties in turn
      chosen = min(candidates, key=lambda r: (r.load, (r.index - start) % n))
    else:
      chosen = min(candidates, key=lambda r: (r.index - start) % n)
    self._next = chosen.index + 1
    return chosen

  def has_untried(self, plan: _Plan, tried) -> bool:
    """Whether a usable replica is left that this call has not tried."""
    now, wall = self.clock.now(), time.monotonic()
    with self._lock:
      return any(r not in tried and r.usable(now, wall) for r in plan.replicas)

  def _hedge_delay(self, method: str) -> float | None:
    if self._hedge_after != "p95":
      return self._hedge_after
    with self._lock:
      return self._latencies[method].p95()

  # -- attempts ------------------------------------------------------------------------

  async def attempt(self, call: _Call, ctx: CallContext) -> Any:
    """One attempt of `call`: on one replica, or raced against a hedge."""
    first = self._pick(call.plan, call.tried)
    delay = self._hedge_delay(call.plan.method)
    if delay is None:
      return await self._send(call, first, ctx)
    return await self._race(call, first, delay, ctx)

  async def _race(self, call: _Call, first: Replica, delay: float, ctx: CallContext):
    """`first`'s attempt; if it runs past `delay`, a hedge on another replica
    too. The first answer wins, the other attempt is cancelled; the attempt
    fails only when every attempt started failed."""
    loop = asyncio.get_running_loop()
    racers = {loop.create_task(self._send(call, first, ctx)): first}
    timer = asyncio.ensure_future(ctx.clock.sleep(delay))
    hedged = False
    try:
      while racers:
        waiting = set(racers) if timer is None else {*racers, timer}
        done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
          replica = racers.pop(task, None)
          if replica is None or task.cancelled() or task.exception() is not None:
            continue
          if hedged:
            with self._lock:
              replica.won()
          return task.result()
        if timer in done:
          timer = None
          second = self._pick(call.plan, call.tried | set(racers.values()), hedge=True)
          if second is not None:
            hedged = True
            racers[loop.create_task(self._send(call, second, ctx))] = second
      # Every attempt started failed (`_send` noted each).
      raise call.last_error or XCSCancelledError("cancelled")
    finally:
      if timer is not None:
        timer.cancel()
      for task in racers:
        if task.done():
          if not task.cancelled():
            task.exception()      # retrieved: a loser's error is not news
        else:
          task.cancel()

  async def _send(self, call: _Call, replica: Replica, ctx: CallContext) -> Any:
    """One attempt on `replica` (picked, so counted in flight) through its
    own request, in a slot of its endpoint's concurrency limit."""
    method = call.plan.method
    try:
      await _take_slot(self.runtime.limits, replica.limit_key, replica.limit)
    except BaseException as e:
      self._ended(replica, method, None, e)
      raise
    request = call.plan.requests[replica.index](call.args)
    start = self.clock.now()
    try:
      if call.plan.is_async[replica.index]:
        try:
          result = await retry.arun(request, call.args, ctx)
        except BaseException as e:
          self._ended(replica, method, start, e)
          raise
        self._ended(replica, method, start, None)
      else:
        result = await self._on_worker(replica, method, request, call.args, ctx, start)
    except Exception as e:
      call.failed(replica, e)
      raise
    if ctx.facts is not None:
      ctx.facts["replica"] = str(replica.binding)     # a trace shows who answered
    return result

  async def _on_worker(self, replica: Replica, method: str, request: retry.Request,
                       args: tuple, ctx: CallContext, start: float) -> Any:
    """A sync replica's attempt, on one of the runtime's workers; it is
    accounted for when it really ends (a cancelled one may run on a while)."""
    branch = _Branch(ctx.scope)
    worker_ctx = branch.context(ctx)
    runtime = self.runtime

    def work():
      token = runtime._make_current()
      try:
        return retry.run(request, args, worker_ctx)
      finally:
        runtime._reset_current(token)

    try:
      future = runtime.pool.submit_future(work)
    except BaseException as e:
      self._ended(replica, method, start, e)
      raise
    future.add_done_callback(lambda f: self._ended(replica, method, start, _error_of(f)))
    try:
      return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
      branch.cancel("the mesh no longer needs this attempt (a hedge answered first, "
                    "or the call was cancelled)")
      raise

  def _ended(self, replica: Replica, method: str, start: float | None,
             error: BaseException | None) -> None:
    """An attempt on `replica` ended (`start` None: it was never sent)."""
    now = self.clock.now()
    if start is not None:
      self.runtime.limits.release(replica.limit_key)
    cancelled = isinstance(error, (asyncio.CancelledError, XCSCancelledError))
    transient = (error is not None and not cancelled
                 and replica.provider.is_transient(error))
    with self._lock:
      if error is None:
        replica.succeeded(now - start)
        self._latencies[method].add(now - start)
      elif cancelled or start is None:
        replica.cancelled()
      else:
        replica.failed(transient, now, self._eject_after, self._cooldown_s)

  # -- what it knows -------------------------------------------------------------------

  def stats(self) -> tuple[ReplicaStats, ...]:
    with self._lock:
      snapshots = [r.snapshot() for r in self.replicas]
    return tuple(r.stats(snap) for r, snap in zip(self.replicas, snapshots))
