"""What the SDK-backed providers share: lazy imports, API keys, one request.

Heavy SDKs (llama_cpp, openai, anthropic) are imported when a binding of
their provider is made, never by `import xcs_jax` (which stays fast and
works without them), and never inside a call (an import would count
against the call's timeout and, for async clients, block the event loop);
a missing one is an `ImportError` naming the pip extra that installs it.
SDK clients, whose making imports more of their SDK (0.27 s for anthropic's
here), are made by `Provider.prepare` before a batch's calls start.

The openai and anthropic providers use the SDKs' async clients on the
runtime's event loop: a cancelled, timed-out or interrupted request is
abandoned for real (its connection is closed), and thousands of requests in
flight need no thread each.

API keys are read from the environment only when a client is made. Bindings
hold the variable's *name*, never its value, and no error, repr or log line
this library writes contains the value: SDK errors whose text contains the
key are replaced by a redacted copy (some servers echo a wrong key back).
In between, the key is a `Secret`, whose repr and str are redacted, so no
frame of the library holds it as a plain str (error reporters that capture
locals, such as Sentry or rich, print none).
"""
from __future__ import annotations

import email.utils
import hashlib
import importlib
import os
import threading
import time
from typing import Any, Awaitable, Callable

from xcs_jax._src import checks
from xcs_jax._src.errors import ProviderAPIError, XCSTimeoutError
from xcs_jax._src.scope import CallContext

NO_AUTH_PLACEHOLDER = "no-key"
"""Sent as the key to endpoints bound with `api_key_env=None` (the SDKs need one)."""


def import_sdk(module: str, extra: str) -> Any:
  """Imports `module`, or raises an ImportError saying how to install it."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise ImportError(
        f"xcs_jax needs the `{module}` package for this provider: "
        f"pip install 'xcs_jax[{extra}]'") from e


def check_api_key_env(spec: str, api_key_env: str | None) -> None:
  """Raises a ValueError naming the variable and the fix when it is unset."""
  if api_key_env is None:
    return
  if not isinstance(api_key_env, str):
    checks.fail(TypeError, f"bind({spec!r}, api_key_env=...)",
                "the name of an environment variable (a str) or None", api_key_env)
  if not api_key_env or "=" in api_key_env or "\x00" in api_key_env:
    checks.fail(ValueError, f"bind({spec!r}, api_key_env=...)",
                "the name of an environment variable or None", api_key_env)
  checks.check_utf8(api_key_env, f"bind({spec!r}, api_key_env=...)")
  if not os.environ.get(api_key_env):
    raise ValueError(
        f"`bind({spec!r})` reads its API key from the environment variable "
        f"{api_key_env}, which is not set. Set it (`export {api_key_env}=...`), "
        "pass `api_key_env='OTHER_VARIABLE'` to read another one, or "
        "`api_key_env=None` for an endpoint without authentication "
        "(e.g. a local server).")


def check_endpoint(spec: str, params: dict, module: str, extra: str) -> None:
  """The bind-time checks every SDK provider shares: SDK (imported now, before
  any call's deadline starts), key variable, base_url."""
  import_sdk(module, extra)
  check_api_key_env(spec, params["api_key_env"])
  checks.check_str(params["base_url"], f"bind({spec!r}, base_url=...)", none_ok=True,
                   empty_ok=False, nul_ok=False)


class Secret:
  """An API key that never shows itself.

  Its `repr` and `str` are redacted and it cannot be pickled, so a frame
  holding it (as error reporters that capture locals see them) shows no key.
  `reveal()` hands the value straight to the SDK client that needs it; the
  library keeps it in no variable of its own.
  """

  __slots__ = ("_value",)

  def __init__(self, value: str):
    self._value = value

  def reveal(self) -> str:
    return self._value

  @property
  def sent(self) -> bool:
    """Whether a real key is sent (not the placeholder of an open endpoint)."""
    return bool(self._value) and self._value != NO_AUTH_PLACEHOLDER

  def fingerprint(self) -> str:
    """A short digest that tells keys apart (for caches) without revealing them."""
    return hashlib.sha256(self._value.encode()).hexdigest()[:16]

  def redact(self, text: str) -> str:
    """`text` with every occurrence of the key cut out."""
    return text.replace(self._value, "[redacted]") if self.sent else text

  def __repr__(self) -> str:
    return "Secret('[redacted]')"

  __str__ = __repr__

  def __reduce__(self):
    raise TypeError("an API key (xcs_jax Secret) cannot be pickled")


def read_api_key(spec: str, api_key_env: str | None) -> Secret:
  """The key in `api_key_env` (a placeholder when None), as a `Secret`."""
  if api_key_env is None:
    return Secret(NO_AUTH_PLACEHOLDER)
  check_api_key_env(spec, api_key_env)
  return Secret(os.environ[api_key_env])


def redact(error: BaseException, secret: Secret | None) -> BaseException:
  """`error` itself for an endpoint without a key; otherwise a `ProviderAPIError`
  copy of its type, status and text with the key cut out.

  An SDK error keeps the request (and its `Authorization` header) as an
  attribute, so it must not travel on (as a cause) when a key was sent.
  """
  if secret is None or not secret.sent:
    return error
  status = getattr(error, "status_code", None)
  return ProviderAPIError(f"{type(error).__name__}"
                          f"{f' (HTTP {status})' if status else ''}: "
                          f"{secret.redact(str(error))}")


TRANSIENT_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 529})
"""HTTP statuses worth retrying: timeouts, conflicts, rate limits, overloads, 5xx."""


