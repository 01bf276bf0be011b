"""`openai`: any OpenAI-compatible endpoint through the official `openai` SDK.

OpenAI itself, vLLM, Ollama, a llama.cpp server, ...: ``openai:<model>`` sends
`<model>` as the request's model name.

Parameters (beside the common ones):
- ``base_url`` (None): the endpoint (e.g. ``"http://127.0.0.1:8000/v1"``);
  None is the SDK's default (``OPENAI_BASE_URL`` or api.openai.com).
- ``api_key_env`` ("OPENAI_API_KEY"): the name of the environment variable
  holding the key, read when the client is made; the key itself is never
  stored in the binding, its repr, errors or logs. None: an endpoint without
  authentication (a placeholder key is sent).
- ``embedding_dim`` (None): the width of `embed`'s vectors. `embed` needs it
  when JAX traces, and abstract evaluation never calls the endpoint, so
  `embed` on a binding without it is a clear error.
- ``score_template`` (None): how the served model lays out a chat, as text
  with ``{system}``, ``{prompt}`` and ``{reply}`` fields (e.g. `CHATML`),
  for `score_options`; see there.

Requests go through the SDK's async client (`openai.AsyncOpenAI`) on the
runtime's event loop: a cancelled or timed-out request is really abandoned
(its connection closed), and requests in flight need no thread each.
The SDK's own retries are off (`max_retries=0`): every attempt's failure
reaches the runtime, which retries lost connections, 408, 409, 429 and 5xx
answers (after the server's `Retry-After` when it sends one) until the
call's `deadline_s` (see docs/providers.md); `timeout_s` bounds each
attempt. One client is kept per (base_url, api_key_env, key, timeout) and
runtime.

`score_options`: the chat API returns log-probabilities only of tokens the
model generates, never of a given text, so options are scored through the
legacy completions endpoint with ``echo=True, logprobs=0``, which returns the
log-probability of every token of a given prompt. The binding's
`score_template` turns (system, prompt, option) into that text; the option's
value is the sum over the tokens of ``option`` and of what follows ``{reply}``
in the template (the end-of-turn marker), so it is the log-probability that
the whole reply is the option. Served by llama.cpp's servers (llama-cpp-python:
start the model with `logits_all`), vLLM and others; not by OpenAI's current
models. Where the endpoint cannot give these numbers the call fails with a
clear error; no value is ever made up. Note that the server tokenizes the
whole text at once: an option whose first token would merge with the
template's text before it (e.g. a leading space after a newline) cannot be
separated and is an error.

`embed`: the embeddings endpoint (raw vectors; the caller normalizes).
"""
from __future__ import annotations


import numpy as np

from xcs_jax._src import checks
from xcs_jax._src.providers import base
from xcs_jax._src.providers import sdk

_EXTRA = "openai"

CHATML = ("<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n"
          "<|im_start|>assistant\n{reply}<|im_end|>")
"""`score_template` of ChatML models (SmolLM2, Qwen, ...)."""

_NO_SCORE_TEMPLATE = (
    "`score_options` on `{binding}` needs `score_template`: OpenAI-compatible chat "
    "APIs return log-probabilities only of tokens the model generates, not of a "
    "given option, so options are scored with the completions endpoint (`echo=True, "
    "logprobs`) on the chat laid out as text. Bind with `score_template=...` giving "
    "that layout with {{system}}, {{prompt}} and {{reply}} fields (e.g. "
    "`xcs_jax.models.CHATML` for ChatML models) if the endpoint "
    "serves echoed logprobs (llama.cpp server, vLLM); otherwise use the `local` "
    "provider, which reads exact log-probabilities from the model.")

_NO_ECHO_LOGPROBS = (
    "the endpoint of `{binding}` gave no log-probabilities for the echoed prompt, so "
    "it cannot score options (an OpenAI-compatible server must serve the completions "
    "endpoint with `echo=True, logprobs=0`; llama-cpp-python's server needs the model "
    "loaded with `logits_all`). Use the `local` provider for exact log-probabilities.")


