"""Argument checks shared by every public entry point.

A bad argument raises the builtin `TypeError` (a value of the wrong kind) or
`ValueError` (the right kind, a wrong value), as JAX does, when the call is
made, never later inside a run. Every message has one shape: the argument in
backticks as the user wrote the call, what it must be, what was given, and
the fix where there is one:

    `bind('fake:echo', timeout_s=...)` must be a number of seconds in
    (0, 1e+09] or None; got inf (float). Pass None for no timeout.

`what` is that call form (`"bind('fake:echo', timeout_s=...)"`); each check
returns the value normalized (a Python int, float, bool or str).
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Sequence

import jax.numpy as jnp
import numpy as np

MAX_SECONDS = 1e9  # messages write it as "1e9"
"""The longest timeout, latency or grace period accepted (about 31 years).
Longer waits overflow the operating system's timed waits
(`threading.TIMEOUT_MAX`) and would fail at call time; None means no limit."""

MAX_TEXT_BYTES = 2**24
"""The largest capacity of one text row (`max_len`, `output_bytes`): 16 MiB,
more than any model's context holds. Larger rows would only exhaust memory
(numpy allocates them lazily, so a typo like 2**40 would be killed by the
operating system, not refused)."""

MAX_SAMPLES = 2**20
"""The most samples one call asks for (ensemble members, SPSA directions,
REINFORCE samples): each is at least one model or host evaluation, and a
typo like 2**31 would exhaust memory before anything ran."""

MAX_EMBEDDING_DIM = 2**20
"""The widest embedding a binding may declare (real ones are a few thousand)."""

SEED_MAX = 2**31 - 1
"""Seeds are 31-bit, like those derived from PRNG keys (providers read 2**32 - 1
as "random")."""

_NO_TIMEOUT_FIX = "Pass None for no timeout."


def describe(value: Any) -> str:
  """`value` as messages show it: a short repr and its type."""
  if isinstance(value, np.generic):
    return f"{value!r} (a {value.dtype} scalar)"
  if hasattr(value, "shape") and hasattr(value, "dtype"):
    return f"an array of dtype {value.dtype} and shape {tuple(value.shape)}"
  text = repr(value)
  if len(text) > 80:
    text = text[:77] + "..."
  return f"{text} ({type(value).__name__})"


def fail(kind: type[Exception], what: str, expected: str, value: Any,
         fix: str = "") -> None:
  """Raises `kind` with the message every check uses."""
  raise kind(f"`{what}` must be {expected}; got {describe(value)}."
             + (f" {fix}" if fix else ""))


def is_int(value: Any) -> bool:
  """A Python or numpy integer, not a bool."""
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value: Any) -> bool:
  """A Python or numpy int or float, not a bool."""
  return is_int(value) or isinstance(value, (float, np.floating))


def _range_text(kind: str, low: Any, high: Any, low_open: bool = False,
                high_open: bool = False) -> str:
  if low is None and high is None:
    return kind
  if high is None:
    if kind == "an int" and low == 1:
      return "a positive int"
    return f"{kind} {'>' if low_open else '>='} {low}"
  if low is None:
    return f"{kind} {'<' if high_open else '<='} {high}"
  return f"{kind} in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def check_int(value: Any, what: str, *, min_value: int | None = None,
              max_value: int | None = None, none_ok: bool = False,
              fix: str = "") -> int | None:
  """An int in [min_value, max_value] (or None where `none_ok`)."""
  if value is None and none_ok:
    return None
  expected = _range_text("an int", min_value, max_value) + (" or None" if none_ok else "")
  if not is_int(value):
    fail(TypeError, what, expected, value, fix)
  if (min_value is not None and value < min_value) or (
      max_value is not None and value > max_value):
    fail(ValueError, what, expected, value, fix)
  return int(value)


def check_number(value: Any, what: str, *, min_value: float | None = None,
                 max_value: float | None = None, min_open: bool = False,
                 max_open: bool = False, none_ok: bool = False,
                 fix: str = "") -> float | None:
  """A finite real number in its range (`min_open` / `max_open`: the bound
  itself excluded)."""
  if value is None and none_ok:
    return None
  expected = (_range_text("a finite number", min_value, max_value, min_open, max_open)
              + (" or None" if none_ok else ""))
  if not is_real(value):
    fail(TypeError, what, expected, value, fix)
  number = float(value)
  too_low = min_value is not None and (number <= min_value if min_open
                                       else number < min_value)
  too_high = max_value is not None and (number >= max_value if max_open
                                        else number > max_value)
  if not math.isfinite(number) or too_low or too_high:
    fail(ValueError, what, expected, value, fix)
  return number


def check_seconds(value: Any, what: str, *, none_ok: bool = True,
                  zero_ok: bool = False) -> float | None:
  """A duration: a number of seconds in (0, MAX_SECONDS] ([0, ...] with
  `zero_ok`), or None (no limit) where `none_ok`."""
  if value is None and none_ok:
    return None
  expected = (f"a number of seconds in {'[' if zero_ok else '('}0, 1e9]"
              + (" or None" if none_ok else ""))
  fix = _NO_TIMEOUT_FIX if none_ok else ""
  if not is_real(value):
    fail(TypeError, what, expected, value, fix)
  number = float(value)
  if not (math.isfinite(number) and (number >= 0 if zero_ok else number > 0)
          and number <= MAX_SECONDS):
    fail(ValueError, what, expected, value, fix)
  return number


def check_retries_end(retries: int | None, deadline_s: float | None, where: str) -> None:
  """Retries that end: `retries=None` (retry until the deadline) needs a deadline."""
  if retries is None and deadline_s is None:
    raise ValueError(
        f"`{where}`: `retries=None` retries transient errors (timeouts too) until "
        "`deadline_s`, and `deadline_s=None` sets no deadline, so a failing call would "
        "retry forever. Pass a number of retries (e.g. `retries=3`) or a deadline "
        "(e.g. `deadline_s=600`).")


def check_bool(value: Any, what: str) -> bool:
  """True or False (a numpy bool too); never a truthy stand-in."""
  if not isinstance(value, (bool, np.bool_)):
    fail(TypeError, what, "True or False", value)
  return bool(value)


def check_one_of(value: Any, what: str, choices: Sequence[Any]) -> Any:
  """One of `choices` (compared by type and value)."""
  if not any(type(value) is type(c) and value == c for c in choices):
    fail(ValueError, what, f"one of {', '.join(map(repr, choices))}", value)
  return value


def check_str(value: Any, what: str, *, none_ok: bool = False, empty_ok: bool = True,
              nul_ok: bool = True) -> str | None:
  """A str of valid Unicode (encodable as UTF-8: no lone surrogates)."""
  if value is None and none_ok:
    return None
  expected = "a str" + (" or None" if none_ok else "")
  if not isinstance(value, str):
    fail(TypeError, what, expected, value)
  if not empty_ok and not value:
    fail(ValueError, what, "a non-empty str", value)
  if not nul_ok and "\x00" in value:
    fail(ValueError, what, "a str without NUL characters ('\\x00')", value,
         "Remove them: text arrays end a string at the first zero byte.")
  check_utf8(value, what)
  return value


def check_utf8(value: str, what: str) -> bytes:
  """`value` encoded as UTF-8, or a ValueError naming the first character that
  cannot be (a lone surrogate such as '\\ud800', e.g. from a broken decode)."""
  try:
    return value.encode("utf-8")
  except UnicodeEncodeError as e:
    raise ValueError(
        f"`{what}` must be valid Unicode text (encodable as UTF-8); got "
        f"{describe(value)}, whose character {e.start} ({value[e.start]!r}) is a lone "
        "surrogate. Remove it, or replace invalid characters with "
        "`s.encode('utf-8', 'replace').decode('utf-8')`.") from None


def item_of(what: str, index: int) -> str:
  """The call form naming item `index` of argument `what`:
  `f(x=...)` -> `f(x[0]=...)`, `options` -> `options[0]`."""
  if what.endswith("=...)"):
    return f"{what[:-len('=...)')]}[{index}]=...)"
  return f"{what}[{index}]"


def check_str_tuple(value: Any, what: str, *, example: str, distinct: bool = False,
                    fix_kind: str = "") -> tuple[str, ...]:
  """A non-empty tuple of non-empty, valid str without NUL (static data such
  as the options of `score_options`); `example` shows the right form."""
  if not isinstance(value, tuple):
    fail(TypeError, what, "a tuple of str" + fix_kind, value, f"Write `{example}`.")
  if not value:
    fail(ValueError, what, "a tuple of at least one str", value, f"Write `{example}`.")
  for i, item in enumerate(value):
    check_str(item, item_of(what, i), empty_ok=False, nul_ok=False)
  if distinct:
    seen = set()
    for item in value:
      if item in seen:
        raise ValueError(f"`{what}` must hold distinct strings; {item!r} appears more "
                         f"than once in {describe(value)}.")
      seen.add(item)
  return value


def check_number_tuple(value: Any, what: str) -> tuple[float, ...]:
  """A tuple of finite real numbers (possibly empty)."""
  if not isinstance(value, tuple):
    fail(TypeError, what, "a tuple of finite numbers", value)
  for i, item in enumerate(value):
    check_number(item, item_of(what, i))
  return value


def check_callable(value: Any, what: str, expected: str = "a callable",
                   *, none_ok: bool = False) -> Callable | None:
  if value is None and none_ok:
    return None
  if not callable(value):
    fail(TypeError, what, expected + (" or None" if none_ok else ""), value)
  return value


def check_seed(value: Any, what: str) -> int:
  """A 31-bit seed: an int in [0, 2**31 - 1]."""
  return check_int(value, what, min_value=0, max_value=SEED_MAX)


def is_array_like(value: Any) -> bool:
  """What JAX takes as an array: arrays, numpy scalars, Python numbers."""
  return (hasattr(value, "__jax_array__")
          or isinstance(value, (bool, int, float, complex, np.generic))
          or (hasattr(value, "shape") and hasattr(value, "dtype")))


def check_array(value: Any, what: str) -> Any:
  """An array JAX can hold (not a str, None or an object array)."""
  if not is_array_like(value):
    fail(TypeError, what, "an array (a jax.Array, a numpy array or a Python number)",
         value, "Encode text with `xcs_jax.text.encode(s, max_len)`."
         if isinstance(value, (str, bytes)) else "")
  dtype = getattr(value, "dtype", None)
  if dtype is not None and is_numpy_dtype(dtype) and np.dtype(dtype).kind in "OUSV":
    fail(TypeError, what, "an array of numbers (JAX holds no strings or objects)", value,
         "Encode text with `xcs_jax.text.encode(s, max_len)`.")
  return value


def as_jax_array(value: Any, what: str) -> Any:
  """`value` (checked by `check_array`) as a JAX array; a Python int too large
  for JAX's integer type is a ValueError naming it, not an OverflowError."""
  try:
    return jnp.asarray(check_array(value, what))
  except OverflowError:
    fail(ValueError, what, "a value JAX's default integer type can hold", value,
         "Pass it as a float, or enable 64-bit types with "
         "`jax.config.update(\"jax_enable_x64\", True)`.")


