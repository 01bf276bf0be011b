"""Finding the user's source line of a call site."""
from __future__ import annotations

import os
import sys

import jax

_XCS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_JAX_DIR = os.path.dirname(os.path.abspath(jax.__file__))
_SKIP = (_XCS_DIR + os.sep, _JAX_DIR + os.sep, os.path.dirname(_JAX_DIR) + os.sep + "jaxlib")


def user_source() -> str:
  """`"file.py:12 (fn)"` for the innermost frame outside xcs_jax and jax."""
  frame = sys._getframe(1)
  while frame is not None:
    path = frame.f_code.co_filename
    if not path.startswith(_SKIP) and not path.startswith("<frozen"):
      return f"{path}:{frame.f_lineno} ({frame.f_code.co_name})"
    frame = frame.f_back
  return "<unknown>"
