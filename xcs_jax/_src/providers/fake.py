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
  request (binding, prompt, seed) in this runtime fail with a transient
  error (exercises retries). The runtime's fake provider remembers the
  attempts of at most `MAX_TRACKED_REQUESTS` requests (oldest forgotten first).
- ``transient_rate`` (0.0): each attempt fails with a transient error with
  this probability, decided by a hash of the request and the attempt's number
  (so a run repeats exactly, and every request succeeds in the end).
- ``choices`` (("yes", "no")): the answers of ``fake:choice``.
- ``option_bias`` (()): numbers added, by position, to the logits of the
  options `score_options` is given (a built-in preference for some labels,
  for calibration tests); shorter than K means 0 for the rest.
- ``embedding_dim`` (64): D of `embed`.

Every model also scores options and embeds (latency and failures apply alike):

- ``score_options(prompt, options)`` is `log_softmax(logits)` over the K
  options, so values are <= 0 and their exponentials sum to 1, with
  ``logits[k] = 2 * overlap(prompt, options[k]) + jitter(prompt, options[k])
  + option_bias[k]``: `overlap` counts the distinct words of the option that
  also occur in the prompt (words are lower-cased runs of letters and digits),
  and `jitter` is a hash of (model, prompt, option) in [0, 1). So an option
  sharing more words with the prompt always wins without a bias.
- ``embed(text)`` sums, over the text's words (or the empty word for a text
  without any), a standard normal vector of size ``embedding_dim`` seeded by
  a hash of the word: texts sharing words point in similar directions, and
  the same text always gives the same vector.
"""
from __future__ import annotations

import collections
import hashlib
import re
import threading

import numpy as np

from xcs_jax._src import checks
from xcs_jax._src.providers import base

MODELS = ("echo", "upper", "choice")
MAX_TRACKED_REQUESTS = 65536


class FakeProviderError(RuntimeError):
  """The permanent failure `fail_on` injects."""


class FakeProvider(base.Provider):
  name = "fake"
  default_concurrency = 1024    # async: calls in flight cost no thread
  params = {"latency_s": 0.0, "fail_on": None, "transient_failures": 0, "transient_rate": 0.0,
            "choices": ("yes", "no"), "option_bias": (), "embedding_dim": 64}
  non_answer_params = frozenset({"latency_s", "fail_on", "transient_failures",
                                 "transient_rate"})

  def validate(self, model, params):
    if model not in MODELS:
      raise ValueError(f"`bind('fake:{model}')`: unknown fake model {model!r}; expected "
                       f"one of {', '.join(MODELS)} (e.g. \"fake:echo\").")

    def arg(name):
      return f"bind('fake:{model}', {name}=...)"

    params["latency_s"] = checks.check_seconds(params["latency_s"], arg("latency_s"),
                                               none_ok=False, zero_ok=True)
    checks.check_str(params["fail_on"], arg("fail_on"), none_ok=True)
    params["transient_failures"] = checks.check_int(
        params["transient_failures"], arg("transient_failures"), min_value=0)
    params["transient_rate"] = checks.check_number(
        params["transient_rate"], arg("transient_rate"), min_value=0.0, max_value=1.0,
        max_open=True)
    checks.check_str_tuple(params["choices"], arg("choices"), example="choices=(\"yes\", \"no\")")
    checks.check_number_tuple(params["option_bias"], arg("option_bias"))
    params["embedding_dim"] = checks.check_int(params["embedding_dim"], arg("embedding_dim"),
                                               min_value=1,
                                               max_value=checks.MAX_EMBEDDING_DIM)

  def __init__(self):
    self._attempts: collections.OrderedDict = collections.OrderedDict()
    self._lock = threading.Lock()

  def _simulate(self, binding, prompt, ctx, request=()):
    """The latency and injected failures every fake call goes through: an
    awaitable, or None when the call has nothing to simulate.

    `request` tells apart distinct requests on the same prompt (a seed, the
    options), each with its own count of transient failures.
    """
    p = binding._by_name  # read-only, no copy: this runs once per call
    if (p["fail_on"] is None and not p["latency_s"] and not p["transient_failures"]
        and not p["transient_rate"]):
      ctx.check()
      return None
    return self._simulated(binding, prompt, ctx, request)

  async def _simulated(self, binding, prompt, ctx, request):
    p = binding._by_name
    if p["fail_on"] is not None and p["fail_on"] in prompt:
      raise FakeProviderError(f"injected failure: prompt contains {p['fail_on']!r}")
    if p["latency_s"]:
      await ctx.asleep(float(p["latency_s"]))
    else:
      ctx.check()
    if p["transient_failures"] or p["transient_rate"]:
      key = (binding, prompt, request)
      with self._lock:
        n = self._attempts[key] = self._attempts.get(key, 0) + 1
        self._attempts.move_to_end(key)
        if len(self._attempts) > MAX_TRACKED_REQUESTS:
          self._attempts.popitem(last=False)
      if n <= p["transient_failures"]:
        raise base.TransientError(f"injected transient failure {n}")
      if p["transient_rate"] and _unit_hash(
          f"{binding.model}\x00{prompt}\x00{request}\x00{n}") < p["transient_rate"]:
        raise base.TransientError(f"injected transient failure (attempt {n}, "
                                  f"rate {p['transient_rate']})")

  async def generate(self, binding, prompt, seed, ctx):
    if (simulated := self._simulate(binding, prompt, ctx, ("generate", seed))) is not None:
      await simulated
    return self._answer(binding.model, prompt, seed, binding._by_name)

  async def score_options(self, binding, prompt, options, ctx):
    if (simulated := self._simulate(binding, prompt, ctx, ("score", options))) is not None:
      await simulated
    bias = binding.get("option_bias")
    prompt_words = set(_words(prompt))
    logits = np.array([
        2.0 * len(set(_words(o)) & prompt_words)
        + _unit_hash(f"{binding.model}\x00{prompt}\x00{o}")
        + (float(bias[k]) if k < len(bias) else 0.0)
        for k, o in enumerate(options)])
    shifted = logits - logits.max()
    return shifted - np.log(np.exp(shifted).sum())

  async def embed(self, binding, text, ctx):
    if (simulated := self._simulate(binding, text, ctx, ("embed",))) is not None:
      await simulated
    dim = self.embedding_dim(binding)
    vec = np.zeros(dim)
    for word in _words(text) or [""]:
      seed = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
      vec += np.random.default_rng(seed).standard_normal(dim)
    return vec

  def embedding_dim(self, binding):
    return int(binding.get("embedding_dim"))

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


def _words(text: str) -> list[str]:
  return re.findall(r"[^\W_]+", text.lower())


def _unit_hash(s: str) -> float:
  """A deterministic number in [0, 1) from `s`."""
  digest = hashlib.blake2b(s.encode(), digest_size=8).digest()
  return int.from_bytes(digest, "little") / 2.0 ** 64


base.register_provider("fake", FakeProvider)
