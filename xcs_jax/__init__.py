"""xcs_jax: LLM and model calls as first-class JAX primitives."""
from xcs_jax import extend
from xcs_jax import grad
from xcs_jax import models
from xcs_jax import optim
from xcs_jax import patterns
from xcs_jax import profiler
from xcs_jax import text
from xcs_jax._src.budget import Budget
from xcs_jax._src.budget import BudgetExceededError
from xcs_jax._src.budget import budget
from xcs_jax._src.errors import NoGradientError
from xcs_jax._src.errors import ProviderAPIError
from xcs_jax._src.errors import ProviderValueError
from xcs_jax._src.errors import RuntimeClosedError
from xcs_jax._src.errors import XCSCancelledError
from xcs_jax._src.errors import XCSError
from xcs_jax._src.errors import XCSExecutionError
from xcs_jax._src.errors import XCSTimeoutError
from xcs_jax._src.host_op import host_op
from xcs_jax._src.jit.api import JitFunction
from xcs_jax._src.jit.api import explain
from xcs_jax._src.jit.api import get_jit_stats
from xcs_jax._src.jit.api import jit
from xcs_jax._src.providers.fake import FakeProviderError
from xcs_jax._src.runtime import Runtime
from xcs_jax._src.runtime import current_runtime
from xcs_jax._src.runtime import runtime

__version__ = "0.1.0"


def usage() -> dict:
  """Usage counters of every binding the current runtime served: calls, errors,
  retries, cancelled, abandoned, tokens, seconds."""
  return current_runtime().usage.snapshot()


def reset_usage() -> None:
  """Zeroes the current runtime's usage counters."""
  current_runtime().usage.reset()


__all__ = [
    "Budget",
    "BudgetExceededError",
    "FakeProviderError",
    "JitFunction",
    "NoGradientError",
    "ProviderAPIError",
    "ProviderValueError",
    "Runtime",
    "RuntimeClosedError",
    "XCSCancelledError",
    "XCSError",
    "XCSExecutionError",
    "XCSTimeoutError",
    "budget",
    "current_runtime",
    "explain",
    "extend",
    "get_jit_stats",
    "grad",
    "host_op",
    "jit",
    "models",
    "optim",
    "patterns",
    "profiler",
    "reset_usage",
    "runtime",
    "text",
    "usage",
]
