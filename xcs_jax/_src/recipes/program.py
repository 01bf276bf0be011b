"""A learned classification program: the model calls it makes and its head.

A `Program` holds the feature sources (which instruction's option
log-probabilities, whether the embedding), which of each source's features
the head reads, and the head itself. It predicts by making one call per
source per text and applying the head; it saves to a folder (`program.json`
for what is text, `head.npz` for the arrays) and loads back.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import numpy as np

from xcs_jax._src.models import bind
from xcs_jax._src.optim import checkpoint
from xcs_jax._src.recipes import features as features_lib
from xcs_jax._src.recipes.features import Source
from xcs_jax._src.recipes.head import LinearHead, Standardizer
from xcs_jax._src.recipes.table import LabelSet

FORMAT_VERSION = 1
PROGRAM_FILE = "program.json"
HEAD_FILE = "head.npz"


@dataclasses.dataclass(frozen=True)
class Program:
  """A learned classifier over model-call features.

  Attributes:
    model: the binding spec whose calls give the features ("local:smollm2").
    labels: the classes, and the words the model reads for them.
    sources: the model calls per text, in the order their features are
      concatenated.
    columns: per source, the indices of its features the head reads.
    head: logits over the classes from the concatenated features.
    description: what the program is, in words (a row of the recipe's table).
  """
  model: str
  labels: LabelSet
  sources: tuple[Source, ...]
  columns: tuple[tuple[int, ...], ...]
  head: LinearHead
  description: str = ""

  def select(self, features: Sequence[np.ndarray]) -> np.ndarray:
    """The head's input from each source's full features `[N, width]`."""
    return np.concatenate([np.asarray(f)[:, list(c)] for f, c in zip(features, self.columns)],
                          axis=1)

  def logits(self, features: Sequence[np.ndarray]) -> np.ndarray:
    """Class logits `[N, K]` from each source's full features."""
    return np.asarray(self.head.logits(self.select(features)))

  def compute_features(self, texts: Sequence[str], *, binding=None, progress: bool = True,
                       batch_size: int = features_lib.DEFAULT_BATCH_SIZE) -> list[np.ndarray]:
    """Makes the program's calls: one per source per text."""
    binding = binding if binding is not None else bind(self.model)
    return [features_lib.compute_features(binding, s, texts, batch_size=batch_size,
                                          progress=progress,
                                          desc=f"source {i + 1}/{len(self.sources)}")
            for i, s in enumerate(self.sources)]

  def predict_indices(self, texts: Sequence[str], **kwargs) -> np.ndarray:
    """The class index of each text (see `compute_features` for `kwargs`)."""
    return self.logits(self.compute_features(texts, **kwargs)).argmax(-1)

  def predict(self, texts: Sequence[str], **kwargs) -> list[str]:
    """The label of each text, as written in the training data."""
    return [self.labels.labels[k] for k in self.predict_indices(texts, **kwargs)]

  @property
  def calls_per_text(self) -> int:
    """Model calls `predict` makes per text."""
    return sum(s.calls_per_text for s in self.sources)

  def save(self, folder: str | os.PathLike) -> None:
    """Writes `program.json` and `head.npz` into `folder` (made if missing)."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    meta = {"format": FORMAT_VERSION, "model": self.model,
            "labels": list(self.labels.labels), "label_names": list(self.labels.names),
            "sources": [s.to_json() for s in self.sources],
            "columns": [list(c) for c in self.columns], "description": self.description}
    checkpoint.save(os.path.join(folder, HEAD_FILE), {
        "mean": self.head.standardizer.mean, "scale": self.head.standardizer.scale,
        "w": self.head.w, "b": self.head.b})
    tmp = os.path.join(folder, PROGRAM_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(folder, PROGRAM_FILE))


def load(folder: str | os.PathLike) -> Program:
  """A `Program` saved by `Program.save`.

  Raises:
    FileNotFoundError: `folder` holds no saved program.
    ValueError: it was written by another format version, or is inconsistent.
  """
  folder = os.fspath(folder)
  path = os.path.join(folder, PROGRAM_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"`--load {folder}`: no {PROGRAM_FILE} there; give a folder "
                            "written by `--save` (or `Program.save`).")
  with open(path, encoding="utf-8") as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT_VERSION:
    raise ValueError(f"{path} has format {meta.get('format')!r}; this xcs_jax reads "
                     f"format {FORMAT_VERSION}: learn the program again with `--save`.")
  arrays = checkpoint.restore(os.path.join(folder, HEAD_FILE))
  head = LinearHead(Standardizer(*(np.asarray(arrays[k], np.float32) for k in ("mean", "scale"))),
                    np.asarray(arrays["w"], np.float32), np.asarray(arrays["b"], np.float32))
  program = Program(meta["model"], LabelSet(tuple(meta["labels"]), tuple(meta["label_names"])),
                    tuple(Source.from_json(s) for s in meta["sources"]),
                    tuple(tuple(c) for c in meta["columns"]), head, meta["description"])
  width = sum(len(c) for c in program.columns)
  if head.w.shape != (width, program.labels.num_classes):
    raise ValueError(f"{folder}: the head has shape {head.w.shape}, but the program's "
                     f"columns give {width} features for {program.labels.num_classes} "
                     "classes; the folder is inconsistent: learn it again.")
  return program
