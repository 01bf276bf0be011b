"""xcs_jax: LLM and model calls as first-class JAX primitives."""
from xcs_jax import grad
from xcs_jax import models
from xcs_jax import optim
from xcs_jax import patterns
from xcs_jax import text
from xcs_jax._src.errors import XCSCancelledError
from xcs_jax._src.errors import XCSError
from xcs_jax._src.errors import XCSExecutionError
from xcs_jax._src.errors import XCSTimeoutError
from xcs_jax._src.host_op import host_op
from xcs_jax._src.jit.api import JitFunction
from xcs_jax._src.jit.api import explain
from xcs_jax._src.jit.api import get_jit_stats
from xcs_jax._src.jit.api import jit
from xcs_jax._src.primitives import NoGradientError
from xcs_jax._src.providers.base import USAGE as _USAGE

__version__ = "0.1.0"


def usage() -> dict:
  """Usage counters of every binding so far: calls, errors, retries, tokens, seconds."""
  return _USAGE.snapshot()


def reset_usage() -> None:
  """Zeroes every binding's usage counters."""
  _USAGE.reset()


__all__ = [
    "JitFunction",
    "NoGradientError",
    "XCSCancelledError",
    "XCSError",
    "XCSExecutionError",
    "XCSTimeoutError",
    "explain",
    "grad",
    "get_jit_stats",
    "host_op",
    "jit",
    "models",
    "optim",
    "patterns",
    "reset_usage",
    "text",
    "usage",
]
