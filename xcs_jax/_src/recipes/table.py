"""Labelled text tables: a text column and a label column from a TSV or CSV file.

The first line is a header naming the columns. Files ending in `.csv` are
comma-separated; any other file is tab-separated. Labels are kept as the
strings in the file (any names, any number of classes); the label set and
the words the model reads for each label live in `LabelSet`.
"""
from __future__ import annotations

import csv
import dataclasses
import os
import re
from typing import Sequence


class TableError(ValueError):
  """A labelled table the recipe cannot use, with the fix in the message."""


@dataclasses.dataclass(frozen=True)
class Table:
  """One labelled file: its texts and their labels (as written in the file).

  Attributes:
    path: where it was read from (for messages).
    texts: the text column.
    labels: the label column, or None when the file was read without one.
  """
  path: str
  texts: tuple[str, ...]
  labels: tuple[str, ...] | None


def _delimiter(path: str) -> str:
  return "," if path.lower().endswith(".csv") else "\t"


def _column(header: Sequence[str], name: str | None, default: int, flag: str, path: str) -> int:
  if name is None:
    return default % len(header)
  if name in header:
    return header.index(name)
  raise TableError(f"`{flag}`: {path} has no column {name!r}; its columns are "
                   f"{', '.join(map(repr, header))}. Pass one of them.")


def read_table(path: str, *, text_column: str | None = None,
               label_column: str | None = None, require_labels: bool = True) -> Table:
  """Reads the text and label columns of a labelled file.

  Args:
    path: a `.tsv` (tab-separated; any other extension too) or `.csv` file
      whose first line names the columns.
    text_column: the text column's name (default: the first column).
    label_column: the label column's name (default: the last column).
    require_labels: with False a file without the label column is read with
      `labels=None` (a file to classify, not to score).

  Raises:
    TableError: a missing file or column, no rows, a row with the wrong
      number of fields, or an empty text or label.
  """
  if not os.path.isfile(path):
    raise TableError(f"{path!r} is not a file: give the path of a tab-separated "
                     "(or .csv) file with a header line.")
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.reader(f, delimiter=_delimiter(path)))
  rows = [r for r in rows if r]  # blank lines
  if not rows:
    raise TableError(f"{path} is empty: it needs a header line naming the columns "
                     "and at least one row.")
  header, body = [h.strip() for h in rows[0]], rows[1:]
  sep = "comma" if _delimiter(path) == "," else "tab"
  if len(header) < 2 and require_labels:
    raise TableError(
        f"{path} has one column ({header[0]!r}) in its header; it needs a text and a "
        f"label column, {sep}-separated (name the file .csv for commas, anything "
        "else for tabs).")
  if not body:
    raise TableError(f"{path} has a header but no rows: it needs at least one "
                     "labelled example.")
  text_at = _column(header, text_column, 0, "--text-column", path)
  label_at = None
  if require_labels or label_column is not None or len(header) > 1:
    try:
      label_at = _column(header, label_column, -1, "--label-column", path)
    except TableError:
      if require_labels or label_column is not None:
        raise
  if label_at == text_at:
    raise TableError(f"{path}: the text and label columns are both {header[text_at]!r}; "
                     "pass `--text-column` and `--label-column` naming two columns.")
  texts, labels = [], []
  for line, row in enumerate(body, start=2):
    if len(row) != len(header):
      raise TableError(f"{path}, line {line}: {len(row)} fields where the header has "
                       f"{len(header)} ({sep}-separated); fix the row (a {sep} inside "
                       "a text needs quoting).")
    text = row[text_at].strip()
    if not text:
      raise TableError(f"{path}, line {line}: the text ({header[text_at]!r}) is empty; "
                       "remove the row or fill it in.")
    texts.append(text)
    if label_at is not None:
      label = row[label_at].strip()
      if not label:
        raise TableError(f"{path}, line {line}: the label ({header[label_at]!r}) is "
                         "empty; every row needs its label.")
      labels.append(label)
  if require_labels and label_at is None:
    raise TableError(f"{path} has no label column.")
  return Table(path, tuple(texts), tuple(labels) if label_at is not None else None)


def _natural_key(label: str):
  """'2' before '10'; numbers before words."""
  return [(0, int(p), "") if p.isdigit() else (1, 0, p)
          for p in re.split(r"(\d+)", label) if p]


@dataclasses.dataclass(frozen=True)
class LabelSet:
  """The classes of a task: the labels as stored, and the word for each.

  Attributes:
    labels: the distinct labels of the training file, sorted (numbers in
      numeric order); class `k` is `labels[k]`.
    names: what the model reads for each label: the label itself, or the
      word `--label-names` gives it.
  """
  labels: tuple[str, ...]
  names: tuple[str, ...]

  @property
  def num_classes(self) -> int:
    return len(self.labels)

  def indices(self, labels: Sequence[str], path: str) -> list[int]:
    """Class indices of `labels`; a label the training file lacks is an error."""
    index = {label: k for k, label in enumerate(self.labels)}
    unknown = sorted({label for label in labels if label not in index}, key=_natural_key)
    if unknown:
      raise TableError(
          f"{path} has label(s) {', '.join(map(repr, unknown[:5]))}"
          f"{' ...' if len(unknown) > 5 else ''} that the training data lacks (it has "
          f"{', '.join(map(repr, self.labels))}). The classifier can only predict "
          "classes it was trained on: add examples of them to the training file, or "
          "remove those rows.")
    return [index[label] for label in labels]


def parse_label_names(spec: str | None) -> dict[str, str]:
  """`'0=negative,1=positive'` -> {'0': 'negative', '1': 'positive'}."""
  if spec is None or spec == "":
    return {}
  names = {}
  for part in spec.split(","):
    code, sep, name = part.partition("=")
    code, name = code.strip(), name.strip()
    if not sep or not code or not name:
      raise TableError(f"`--label-names` must look like `0=negative,1=positive` "
                       f"(label=word, comma-separated); got {spec!r} (bad part {part!r}).")
    if code in names:
      raise TableError(f"`--label-names` names label {code!r} twice in {spec!r}.")
    names[code] = name
  return names


def label_set(labels: Sequence[str], label_names: dict[str, str] | None, path: str) -> LabelSet:
  """The classes of a training file.

  Raises:
    TableError: fewer than two classes, a name for a label the file lacks,
      or two labels given the same name.
  """
  distinct = tuple(sorted(set(labels), key=_natural_key))
  if len(distinct) < 2:
    raise TableError(
        f"{path} has only one class ({', '.join(map(repr, distinct))}): a classifier "
        "needs labelled examples of at least two classes. Check `--label-column`.")
  label_names = dict(label_names or {})
  extra = sorted(set(label_names) - set(distinct), key=_natural_key)
  if extra:
    raise TableError(f"`--label-names` names label(s) {', '.join(map(repr, extra))}, which "
                     f"{path} lacks (its labels are {', '.join(map(repr, distinct))}).")
  names = tuple(label_names.get(label, label) for label in distinct)
  if len(set(n.lower() for n in names)) < len(names):
    raise TableError(f"two labels would be shown to the model as the same word: "
                     f"{dict(zip(distinct, names))}. Give each label its own word "
                     "with `--label-names`.")
  return LabelSet(distinct, names)
