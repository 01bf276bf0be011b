"""Text as fixed-capacity UTF-8 uint8 arrays: `xcs_jax.text.encode` / `decode`."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xcs_jax import text

SAMPLES = [
    "",
    "a",
    "hello, world",
    "héllo wörld ñ",
    "日本語のテキスト",
    "中文字符和标点。",
    "한국어 문장",
    "emoji 😀🎉👩‍👩‍👧‍👦 flags 🇫🇷🇯🇵",
    "math ∑∫√∞ ≤ ≥",
    "tab\tnew\nline\r",
    "combining e\u0301 a\u0308",
    "rtl עברית العربية",
    "\U0010FFFF max code point",
]


def _random_strings(n: int, seed: int = 0) -> list[str]:
  """Random strings over the whole Unicode range (no NUL, no surrogates)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    points = []
    for _ in range(rng.integers(0, 24)):
      block = rng.integers(0, 4)
      hi = (0x80, 0x800, 0x10000, 0x110000)[block]
      c = int(rng.integers(1, hi))
      if 0xD800 <= c <= 0xDFFF:  # surrogates are not encodable
        c = 0x41
      points.append(chr(c))
    out.append("".join(points))
  return out


@pytest.mark.parametrize("s", SAMPLES + _random_strings(50))
def test_round_trip_1d(s):
  arr = text.encode(s, 128)
  assert arr.dtype == np.uint8 and arr.shape == (128,)
  assert text.decode(arr) == s


def test_layout_is_utf8_zero_padded():
  arr = text.encode("é!", 6)
  np.testing.assert_array_equal(arr, [0xC3, 0xA9, ord("!"), 0, 0, 0])


def test_exact_fit():
  s = "日本"  # 6 bytes
  assert text.decode(text.encode(s, 6)) == s


def test_round_trip_2d_and_3d():
  flat = (SAMPLES * 2)[:24]
  two = [flat[:6], flat[6:12], flat[12:18], flat[18:24]]
  arr2 = text.encode(flat, 64)
  assert arr2.shape == (24, 64)
  assert text.decode(arr2) == flat
  arr3 = text.encode([two[:2], two[2:]], 64)
  assert arr3.shape == (2, 2, 6, 64)
  assert text.decode(arr3) == [two[:2], two[2:]]
  arr_np = text.encode(np.array(flat, dtype=object).reshape(4, 6), 64)
  assert text.decode(arr_np) == two


def test_decode_accepts_jax_arrays_and_jit_outputs():
  arr = jnp.asarray(text.encode(["ab", "ç"], 8))
  assert text.decode(arr) == ["ab", "ç"]
  assert text.decode(jax.jit(lambda x: x[::-1])(arr)) == ["ç", "ab"]


def test_empty_batch():
  arr = text.encode([], 8)
  assert arr.shape == (0, 8)
  assert text.decode(arr) == []


def test_overlong_raises_naming_lengths():
  s = "日本語"  # 9 UTF-8 bytes, 3 characters
  with pytest.raises(ValueError) as e:
    text.encode(s, 8)
  msg = str(e.value)
  assert "9 UTF-8 bytes" in msg and "`max_len` is 8" in msg and "truncate=True" in msg


def test_overlong_in_a_batch_raises():
  with pytest.raises(ValueError, match="5 UTF-8 bytes"):
    text.encode(["ok", "hello"], 4)


@pytest.mark.parametrize("max_len", range(1, 14))
def test_truncate_cuts_at_a_character_boundary(max_len):
  s = "aé日😀b"  # 1 + 2 + 3 + 4 + 1 = 11 bytes
  arr = text.encode(s, max_len, truncate=True)
  out = text.decode(arr)
  assert "\ufffd" not in out
  assert s.startswith(out)
  size = len(out.encode())
  assert size <= max_len
  # The longest prefix that fits: the next character would not.
  if out != s:
    assert size + len(s[len(out)].encode()) > max_len


def test_truncate_random_strings():
  for s in _random_strings(40, seed=1):
    for max_len in (1, 3, 7):
      out = text.decode(text.encode(s, max_len, truncate=True))
      assert s.startswith(out) and len(out.encode()) <= max_len


def test_invalid_utf8_decodes_to_replacement_characters():
  assert text.decode(np.array([0xFF, 0x41, 0, 0], np.uint8)) == "\ufffdA"
  # A truncated multi-byte character (lead byte of 日 then stop).
  assert text.decode(np.array([0x41, 0xE6, 0x97, 0], np.uint8)) == "A\ufffd"
  # Lone continuation bytes, overlong encodings: never an exception.
  rng = np.random.default_rng(0)
  junk = rng.integers(1, 256, size=(200, 16), dtype=np.uint8)
  decoded = text.decode(junk)
  assert len(decoded) == 200 and all(isinstance(d, str) for d in decoded)


def test_text_ends_at_first_zero_byte():
  assert text.decode(np.array([0x41, 0, 0x42, 0], np.uint8)) == "A"


def test_nul_in_text_is_rejected():
  with pytest.raises(ValueError, match="NUL"):
    text.encode("a\x00b", 8)


@pytest.mark.parametrize("bad", [np.zeros(4, np.float32), np.zeros(4, np.int32),
                                 jnp.zeros(4, jnp.int8)])
def test_decode_wrong_dtype_raises_type_error(bad):
  with pytest.raises(TypeError, match="uint8"):
    text.decode(bad)


def test_decode_scalar_raises_type_error():
  with pytest.raises(TypeError, match="byte axis"):
    text.decode(np.uint8(65))


@pytest.mark.parametrize("bad", [1, [b"bytes"], ["ok", 3], [None]])
def test_encode_non_strings_raise_type_error(bad):
  with pytest.raises(TypeError, match="must be a str"):
    text.encode(bad, 8)


@pytest.mark.parametrize("max_len, kind", [
    (0, ValueError), (-1, ValueError), (2.5, TypeError), (True, TypeError),
    ("8", TypeError)])
def test_encode_bad_max_len(max_len, kind):
  with pytest.raises(kind, match="max_len"):
    text.encode("a", max_len)


def test_ragged_nesting_is_rejected():
  with pytest.raises(ValueError, match="rectangular"):
    text.encode([["a", "b"], ["c"]], 8)
