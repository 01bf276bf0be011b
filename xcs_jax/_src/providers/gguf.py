"""Reading scalar metadata from a GGUF file's header, without llama.cpp.

The local provider needs a model's architecture and embedding width before
(or without) loading it: `embedding_dim` is asked at trace time, and the
embedding instances are loaded with an architecture-specific pooling
override. Loading the model through llama.cpp for that would be slower and
noisy, so the header is read here (the format:
https://github.com/ggml-org/ggml/blob/master/docs/gguf.md).
"""
from __future__ import annotations

import functools
import struct
from typing import Any, BinaryIO

_MAGIC = b"GGUF"
# Value types of the GGUF key-value section: struct format of each fixed-size
# type; 8 is a string, 9 an array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f",
            7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def _read(f: BinaryIO, fmt: str):
  size = struct.calcsize(fmt)
  data = f.read(size)
  if len(data) != size:
    raise ValueError("truncated GGUF header")
  return struct.unpack(fmt, data)[0]


def _read_string(f: BinaryIO) -> str:
  n = _read(f, "<Q")
  return f.read(n).decode("utf-8", errors="replace")


def _read_value(f: BinaryIO, vtype: int) -> Any:
  if vtype in _SCALARS:
    return _read(f, _SCALARS[vtype])
  if vtype == _STRING:
    return _read_string(f)
  if vtype == _ARRAY:
    etype, count = _read(f, "<I"), _read(f, "<Q")
    if etype in _SCALARS:             # skipped: only scalars are kept
      f.seek(count * struct.calcsize(_SCALARS[etype]), 1)
    else:
      for _ in range(count):
        _read_value(f, etype)
    return None
  raise ValueError(f"unknown GGUF value type {vtype}")


@functools.lru_cache(maxsize=32)
def read_metadata(path: str) -> dict[str, Any]:
  """The scalar key-value metadata of the GGUF file at `path` (arrays dropped).

  Raises:
    ValueError: `path` is not a GGUF file.
  """
  with open(path, "rb") as f:
    if f.read(4) != _MAGIC:
      raise ValueError(f"{path!r} is not a GGUF file (no GGUF magic number).")
    version = _read(f, "<I")
    if version < 2:
      raise ValueError(f"{path!r} is GGUF version {version}; llama.cpp needs >= 2.")
    _read(f, "<Q")                    # tensor count
    meta = {}
    for _ in range(_read(f, "<Q")):
      key = _read_string(f)
      value = _read_value(f, _read(f, "<I"))
      if value is not None:
        meta[key] = value
  return meta


def architecture(path: str) -> str:
  return str(read_metadata(path)["general.architecture"])


def embedding_length(path: str) -> int:
  """The model's hidden width (`n_embd`): the size of its embeddings."""
  meta = read_metadata(path)
  return int(meta[f"{meta['general.architecture']}.embedding_length"])


def has_chat_template(path: str) -> bool:
  return "tokenizer.chat_template" in read_metadata(path)
