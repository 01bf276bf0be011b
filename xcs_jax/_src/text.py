"""Strings as fixed-capacity UTF-8 byte arrays (uint8, zero padded).

Text then travels through JAX like any other array: through `jit`, `vmap`,
`pmap` and into host calls. A row holds the UTF-8 bytes of one string followed
by zeros; the string ends at the first zero byte (so text cannot contain NUL).
"""
from __future__ import annotations

from typing import Any, Sequence, Union

import numpy as np

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
  if not isinstance(s, str):
    raise TypeError(f"`{what}` must be a str; got {type(s).__name__}.")
  data = s.encode("utf-8")
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
  out = np.zeros((max_len,), np.uint8)
  out[:len(data)] = np.frombuffer(data, np.uint8)
  return out


def _shape_of(texts: Any) -> tuple[int, ...]:
  if isinstance(texts, str):
    return ()
  if isinstance(texts, np.ndarray) and texts.dtype.kind in "UO":
    return texts.shape
  if isinstance(texts, (bytes, bytearray)) or not hasattr(texts, "__iter__"):
    raise TypeError(f"`s` must be a str or a (nested) sequence of str; found a "
                    f"{type(texts).__name__}.")
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
    ValueError: text longer than `max_len` bytes (without `truncate`).
    TypeError: `s` holds something that is not a string.

  Examples:
    >>> decode(encode("héllo", 8))
    'héllo'
  """
  if not isinstance(max_len, (int, np.integer)) or isinstance(max_len, bool) or max_len <= 0:
    raise ValueError(f"`max_len` must be a positive int; got {max_len!r}.")
  shape = _shape_of(s)
  flat = [s] if isinstance(s, str) else list(np.asarray(s, dtype=object).reshape(-1))
  rows = [encode_one(t, int(max_len), truncate=truncate, what="s") for t in flat]
  if not rows:
    return np.zeros(shape + (int(max_len),), np.uint8)
  return np.stack(rows).reshape(shape + (int(max_len),))


def decode_one(row: np.ndarray) -> str:
  data = bytes(np.asarray(row, np.uint8))
  end = data.find(b"\x00")
  if end >= 0:
    data = data[:end]
  return data.decode("utf-8", errors="replace")


def decode(arr: Any) -> Any:
  """Decodes a uint8 text array.

  Returns a `str` for a 1-D array, a `list[str]` for 2-D, nested lists beyond.
  Invalid UTF-8 becomes U+FFFD replacement characters, never an error.
  """
  a = np.asarray(arr)
  if a.dtype != np.uint8:
    raise TypeError(f"`arr` must be a uint8 text array; got dtype {a.dtype}. "
                    "Make text arrays with `xcs_jax.text.encode`.")
  if a.ndim == 0:
    raise TypeError("`arr` must have at least 1 dimension (the byte axis); got a scalar.")
  if a.ndim == 1:
    return decode_one(a)
  return [decode(x) for x in a]


def check_text_array(x: Any, what: str) -> None:
  """Raises TypeError unless `x` (an array or abstract value) is uint8 with rank >= 1."""
  dtype = getattr(x, "dtype", None)
  shape = getattr(x, "shape", None)
  if dtype is None or np.dtype(dtype) != np.uint8 or shape is None or len(shape) < 1:
    got = f"dtype {dtype}, shape {shape}" if dtype is not None else type(x).__name__
    raise TypeError(
        f"`{what}` must be a uint8 text array of shape [..., max_len]; got {got}. "
        "Encode strings with `xcs_jax.text.encode(s, max_len)`.")
