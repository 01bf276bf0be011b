"""Candidate instructions and answer options, built from a task's label words.

Nothing here names a task: an instruction is a template with `{labels}` (the
label words, e.g. "negative or positive") and the text goes last, after
"Text: ", so every prompt of one instruction shares the instruction as a
prefix (the local provider then evaluates only the new tokens).

A small model favours the label named first (SmolLM2-135M on SST-2: 99% of
answers "negative" when the prompt says "negative or positive", 87%
"positive" the other way round), so candidate instruction `i` names the
labels rotated by `i`: each label comes first in some instruction, and the
heads learn from both biases.
"""
from __future__ import annotations

from typing import Sequence

# Generic instructions, in the order the recipe uses them (the first is the
# one zero-shot and calibrated rows read).
DEFAULT_INSTRUCTIONS = (
    "Classify the text as one of: {labels}. Answer with the label only.",
    "Is this text {labels}? Answer with one word: {labels}.",
    "Which of these labels fits the text best: {labels}?",
)
TEXT_SLOT = "{text}"
LABEL_SLOT = "{label}"


def label_phrase(names: Sequence[str]) -> str:
  """'negative or positive'; 'a, b or c'."""
  names = list(names)
  return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def check_instruction(instruction: str) -> str:
  """`instruction` if it is a usable template; else a clear error."""
  if not isinstance(instruction, str) or not instruction.strip():
    raise ValueError(f"an instruction must be a non-empty string; got {instruction!r}.")
  try:
    instruction.format(labels="x", text="x")
  except (KeyError, IndexError, ValueError) as e:
    raise ValueError(
        f"instruction {instruction!r} is not a valid template ({e!r}): it may use "
        "`{labels}` (the label words) and `{text}` (the text; without it the text "
        "follows the instruction after 'Text: '); write other braces as `{{` `}}`.") from None
  return instruction


def rotated(names: Sequence[str], shift: int) -> list[str]:
  """`names` rotated left by `shift` (the label named first changes)."""
  names = list(names)
  shift %= len(names)
  return names[shift:] + names[:shift]


def prompt_template(instruction: str, names: Sequence[str], rotation: int = 0) -> str:
  """The prompt with `{text}` left to fill: the instruction, then the text.

  `{labels}` names the labels in their order rotated by `rotation`.
  """
  check_instruction(instruction)
  filled = instruction.replace("{labels}", label_phrase(rotated(names, rotation)))
  if TEXT_SLOT not in instruction:
    filled = filled + "\nText: " + TEXT_SLOT
  return filled.replace("{{", "{").replace("}}", "}")


def fill(template: str, text: str, label: str | None = None) -> str:
  """`template` with the text (and a label word) put in."""
  if label is not None:
    template = template.replace(LABEL_SLOT, label)
  return template.replace(TEXT_SLOT, text)


def answer_options(names: Sequence[str]) -> tuple[str, ...]:
  """The label words as written, then each capitalized where that differs.

  A chat model often starts its reply with a capital ("Positive"), so the
  capitalized word's log-probability carries signal the lower-case one
  misses. The first K options are the label words themselves.
  """
  names = tuple(names)
  extra = tuple(n[:1].upper() + n[1:] for n in names)
  extra = tuple(e for e in extra if e not in names)
  return names + tuple(dict.fromkeys(extra))


def contrast_template() -> str:
  """The text, then a statement of one label (`{label}`): to embed once per
  label (see `features.py`, 'contrast')."""
  return "Text: " + TEXT_SLOT + "\nThis text is " + LABEL_SLOT + "."


def question_template(names: Sequence[str]) -> str:
  """The text, then a question naming the labels: to embed.

  An embedding is the mean of the text's token states; tokens after the text
  attend to all of it, so a question that follows steers part of the mean
  toward what the labels are about.
  """
  return "Text: " + TEXT_SLOT + f"\nIs this text {label_phrase(names)}?"
