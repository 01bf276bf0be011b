"""The library's error types. Messages say what was wrong and how to fix it."""
from __future__ import annotations


class XCSError(Exception):
  """Base class of xcs_jax errors."""


class XCSExecutionError(XCSError, RuntimeError):
  """A host-side call (model call or host op) failed.

  The message names the operation, its binding (never a secret) and the user's
  source line; the original exception is chained as `__cause__`.

  Attributes:
    op: a readable name of the failed operation (e.g. ``generate``).
    binding: the binding's readable form (``"fake:echo(latency_s=0.1)"``).
    source: the user's source line (``"file.py:12 (fn)"``) or ``"<unknown>"``.
  """

  def __init__(self, message: str, *, op: str = "", binding: str = "",
               source: str = ""):
    super().__init__(message)
    self.op = op
    self.binding = binding
    self.source = source


class XCSTimeoutError(XCSError, TimeoutError):
  """A host-side call ran past its timeout."""


class XCSCancelledError(XCSError):
  """A host-side call was cancelled because a sibling call failed first."""


class ProviderValueError(XCSError, ValueError):
  """A provider returned numbers that cannot be right (NaN, > 0, wrong shape)."""


class ProviderAPIError(XCSError, RuntimeError):
  """An SDK error, re-raised with secrets removed from its text."""
