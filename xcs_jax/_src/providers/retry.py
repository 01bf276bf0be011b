"""Retries, deadlines and usage accounting around one provider request.

One set of rules for every provider:

- `timeout_s` bounds one attempt's running time;
- `deadline_s` bounds the call's whole life: its attempts, the backoff
  sleeps between them, waits on rate limits and failover to other replicas.
  Time queued for a worker (or for a slot of a concurrency limit) counts
  against neither: the call's clock starts when it starts running;
- an attempt that fails with a transient error (`Provider.is_transient`: rate
  limited, overloaded, a reset or refused connection, an attempt timeout) is
  retried after an exponential backoff with full jitter, or after the
  server's `Retry-After` if it said so, until the deadline (or `retries`
  retries, where the binding caps them). Permanent errors are never retried.

The SDK providers turn their SDK's own retries off, so every 429 and every
`Retry-After` reaches these rules (and the endpoint's rate limiter).
"""
from __future__ import annotations

import asyncio
import dataclasses
import math
import random
import time
from typing import Any, Callable

from xcs_jax._src.errors import XCSCancelledError, XCSTimeoutError
from xcs_jax._src.providers.base import TransientError
from xcs_jax._src.scope import CallContext

BASE_DELAY_S = 0.05
MAX_DELAY_S = 5.0


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
  """When to retry a failed attempt, and after how long.

  Attributes:
    retries: at most this many retries, or None: until the call's deadline.
    attempt_timeout_s: each attempt's timeout (the binding's `timeout_s`).
    is_transient: the provider's verdict on an error.
    retry_after: the provider's reading of a server-requested delay, or None.
  """
  retries: int | None
  attempt_timeout_s: float | None
  is_transient: Callable[[BaseException], bool]
  retry_after: Callable[[BaseException], float | None]
  base_delay_s: float = BASE_DELAY_S
  max_delay_s: float = MAX_DELAY_S

  def delay(self, error: BaseException, attempt: int, ctx: CallContext) -> float | None:
    """Seconds to wait before attempt `attempt + 1`; None to give up (the error
    stands); `math.inf` when the deadline comes before the next attempt could
    start (the call then fails with its deadline, the error as its cause)."""
    if isinstance(error, XCSCancelledError) or ctx.cancelled:
      return None
    if self.retries is not None and attempt >= self.retries:
      return None
    if not self.is_transient(error):
      return None
    # The exponent is capped: 2 ** 1100 would not convert to a float.
    growth = 2.0 ** min(attempt + 1, 64)
    wait = random.uniform(0, min(self.max_delay_s, self.base_delay_s * growth))
    asked = self.retry_after(error)
    if asked is not None:
      wait = max(wait, float(asked))
    left = ctx.remaining()
    if left is not None and left <= wait:
      return math.inf
    return wait


class Request:
  """How one binding's calls are sent, made once per batch: the provider
  method, the retry policy, the usage meter, and what runs around each attempt.

  `before(args, ctx)` runs before every attempt (reserves budget and rate
  limits; it may raise) and returns `(token, seconds to wait before
  sending)`; `after(token, result, error, attempt_ctx)` runs after it
  (settles them, notes 429s and the response's headers). `tokens(result)` is
  the (prompt, completion) tokens an answer reports, for usage.
  """

  __slots__ = ("method", "binding", "policy", "usage", "before", "after", "tokens")

  def __init__(self, method: Callable, binding: Any, policy: RetryPolicy, usage: Any, *,
               before: Callable[[tuple, CallContext], tuple[Any, float]] | None = None,
               after: Callable[[Any, Any, BaseException | None, CallContext], None]
               | None = None,
               tokens: Callable[[Any], tuple[int, int]] = lambda result: (0, 0)):
    self.method, self.binding, self.policy, self.usage = method, binding, policy, usage
    self.before, self.after, self.tokens = before, after, tokens


def _count_failure(request: Request, ctx: CallContext, error: BaseException,
                   start: float) -> None:
  """Usage of a call that ended with `error` (an abandoned one counts as a
  call: its abandonment was counted when it happened)."""
  seconds = time.perf_counter() - start
  if ctx.abandoned:
    request.usage.add(request.binding, calls=1, seconds=seconds)
  elif isinstance(error, (XCSCancelledError, asyncio.CancelledError, KeyboardInterrupt)):
    request.usage.add(request.binding, calls=1, cancelled=1, seconds=seconds)
  else:
    request.usage.add(request.binding, calls=1, errors=1, seconds=seconds)


