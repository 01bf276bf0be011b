"""Features from model calls: option log-probabilities and embeddings of texts.

A `Source` is one model call per text whose numbers become features: the
log-probability of each answer option under one instruction, or the
embedding of the text. `compute_features` makes the calls through the
library's primitives, a batch of texts per host call under `xcs_jax.jit`
(one concurrent batched call per batch), each text once: the recipe computes
features once and then trains many heads on them.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from xcs_jax._src import text as text_lib
from xcs_jax._src.jit.api import jit as xcs_jit
from xcs_jax._src.recipes import prompts

DEFAULT_BATCH_SIZE = 64
KINDS = ("score", "embed")


@dataclasses.dataclass(frozen=True)
class Source:
  """One model call per text, giving a block of features.

  Attributes:
    kind: `'score'` (log-probability of each option as the model's whole
      reply to the filled template) or `'embed'` (the text's embedding).
    template: the prompt, `{text}` where the text goes (`'{text}'` alone for
      an embedding of the bare text).
    options: the answer options of a `'score'` source (empty for `'embed'`).
  """
  kind: str
  template: str
  options: tuple[str, ...] = ()

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"`Source.kind` must be one of {KINDS}; got {self.kind!r}.")
    if prompts.TEXT_SLOT not in self.template:
      raise ValueError(f"`Source.template` must contain {prompts.TEXT_SLOT!r}; got "
                       f"{self.template!r}.")
    if (self.kind == "score") != bool(self.options):
      raise ValueError("a 'score' source needs `options`; an 'embed' source takes none.")

  @property
  def name(self) -> str:
    if self.kind == "embed":
      return "embedding" if self.template == prompts.TEXT_SLOT else "embedding of prompt"
    return "log-probs"

  def to_json(self) -> dict:
    return {"kind": self.kind, "template": self.template, "options": list(self.options)}

  @classmethod
  def from_json(cls, d: dict) -> "Source":
    return cls(d["kind"], d["template"], tuple(d["options"]))


def encode_prompts(texts: Sequence[str]) -> np.ndarray:
  """uint8 `[N, max_len]`, max_len the longest rounded up to 64 bytes (few shapes,
  few compiles)."""
  longest = max(len(t.encode("utf-8")) for t in texts)
  return text_lib.encode(list(texts), -(-longest // 64) * 64)


def _call_fn(binding, source: Source):
  if source.kind == "score":
    return xcs_jit(lambda p: binding.score_options(p, source.options))
  return xcs_jit(lambda p: binding.embed(p))


def call_batched(call: Callable[[np.ndarray], Any], texts: Sequence[str], *,
                 batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True,
                 desc: str = "calls") -> list:
  """`call` on `texts` (encoded) a batch at a time; one tqdm step per text.

  Returns the per-batch results as numpy arrays.
  """
  encoded = encode_prompts(texts)
  out = []
  with tqdm(total=len(texts), desc=desc, unit="call", disable=not progress,
            file=sys.stderr, dynamic_ncols=True, leave=False) as bar:
    for start in range(0, len(texts), batch_size):
      batch = encoded[start:start + batch_size]
      out.append(np.asarray(call(batch)))
      bar.update(len(batch))
  return out


def compute_features(binding, source: Source, texts: Sequence[str], *,
                     batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True,
                     desc: str = "features") -> np.ndarray:
  """One call per text: float32 `[len(texts), width]`.

  Args:
    binding: a `ModelBinding` that can score options and embed.
    source: what to call.
    texts: the texts (each is put into `source.template`).
    batch_size: texts per batched host call (their items run concurrently on
      the provider's pool, so a batch should hold at least a few times its
      concurrency).
    progress: a tqdm bar on stderr, one step per text.
    desc: the bar's label.
  """
  batches = call_batched(_call_fn(binding, source),
                         [prompts.fill(source.template, t) for t in texts],
                         batch_size=batch_size, progress=progress, desc=desc)
  return np.concatenate(batches).astype(np.float32)