def _make_client(*, base_url, api_key: sdk.Secret, timeout, max_retries):
  client = sdk.import_sdk("openai", _EXTRA).AsyncOpenAI(
      base_url=base_url, api_key=api_key.reveal(), timeout=timeout, max_retries=max_retries)
  # The SDK imports its resources on first use: now, not inside a call's deadline.
  _ = (client.chat.completions, client.completions, client.embeddings)
  return client


class OpenAIProvider(base.Provider):
  name = "openai"
  default_concurrency = 16
  params = {"base_url": None, "api_key_env": "OPENAI_API_KEY", "embedding_dim": None,
            "score_template": None}

  def __init__(self):
    self._clients = sdk.ClientCache("openai", _make_client)

  def prepare(self, binding) -> None:
    self._clients.get(binding)  # made before any call's deadline starts

  def close(self, runtime) -> None:
    self._clients.close_on(runtime)

  def validate(self, model, params):
    spec = f"openai:{model}"
    sdk.check_endpoint(spec, params, "openai", _EXTRA)
    params["embedding_dim"] = checks.check_int(
        params["embedding_dim"], f"bind({spec!r}, embedding_dim=...)", min_value=1,
        max_value=checks.MAX_EMBEDDING_DIM, none_ok=True)
    what = f"bind({spec!r}, score_template=...)"
    template = checks.check_str(params["score_template"], what, none_ok=True)
    if template is not None and not (template.count("{reply}") == 1
                                     and "{prompt}" in template):
      checks.fail(ValueError, what, "a str with {prompt} and exactly one {reply} field "
                  "(and optionally {system})", template,
                  "See `xcs_jax.models.CHATML` for ChatML models.")

  # -- client and one request --------------------------------------------------

  async def _request(self, binding, ctx, send, what: str):
    openai = sdk.import_sdk("openai", _EXTRA)
    client, key = self._clients.get(binding)
    return await sdk.request(lambda timeout: send(client, timeout), ctx=ctx,
                             timeout_errors=(openai.APITimeoutError,),
                             connection_errors=(openai.APIConnectionError,), secret=key,
                             what=f"{what} request to {binding}")

  # -- calls -------------------------------------------------------------------

  async def generate(self, binding, prompt, seed, ctx):
    p = binding.options
    messages = [{"role": "user", "content": prompt}]
    if p["system_prompt"] is not None:
      messages.insert(0, {"role": "system", "content": p["system_prompt"]})
    response = await self._request(
        binding, ctx,
        lambda client, timeout: client.chat.completions.with_raw_response.create(
            model=binding.model, messages=messages, temperature=float(p["temperature"]),
            max_tokens=int(p["max_tokens"]), seed=int(seed), timeout=timeout),
        "chat completion")
    text = response.choices[0].message.content or ""
    usage = response.usage
    return base.Completion(text, prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                           completion_tokens=getattr(usage, "completion_tokens", 0) or 0)

  async def score_options(self, binding, prompt, options, ctx):
    p = binding.options
    template = p["score_template"]
    if template is None:
      raise NotImplementedError(_NO_SCORE_TEMPLATE.format(binding=binding))
    before, end = _layout(template, prompt, p["system_prompt"], str(binding))
    scores = []
    for option in options:
      response = await self._request(
          binding, ctx,
          lambda client, timeout, option=option: client.completions.with_raw_response.create(
              model=binding.model, prompt=before + option + end, echo=True, logprobs=0,
              max_tokens=1, temperature=0.0, timeout=timeout),
          "completion (echo) for scoring")
      scores.append(_reply_logprob(response, option, end, str(binding)))
    return np.asarray(scores, dtype=np.float32)

  async def embed(self, binding, text, ctx):
    if not text:
      raise ValueError("cannot embed an empty text.")
    response = await self._request(
        binding, ctx,
        lambda client, timeout: client.embeddings.with_raw_response.create(
            model=binding.model, input=text, timeout=timeout),
        "embedding")
    vector = np.asarray(response.data[0].embedding, dtype=np.float32)
    expected = binding.get("embedding_dim")
    if vector.ndim != 1 or not np.isfinite(vector).all() or (
        expected is not None and vector.shape[0] != expected):
      raise ValueError(
          f"the endpoint of {binding} returned an embedding of shape {vector.shape} "
          f"(expected finite values{f' and width {expected}' if expected else ''}; "
          "an endpoint returning one vector per token needs a pooling setting).")
    return vector

  def embedding_dim(self, binding) -> int:
    # Asked while JAX traces: abstract evaluation never calls the endpoint,
    # so the width must come with the binding.
    if binding.get("embedding_dim") is None:
      raise ValueError(
          f"`{binding}.embed(...)` needs the width of the endpoint's vectors when JAX "
          f"traces, without calling it: bind with `embedding_dim=D` (e.g. "
          f"bind(\"openai:{binding.model}\", ..., embedding_dim=1536) for "
          "text-embedding-3-small).")
    return int(binding.get("embedding_dim"))


