"""Features from model calls: option log-probabilities and embeddings of texts.

A `Source` is a fixed set of model calls per text whose numbers become a
block of features:

- `'score'`: the log-probability of each answer option as the model's whole
  reply to the text under one instruction (1 call per text);
- `'embed'`: the embedding of the text inside a template (1 call per text);
- `'contrast'`: a label-contrast embedding (K calls per text, one per label):
  the raw embeddings of the text followed by a statement of each label
  ("This text is positive."), centred over the labels. An embedding is the
  mean of the token states, and under causal attention the text's own
  tokens have the same states whatever follows, so the differences keep only
  the states of the tokens that read each label after the text: how the
  model takes each label given this text. (SmolLM2-135M on SST-2: the best
  single source, 0.81 with a linear head from 200 sentences, against 0.75
  for the text's embedding.)

`compute_features` makes the calls through the library's primitives, a
batch of texts per host call under `xcs_jax.jit` (one concurrent batched
call per batch), each text once: the recipe computes features once and then
trains many heads on them.
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
KINDS = ("score", "embed", "contrast")
_NAMES = {"score": "log-probs", "embed": "embedding", "contrast": "label-contrast embedding"}


@dataclasses.dataclass(frozen=True)
class Source:
  """Model calls per text that give a block of features.

  Attributes:
    kind: `'score'`, `'embed'` or `'contrast'` (see the module docstring).
    template: the prompt, `{text}` where the text goes; a `'contrast'`
      template also has `{label}`.
    options: the answer options of a `'score'` source; the label words of a
      `'contrast'` source; empty for `'embed'`.
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
    if (self.kind == "embed") == bool(self.options):
      raise ValueError(f"a {self.kind!r} source "
                       + ("takes no `options`." if self.kind == "embed" else "needs `options`."))
    if self.kind == "contrast" and (prompts.LABEL_SLOT not in self.template
                                    or len(self.options) < 2):
      raise ValueError("a 'contrast' source needs a template with "
                       f"{prompts.LABEL_SLOT!r} and at least 2 label words.")

  @property
  def name(self) -> str:
    return _NAMES[self.kind]

  @property
  def calls_per_text(self) -> int:
    return len(self.options) if self.kind == "contrast" else 1

  def to_json(self) -> dict:
    return {"kind": self.kind, "template": self.template, "options": list(self.options)}

  @classmethod
  def from_json(cls, d: dict) -> "Source":
    return cls(d["kind"], d["template"], tuple(d["options"]))


def encode_prompts(texts: Sequence) -> np.ndarray:
  """uint8 `[*shape, max_len]` from a (nested) list of strings, max_len the
  longest rounded up to 64 bytes (few shapes, few compiles)."""
  flat = np.asarray(texts, dtype=object).reshape(-1)
  longest = max(len(t.encode("utf-8")) for t in flat)
  return text_lib.encode(texts, -(-longest // 64) * 64)


def _call_fn(binding, source: Source):
  if source.kind == "score":
    return xcs_jit(lambda p: binding.score_options(p, source.options))
  # Contrast embeddings are differenced before normalizing: raw vectors.
  return xcs_jit(lambda p: binding.embed(p, normalize=source.kind == "embed"))


def call_batched(call: Callable[[np.ndarray], Any], texts: Sequence, *,
                 batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True,
                 desc: str = "calls") -> list:
  """`call` on `texts` (encoded) a batch of rows at a time; returns the
  per-batch results as numpy arrays. A row may hold several prompts (a list);
  the bar counts calls."""
  encoded = encode_prompts(texts)
  per_row = int(np.prod(encoded.shape[1:-1], dtype=np.int64))
  out = []
  with tqdm(total=len(texts) * per_row, desc=desc, unit="call", disable=not progress,
            file=sys.stderr, dynamic_ncols=True, leave=False) as bar:
    for start in range(0, len(texts), batch_size):
      batch = encoded[start:start + batch_size]
      out.append(np.asarray(call(batch)))
      bar.update(len(batch) * per_row)
  return out


def contrast_features(raw: np.ndarray) -> np.ndarray:
  """`[N, K, D]` raw embeddings -> `[N, (K - 1) * D]`: centred over the K
  labels, scaled to unit norm per text, the last label dropped (the centred
  rows sum to zero, so it adds nothing)."""
  centred = raw - raw.mean(axis=1, keepdims=True)
  norm = np.linalg.norm(centred.reshape(len(raw), -1), axis=1)
  centred = centred / np.maximum(norm, 1e-12)[:, None, None]
  return centred[:, :-1].reshape(len(raw), -1)


def compute_features(binding, source: Source, texts: Sequence[str], *,
                     batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True,
                     desc: str = "features") -> np.ndarray:
  """`source.calls_per_text` calls per text: float32 `[len(texts), width]`.

  Args:
    binding: a `ModelBinding` that can score options and embed.
    source: what to call.
    texts: the texts (each is put into `source.template`).
    batch_size: texts per batched host call (their items run concurrently on
      the provider's pool, so a batch should hold at least a few times its
      concurrency).
    progress: a tqdm bar on stderr, one step per call.
    desc: the bar's label.
  """
  if source.kind == "contrast":
    prompts_ = [[prompts.fill(source.template, t, label) for label in source.options]
                for t in texts]
  else:
    prompts_ = [prompts.fill(source.template, t) for t in texts]
  out = np.concatenate(call_batched(_call_fn(binding, source), prompts_,
                                    batch_size=batch_size, progress=progress, desc=desc))
  if source.kind == "contrast":
    out = contrast_features(out.astype(np.float64))
  return out.astype(np.float32)
