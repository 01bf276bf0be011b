"""How a host call's error reads under a user's plain `jax.jit`.

Under `jax.jit` a host call runs as an XLA callback, and XLA turns its
exception into `jax.errors.JaxRuntimeError`, keeping only text: jaxlib writes
``INTERNAL: CpuCallback error calling callback: Traceback (most recent call
last):``, then one ``File ...`` line for every frame of the stack under the
exception's deepest traceback frame (jax's dispatch, the callback wrappers,
the library's own frames), then ``Type: message``. JAX also logs the
exception with its whole traceback (``jax.io_callback failed``). On jax 0.10
and 0.12 alike the message came last in ~1,600 characters, after a logged
traceback of ~50 lines per failed call.

Two things put the message first and keep the log to one line:

- `for_xla(error)` gives the error a one-frame traceback whose frame is a
  suspended generator's (a suspended generator frame has no caller, so the
  stack jaxlib walks is that one frame), its code relabelled with the user's
  file, line and function. The text then reads::

      INTERNAL: CpuCallback error calling callback: Traceback (most recent call last):
        File "/path/train.py", line 12, in loss
      XCSExecutionError: generate call to fake:echo failed (batch item 1), called at ...

- a filter on JAX's callback logger turns the record of such an error into
  one line: ``jax.io_callback failed: XCSExecutionError: <message>``.

Only errors that went through `for_xla` are touched; everything else JAX
logs and formats as it always does.
"""
from __future__ import annotations

import logging
import re
import types

from xcs_jax._src.errors import XCSError

_JAX_CALLBACK_LOGGER = "jax._src.callback"
_SOURCE = re.compile(r"^(?P<file>.*):(?P<line>\d+) \((?P<name>[^()]*)\)$")


def _suspended(): yield  # noqa: E704 - one line, so the frame's line is the code's first


def _frame_at(source: str) -> tuple[types.GeneratorType, types.FrameType]:
  """A suspended frame labelled with `source` (``"file.py:12 (fn)"``), and the
  generator that owns it (the frame is valid while the generator lives)."""
  match = _SOURCE.match(source)
  if match:
    filename, line, name = match["file"], int(match["line"]), match["name"]
  else:
    filename, line, name = source or "<unknown>", 1, "<host call>"
  code = _suspended.__code__.replace(co_filename=filename, co_name=name,
                                     co_firstlineno=line)
  generator = types.FunctionType(code, {})()
  next(generator)
  return generator, generator.gi_frame


def for_xla(error: XCSError, source: str) -> XCSError:
  """`error`, with a traceback of one frame at its call site, to raise into XLA.

  Args:
    error: the host call's error (its `.source`, if set, is the call site).
    source: the call site to use when `error` names none.
  """
  generator, frame = _frame_at(getattr(error, "source", "") or source)
  error._xla_frame_owner = generator  # keeps the frame suspended until XLA is done
  return error.with_traceback(types.TracebackType(None, frame, frame.f_lasti,
                                                  frame.f_lineno))


class _OneLinePerHostError(logging.Filter):
  """Rewrites JAX's log record of an error raised through `for_xla` as one line."""

  def filter(self, record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    if error is not None and hasattr(error, "_xla_frame_owner"):
      first_line = str(error).splitlines()[0] if str(error) else ""
      record.msg = f"{record.getMessage()}: {type(error).__name__}: {first_line}"
      record.args = ()
      record.exc_info = None
      record.exc_text = None
    return True


logging.getLogger(_JAX_CALLBACK_LOGGER).addFilter(_OneLinePerHostError())