def _layout(template: str, prompt: str, system_prompt: str | None,
            binding: str) -> tuple[str, str]:
  """(text before the reply, text after it) of `template` filled in."""
  head, tail = template.split("{reply}")
  if ("{system}" in template) != (system_prompt is not None):
    raise ValueError(
        f"`score_template` of {binding} " + (
            "has a {system} field: bind with `system_prompt=...`." if system_prompt is None
            else "has no {system} field, so it cannot carry the binding's `system_prompt`."))
  fields = {"prompt": prompt, "system": system_prompt or ""}
  return (head.replace("{system}", fields["system"]).replace("{prompt}", fields["prompt"]),
          tail.replace("{system}", fields["system"]).replace("{prompt}", fields["prompt"]))


def _reply_logprob(response, option: str, end: str, binding: str) -> float:
  """Sum of the echoed log-probabilities of the tokens of `option + end`.

  The echoed token list is the prompt's tokens then the generated ones
  (`usage.completion_tokens` of them). The reply's tokens are found from the
  end of the prompt: their texts must add up to `option + end` (or to
  `option` where the server renders special tokens as empty text).
  """
  choice = response.choices[0]
  lp = choice.logprobs
  usage = response.usage
  if lp is None or not lp.tokens or lp.token_logprobs is None or usage is None:
    raise NotImplementedError(_NO_ECHO_LOGPROBS.format(binding=binding))
  n_prompt = len(lp.tokens) - int(usage.completion_tokens or 0)
  targets = (option + end, option)
  text, i = "", n_prompt
  while i > 0 and text not in targets:
    i -= 1
    text = lp.tokens[i] + text
    if not any(t.endswith(text) for t in targets):
      break
  if text not in targets or i == 0:
    raise ValueError(
        f"cannot tell the tokens of option {option!r} apart from the prompt in the "
        f"answer of {binding}: the server's tokens end with "
        f"{lp.tokens[max(0, n_prompt - 4):n_prompt]!r}. An option whose first token "
        "merges with the template's text before it (e.g. a leading space) cannot be "
        "scored through this endpoint; strip it, or use the `local` provider.")
  values = lp.token_logprobs[i:n_prompt]
  if any(v is None for v in values):
    raise ValueError(f"the endpoint of {binding} left option tokens without a "
                     "log-probability; it cannot score options.")
  total = float(np.sum(np.asarray(values, dtype=np.float64)))
  if not np.isfinite(total) or total > 0:
    raise FloatingPointError(
        f"the endpoint of {binding} returned an invalid log-probability {total} for "
        f"option {option!r} (must be finite and <= 0).")
  return total


base.register_provider("openai", OpenAIProvider)
