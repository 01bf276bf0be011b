"""Strings as fixed-capacity UTF-8 byte arrays (uint8, zero padded).

Text then travels through JAX like any other array: through `jit`, `vmap`,
`pmap` and into host calls. A row holds the UTF-8 bytes of one string followed
by zeros; the string ends at the first zero byte (so text cannot contain NUL).
"""
from __future__ import annotations

from typing import Any, Sequence, Union

import numpy as np

from xcs_jax._src import checks

TextLike = Union[str, Sequence["TextLike"]]


def _utf8_prefix(data: bytes, max_len: int) -> bytes:
  """The longest prefix of `data` of at most `max_len` bytes that ends on a
  UTF-8 character boundary."""
  cut = max_len
  # Continuation bytes look like 0b10xxxxxx: back up to a lead byte.
  while cut > 0 and cut < len(data) and (data[cut] & 0xC0) == 0x80:
    cut -= 1
  return data[:cut]


def encode_one(s: str, max_len: int, *, truncate: bool = False,
               what: str = "text") -> np.ndarray:
  """One string as a zero-padded row of `max_len` bytes (read-only)."""
  if not isinstance(s, str):
    checks.fail(TypeError, what, "a str", s)
  data = checks.check_utf8(s, what)
  if b"\x00" in data:
    raise ValueError(
        f"`{what}` contains a NUL character, which ends text in a byte array; "
        "remove it before encoding.")
  if len(data) > max_len:
    if not truncate:
      raise ValueError(
          f"`{what}` is {len(data)} UTF-8 bytes but `max_len` is {max_len}: "
          f"raise `max_len` to at least {len(data)}, or pass `truncate=True` to "
          "cut it at a character boundary.")
    data = _utf8_prefix(data, max_len)
  return np.frombuffer(data.ljust(max_len, b"\x00"), np.uint8)


def _shape_of(texts: Any) -> tuple[int, ...]:
  if isinstance(texts, str):
    return ()
  if isinstance(texts, np.ndarray) and texts.dtype.kind in "UO":
    return texts.shape
  if (isinstance(texts, (bytes, bytearray, dict, set, frozenset))
      or not hasattr(texts, "__iter__")
      or hasattr(texts, "dtype")):  # an array of numbers is not text
    checks.fail(TypeError, "xcs_jax.text.encode(s, ...)",
                "a str or a (nested) list or tuple of str", texts,
                "Pass strings, e.g. `encode([\"a\", \"b\"], max_len=8)`; to read a uint8 "
                "text array back, use `xcs_jax.text.decode`.")
  texts = list(texts)
  if not texts:
    return (0,)
  inner = {_shape_of(t) for t in texts}
  if len(inner) != 1:
    raise ValueError("`s` must be a string or a rectangular nested sequence of "
                     "strings; got rows of different lengths.")
  return (len(texts),) + inner.pop()


def encode(s: TextLike, max_len: int, *, truncate: bool = False) -> np.ndarray:
  """Encodes text as a zero-padded UTF-8 uint8 array.

  Args:
    s: a string, or a (nested, rectangular) sequence of strings.
    max_len: capacity in bytes of each string's row.
    truncate: cut overlong text at a UTF-8 character boundary instead of
      raising.

  Returns:
    A numpy uint8 array of shape ``(*batch_shape, max_len)``; pass it to
    `jnp.asarray` or straight into jitted code.

  Raises:
    ValueError: text longer than `max_len` bytes (without `truncate`), text
      holding NUL, or text that is not valid Unicode (a lone surrogate).
    TypeError: `s` holds something that is not a string.

  Examples:
    >>> decode(encode("héllo", 8))
    'héllo'
  """
  max_len = checks.check_int(max_len, "xcs_jax.text.encode(s, max_len=...)", min_value=1,
                             max_value=checks.MAX_TEXT_BYTES)
  truncate = checks.check_bool(truncate, "xcs_jax.text.encode(..., truncate=...)")
  shape = _shape_of(s)
  flat = [s] if isinstance(s, str) else list(np.asarray(s, dtype=object).reshape(-1))
  names = ["s"] if isinstance(s, str) else [f"s{list(i)}" for i in np.ndindex(shape)]
  rows = [encode_one(t, max_len, truncate=truncate, what=name)
          for t, name in zip(flat, names)]
  if not rows:
    return np.zeros(shape + (max_len,), np.uint8)
  return np.stack(rows).reshape(shape + (max_len,))


def decode_one(row: np.ndarray) -> str:
  """The string in one row (up to its first NUL; invalid UTF-8 replaced)."""
  data = np.asarray(row, np.uint8).tobytes()
  return data.split(b"\x00", 1)[0].decode("utf-8", errors="replace")


def decode(arr: Any) -> Any:
  """Decodes a uint8 text array.

  Returns a `str` for a 1-D array, a `list[str]` for 2-D, nested lists beyond.
  Invalid UTF-8 becomes U+FFFD replacement characters, never an error.
  """
  if isinstance(arr, str) or not checks.is_array_like(arr):
    checks.fail(TypeError, "xcs_jax.text.decode(arr)", "a uint8 text array", arr,
                "Make text arrays with `xcs_jax.text.encode`.")
  a = np.asarray(arr)
  if a.dtype != np.uint8 or a.ndim == 0:
    checks.fail(TypeError, "xcs_jax.text.decode(arr)",
                "a uint8 text array with a byte axis (shape [..., max_len])", a,
                "Make text arrays with `xcs_jax.text.encode`.")
  if a.ndim == 1:
    return decode_one(a)
  return [decode(x) for x in a]


def check_text_array(x: Any, what: str) -> None:
  """Raises TypeError unless `x` (an array or abstract value) is uint8 with rank >= 1."""
  dtype, shape = getattr(x, "dtype", None), getattr(x, "shape", None)
  if not (dtype is not None and shape is not None and len(shape) >= 1
          and checks.is_numpy_dtype(dtype) and np.dtype(dtype) == np.uint8):
    checks.fail(TypeError, what, "a uint8 text array of shape [..., max_len]", x,
                "Encode strings with `xcs_jax.text.encode(s, max_len)`.")
