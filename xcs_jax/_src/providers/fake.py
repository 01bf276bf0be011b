"""`fake`: a deterministic test double for fast tests and benchmarks.

Never chosen silently: only `bind("fake:...")` uses it. Models:
- ``fake:echo``: answers with the prompt;
- ``fake:upper``: answers with the prompt in upper case;
- ``fake:choice``: answers with one of `choices`, picked by a hash of the
  prompt and the seed (so keys from `jax.random.split` give varied answers
  and the same key gives the same answer).

Parameters (beside the common ones):
- ``latency_s`` (0.0): each call sleeps this long (cancellable) before answering;
  a call whose latency exceeds `timeout_s` raises `XCSTimeoutError` at the timeout.
- ``fail_on`` (None): prompts containing this substring fail permanently
  (`FakeProviderError`), at once (like a rejected request, without waiting
  `latency_s`), never retried.
- ``transient_failures`` (0): the first this-many attempts at each distinct
  request (binding, prompt, seed) in this process fail with a transient
  error (exercises retries).
- ``choices`` (("yes", "no")): the answers of ``fake:choice``.
"""
from __future__ import annotations

import hashlib
import threading

from xcs_jax._src.providers import base

MODELS = ("echo", "upper", "choice")


class FakeProviderError(RuntimeError):
  """The permanent failure `fail_on` injects."""


class FakeProvider(base.Provider):
  name = "fake"
  default_concurrency = 256
  params = {"latency_s": 0.0, "fail_on": None, "transient_failures": 0,
            "choices": ("yes", "no")}

  def validate(self, model, params):
    if model not in MODELS:
      raise ValueError(f"unknown fake model {model!r}: expected one of "
                       f"{', '.join(MODELS)} (e.g. \"fake:echo\").")
    if not isinstance(params["latency_s"], (int, float)) or params["latency_s"] < 0:
      raise ValueError(f"`latency_s` must be a number >= 0; got {params['latency_s']!r}.")
    choices = params["choices"]
    if not (isinstance(choices, tuple) and choices and all(isinstance(c, str) for c in choices)):
      raise ValueError(f"`choices` must be a non-empty tuple of str; got {choices!r}.")

  def __init__(self):
    self._attempts: dict = {}
    self._lock = threading.Lock()

  def generate(self, binding, prompt, seed, ctx, deadline):
    p = binding.options
    if p["fail_on"] is not None and p["fail_on"] in prompt:
      raise FakeProviderError(f"injected failure: prompt contains {p['fail_on']!r}")
    ctx.sleep(float(p["latency_s"]), deadline=deadline, timeout_s=p["timeout_s"])
    if p["transient_failures"]:
      with self._lock:
        n = self._attempts[(binding, prompt, seed)] = (
            self._attempts.get((binding, prompt, seed), 0) + 1)
      if n <= p["transient_failures"]:
        raise base.TransientError(f"injected transient failure {n}")
    return self._answer(binding.model, prompt, seed, p)

  @staticmethod
  def _answer(model, prompt, seed, p) -> base.Completion:
    if model == "echo":
      answer = prompt
    elif model == "upper":
      answer = prompt.upper()
    else:
      digest = hashlib.blake2b(f"{seed}:{prompt}".encode(), digest_size=4).digest()
      answer = p["choices"][int.from_bytes(digest, "little") % len(p["choices"])]
    return base.Completion(answer, prompt_tokens=len(prompt.split()),
                           completion_tokens=len(answer.split()))


base.register_provider("fake", FakeProvider)