def _count_success(request: Request, ctx: CallContext, result: Any, start: float) -> None:
  seconds = time.perf_counter() - start
  if ctx.abandoned:
    request.usage.add(request.binding, calls=1, seconds=seconds)
    return
  prompt_tokens, completion_tokens = request.tokens(result)
  request.usage.add_call(request.binding, seconds, prompt_tokens, completion_tokens)
  if ctx.facts is not None and (prompt_tokens or completion_tokens):
    ctx.facts.update(prompt_tokens=prompt_tokens,   # a trace records this call
                     completion_tokens=completion_tokens)


def _give_up(error: BaseException, delay: float | None, attempts: int,
             ctx: CallContext) -> BaseException:
  """The error a call raises when it stops retrying: its own, or, when the
  deadline ended the retries, a timeout (with the last error as its cause)."""
  if delay is None and not (isinstance(error, XCSTimeoutError) and ctx.deadline is not None
                            and ctx.remaining() <= 0):
    return error
  timeout = ctx.timeout_error()
  timeout.args = (f"{timeout.args[0]} after {attempts} attempt(s); the last one failed: "
                  f"{type(error).__name__}: {error}",)
  return timeout


def _retry_delay(policy: RetryPolicy, error: Exception, attempt: int,
                 ctx: CallContext) -> float:
  """Seconds to wait before retrying after `error` failed attempt `attempt`
  (the retry counted in the call's stats and trace); raises the error the
  call ends with when it is not retried."""
  delay = policy.delay(error, attempt, ctx)
  if delay is None or delay == math.inf:
    final = _give_up(error, delay, attempt + 1, ctx)
    if final is error:
      raise error
    raise final from error
  ctx.retrying(error, delay)  # per-call-site stats, the trace
  return delay


def _after_failure(request: "Request", token: Any, error: Exception, actx: CallContext,
                   attempt: int, ctx: CallContext) -> float:
  """`request.after` for a failed attempt, then `_retry_delay`."""
  if request.after is not None:
    request.after(token, None, error, actx)
  return _retry_delay(request.policy, error, attempt, ctx)


def transient_only(error: BaseException) -> bool:
  """The retry rule of host functions: only an explicit `TransientError`."""
  return isinstance(error, TransientError)


def attempts(call: Callable[[], Any], policy: RetryPolicy, ctx: CallContext) -> Any:
  """`call()` retried per `policy`, without usage accounting (host functions)."""
  attempt = 0
  while True:
    ctx.check()
    try:
      return call()
    except Exception as e:
      delay = _retry_delay(policy, e, attempt, ctx)
    ctx.sleep(delay)
    attempt += 1


def run(request: Request, args: tuple, ctx: CallContext) -> Any:
  """`method(binding, *args, attempt_ctx)`, retried per the policy (sync)."""
  start = time.perf_counter()
  try:
    attempt = 0
    while True:
      ctx.check_deadline()
      token = None
      if request.before is not None:
        token, wait = request.before(args, ctx)
        if wait > 0:
          ctx.sleep(wait)     # a rate limit: counts against the deadline
      actx = ctx.attempt(request.policy.attempt_timeout_s)
      try:
        result = request.method(request.binding, *args, actx)
      except Exception as e:
        delay = _after_failure(request, token, e, actx, attempt, ctx)
      else:
        if request.after is not None:
          request.after(token, result, None, actx)
        break
      ctx.sleep(delay)        # counts against the deadline
      attempt += 1
      request.usage.add(request.binding, retries=1)
  except BaseException as e:
    _count_failure(request, ctx, e, start)
    raise
  _count_success(request, ctx, result, start)
  return result


async def arun(request: Request, args: tuple, ctx: CallContext) -> Any:
  """`run` for an `async def` provider method."""
  start = time.perf_counter()
  try:
    attempt = 0
    while True:
      ctx.check_deadline()
      token = None
      if request.before is not None:
        token, wait = request.before(args, ctx)
        if wait > 0:
          await ctx.asleep(wait)
      actx = ctx.attempt(request.policy.attempt_timeout_s)
      try:
        result = await request.method(request.binding, *args, actx)
      except Exception as e:
        delay = _after_failure(request, token, e, actx, attempt, ctx)
      else:
        if request.after is not None:
          request.after(token, result, None, actx)
        break
      await ctx.asleep(delay)
      attempt += 1
      request.usage.add(request.binding, retries=1)
  except BaseException as e:
    _count_failure(request, ctx, e, start)
    raise
  _count_success(request, ctx, result, start)
  return result