def is_numpy_dtype(dtype: Any) -> bool:
  try:
    np.dtype(dtype)
  except TypeError:  # a JAX extended dtype (PRNG keys): JAX holds it
    return False
  return True


def check_prng_key(value: Any, what: str) -> Any:
  """A JAX PRNG key: typed (`jax.random.key(0)`) or raw uint32 data
  (`jax.random.PRNGKey(0)`), possibly a batch of them."""
  dtype = getattr(value, "dtype", None)
  shape = getattr(value, "shape", None)
  ok = dtype is not None and shape is not None and (
      not is_numpy_dtype(dtype) or (np.dtype(dtype) == np.uint32 and len(shape) >= 1))
  if not ok:
    fail(TypeError, what, "a JAX PRNG key", value,
         "Make one with `jax.random.key(0)` (or `jax.random.PRNGKey(0)`).")
  return value


def check_static_args(fun: Callable, argnums: Any, argnames: Any
                      ) -> tuple[tuple[int, ...], tuple[str, ...]]:
  """`static_argnums` / `static_argnames` as tuples, checked against `fun`'s
  signature as jax.jit checks them (a position or name `fun` cannot take is
  an error now, not a silently dynamic argument)."""
  nums = (argnums,) if is_int(argnums) else argnums
  names = (argnames,) if isinstance(argnames, str) else argnames
  if not isinstance(nums, (tuple, list)) or not all(is_int(i) for i in nums):
    fail(TypeError, "xcs_jax.jit(f, static_argnums=...)",
         "an int or a tuple of ints (argument positions)", argnums)
  if not isinstance(names, (tuple, list)) or not all(isinstance(n, str) for n in names):
    fail(TypeError, "xcs_jax.jit(f, static_argnames=...)",
         "a str or a tuple of str (argument names)", argnames)
  nums, names = tuple(int(i) for i in nums), tuple(names)
  try:
    params = list(inspect.signature(fun).parameters.values())
  except (TypeError, ValueError):  # no signature (some builtins): nothing to check
    return nums, names
  kinds = {p.kind for p in params}
  positional = [p.name for p in params if p.kind in (
      inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
  if inspect.Parameter.VAR_POSITIONAL not in kinds:
    bad = [i for i in nums if not -len(positional) <= i < len(positional)]
    if bad:
      fail(ValueError, "xcs_jax.jit(f, static_argnums=...)",
           f"positions of `f`'s {len(positional)} positional argument(s) "
           f"({', '.join(positional) or 'none'})", argnums,
           f"Position {bad[0]} does not exist.")
  if inspect.Parameter.VAR_KEYWORD not in kinds:
    keyword = [p.name for p in params if p.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    bad = [n for n in names if n not in keyword]
    if bad:
      fail(ValueError, "xcs_jax.jit(f, static_argnames=...)",
           f"names of `f`'s arguments ({', '.join(keyword) or 'none'})", argnames,
           f"`f` has no argument {bad[0]!r}.")
  return nums, names