def retry_after_s(headers: Any) -> float | None:
  """The delay a server asked for: `retry-after-ms`, `retry-after` (seconds or
  an HTTP date), else the `x-ratelimit-reset-*` the OpenAI API sends."""
  if not headers:
    return None
  get = headers.get
  try:
    if get("retry-after-ms") is not None:
      return max(0.0, float(get("retry-after-ms")) / 1000)
    value = get("retry-after")
    if value is not None:
      try:
        return max(0.0, float(value))
      except ValueError:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    resets = [parse_duration(get(h)) for h in ("x-ratelimit-reset-requests",
                                                "x-ratelimit-reset-tokens")]
    resets = [r for r in resets if r is not None]
    return max(resets) if resets else None
  except (TypeError, ValueError, OverflowError):
    return None


def parse_duration(value: Any) -> float | None:
  """Seconds in an `x-ratelimit-reset-*` value: `"1s"`, `"6m0s"`, `"20ms"`, `"0.5"`."""
  if value is None:
    return None
  text = str(value).strip()
  try:
    return float(text)
  except ValueError:
    pass
  total, number = 0.0, ""
  units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
  i = 0
  while i < len(text):
    c = text[i]
    if c.isdigit() or c == ".":
      number += c
      i += 1
      continue
    unit = "ms" if text.startswith("ms", i) else c
    if unit not in units or not number:
      return None
    total += float(number) * units[unit]
    number = ""
    i += len(unit)
  return total if not number else None


def classify(error: BaseException, cause: BaseException, connection_errors: tuple) -> None:
  """Marks `cause` (the error raised, maybe a redacted copy of `error`) with
  `transient`, `status` and `retry_after_s`, read from the SDK's `error`."""
  status = getattr(error, "status_code", None)
  response = getattr(error, "response", None)
  headers = getattr(response, "headers", None)
  cause.status = status
  cause.transient = isinstance(error, connection_errors) or status in TRANSIENT_STATUS
  cause.retry_after_s = retry_after_s(headers) if status in (429, 503, 529) else None


async def request(send: Callable[[float | None], Awaitable[Any]], *, ctx: CallContext,
                  timeout_errors: tuple[type[BaseException], ...],
                  connection_errors: tuple[type[BaseException], ...] = (),
                  secret: Secret | None, what: str) -> Any:
  """`await send(timeout)`: one SDK request (one attempt), bounded by `ctx`'s
  deadline.

  The SDK's own retries are off (`max_retries=0`): every failure comes here,
  marked `transient` (rate limits, overloads, 5xx, lost connections) with the
  server's `Retry-After`, for the runtime's retry rules and rate limiter.
  Cancelling the task (a failed sibling, an interrupt, the deadline) abandons
  the request and closes its connection.

  Raises:
    XCSCancelledError: the call's run failed before the request started.
    XCSTimeoutError: the attempt ran past its timeout.
  """
  ctx.check()
  timeout = ctx.timeout_s
  left = ctx.remaining()
  if left is not None:
    if left <= 0:
      raise ctx.timeout_error()
    timeout = left
  # Errors are raised after the `except` blocks so that a redacted error does
  # not keep the original (with the secret) as its implicit `__context__`.
  try:
    response = await send(timeout)
    if hasattr(response, "parse") and hasattr(response, "headers"):
      # A raw response (`with_raw_response`): its rate-limit headers go to the
      # endpoint's limiter through the attempt's context.
      ctx.headers = response.headers
      return response.parse()
    return response
  except timeout_errors as e:
    cause = redact(e, secret)
    timed_out = True
  except Exception as e:
    cause = redact(e, secret)
    classify(e, cause, connection_errors)
    if cause is e:
      raise
    timed_out = False
  if timed_out:
    raise XCSTimeoutError(
        f"{what} timed out (timeout_s={ctx.timeout_s} per attempt)") from cause
  raise cause


class ClientCache:
  """One SDK client per (base_url, api_key_env, key, timeout_s).

  `make(base_url=, api_key=, timeout=, max_retries=0)` builds a client (its
  retries off: the runtime retries, see `retry.py`; `api_key` is a `Secret`:
  reveal it only in the client's constructor call); the key is read from the
  binding's `api_key_env` each time a client is looked up, so a changed
  variable takes effect (the cache holds a digest).
  Each provider instance (so each runtime) has its own cache; async clients
  are used only on their runtime's event loop.
  """

  def __init__(self, provider: str, make: Callable[..., Any]):
    self._provider = provider
    self._make = make
    self._clients: dict[tuple, Any] = {}
    self._lock = threading.Lock()

  def get(self, binding) -> tuple[Any, Secret]:
    """(client, key) for `binding`; makes the client on first use (call it
    before a call's deadline starts: making one imports parts of the SDK)."""
    p = binding.options
    key = read_api_key(f"{self._provider}:{binding.model}", p["api_key_env"])
    cache_key = (p["base_url"], p["api_key_env"], key.fingerprint(), p["timeout_s"])
    with self._lock:
      client = self._clients.get(cache_key)
      if client is None:
        client = self._clients[cache_key] = self._make(
            base_url=p["base_url"], api_key=key, timeout=p["timeout_s"],
            max_retries=0)
    return client, key

  async def aclose(self) -> None:
    """Closes every async client (their connection pools)."""
    with self._lock:
      clients, self._clients = list(self._clients.values()), {}
    for client in clients:
      await client.close()

  def close_on(self, runtime) -> None:
    """Closes the clients on `runtime`'s event loop, if it ever started."""
    if runtime is not None and runtime._loop is not None and self._clients:
      try:
        runtime._loop.run(self.aclose(), timeout_s=2.0)
      except Exception:  # noqa: BLE001 - closing: nothing left to report to
        pass
