"""The library's error types. Messages say what was wrong and how to fix it.

Bad arguments are the builtin `TypeError` / `ValueError` (see `checks.py`),
raised when the call is made. A host call that fails at run time raises
`XCSExecutionError` or one of its subclasses:

    XCSError
    ├── XCSExecutionError (RuntimeError)   a host call failed at run time
    │   ├── XCSTimeoutError (TimeoutError) it ran past its timeout
    │   ├── XCSCancelledError              its run failed first, or was interrupted
    │   └── RuntimeClosedError             it reached a closed runtime
    ├── NoGradientError (TypeError)        trace time: no rule to differentiate a call
    ├── ProviderValueError (ValueError)    a provider's numbers cannot be right
    └── ProviderAPIError (RuntimeError)    an SDK error, its secrets removed

`ProviderValueError` and `ProviderAPIError` (like any exception a provider or
host function raises) reach the user as the `__cause__` of the
`XCSExecutionError` that names the call.
"""
from __future__ import annotations


class XCSError(Exception):
  """Base class of xcs_jax errors."""


class XCSExecutionError(XCSError, RuntimeError):
  """A host-side call (model call or host op) failed at run time.

  The message names the operation, its binding (never a secret), the batch
  item and the user's source line; the original exception is chained as
  `__cause__`.

  Attributes:
    op: the kind of call (``generate``, ``score_options``, ``embed``,
      ``host_op``), or ``""`` where no single call failed.
    binding: the binding's readable form (``"fake:echo(latency_s=0.1)"``) or
      the host op's name.
    source: the user's source line (``"file.py:12 (fn)"``) or ``"<unknown>"``.
    index: the failed item of a batched call, or None.
  """

  def __init__(self, message: str, *, op: str = "", binding: str = "",
               source: str = "", index: int | None = None):
    super().__init__(message)
    self.op = op
    self.binding = binding
    self.source = source
    self.index = index


class XCSTimeoutError(XCSExecutionError, TimeoutError):
  """A host-side call ran past its timeout (`timeout_s` of its binding or op)."""


class XCSCancelledError(XCSExecutionError):
  """A host-side call was cancelled: a sibling call failed first, the run was
  interrupted, or the awaiting task was cancelled."""


class RuntimeClosedError(XCSExecutionError):
  """A call reached a runtime that was already closed."""


class NoGradientError(XCSError, TypeError):
  """Differentiating (at trace time) through a host call that has no gradient rule."""


class ProviderValueError(XCSError, ValueError):
  """A provider returned numbers that cannot be right (NaN, > 0, wrong shape)."""


class ProviderAPIError(XCSError, RuntimeError):
  """An SDK error, re-raised with secrets removed from its text."""
