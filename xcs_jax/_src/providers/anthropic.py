"""`anthropic`: Claude models through the official `anthropic` SDK.

``anthropic:<model>`` sends `<model>` (e.g. ``claude-3-5-haiku-latest``) as the
request's model name.

Parameters (beside the common ones):
- ``base_url`` (None): the endpoint; None is the SDK's default.
- ``api_key_env`` ("ANTHROPIC_API_KEY"): the name of the environment variable
  holding the key, read when the client is made; the key itself is never
  stored in the binding, its repr, errors or logs.

Requests go through the SDK's async client (`anthropic.AsyncAnthropic`) on
the runtime's event loop, so a cancelled or timed-out request is really
abandoned. The SDK's own retries are off: the runtime retries rate limits,
overloads (529), 5xx answers and lost connections until the call's
`deadline_s`; `timeout_s` bounds each attempt.

Sampling: the current Messages API (SDK 2.x, API version 2026-10-21) takes no
sampling parameters and has never taken a seed, so the binding's
`temperature` and `seed` and a call's `key` are not sent: answers follow the
model's own sampling and are not reproducible by key.

No numeric outputs: the API returns neither log-probabilities nor
embeddings, so `score_options` and `embed` raise `NotImplementedError` naming
the providers that can.
"""
from __future__ import annotations

from xcs_jax._src.providers import base
from xcs_jax._src.providers import sdk

_EXTRA = "anthropic"

_NO_LOGPROBS = (
    "provider `anthropic` ({binding}) cannot give log-probabilities of options: the "
    "Anthropic API returns none. Score options with the `local` provider "
    "(`bind(\"local:smollm2\")` or any GGUF via `model_path=`) or an OpenAI-compatible "
    "endpoint that serves echoed logprobs (`bind(\"openai:<model>\", base_url=..., "
    "score_template=...)`, e.g. a llama.cpp server or vLLM).")

_NO_EMBEDDINGS = (
    "provider `anthropic` ({binding}) cannot embed text: the Anthropic API has no "
    "embeddings endpoint. Embed with the `local` provider (`bind(\"local:smollm2\")`) or "
    "an OpenAI-compatible embeddings endpoint (`bind(\"openai:<embedding model>\", "
    "base_url=...)`).")


def _make_client(*, base_url, api_key: sdk.Secret, timeout, max_retries):
  client = sdk.import_sdk("anthropic", _EXTRA).AsyncAnthropic(
      base_url=base_url, api_key=api_key.reveal(), timeout=timeout, max_retries=max_retries)
  # The SDK imports its resources on first use: now, not inside a call's deadline.
  _ = client.messages
  return client


class AnthropicProvider(base.Provider):
  name = "anthropic"
  default_concurrency = 16
  params = {"base_url": None, "api_key_env": "ANTHROPIC_API_KEY"}

  def __init__(self):
    self._clients = sdk.ClientCache("anthropic", _make_client)

  def prepare(self, binding) -> None:
    self._clients.get(binding)  # made before any call's deadline starts

  def close(self, runtime) -> None:
    self._clients.close_on(runtime)

  def validate(self, model, params):
    spec = f"anthropic:{model}"
    sdk.check_endpoint(spec, params, "anthropic", _EXTRA)

  async def generate(self, binding, prompt, seed, ctx):
    anthropic = sdk.import_sdk("anthropic", _EXTRA)
    p = binding.options
    client, key = self._clients.get(binding)
    extra = {} if p["system_prompt"] is None else {"system": p["system_prompt"]}
    response = await sdk.request(
        lambda timeout: client.messages.with_raw_response.create(
            model=binding.model, max_tokens=int(p["max_tokens"]),
            messages=[{"role": "user", "content": prompt}], timeout=timeout, **extra),
        ctx=ctx,
        timeout_errors=(anthropic.APITimeoutError,),
                             connection_errors=(anthropic.APIConnectionError,), secret=key,
        what=f"messages request to {binding}")
    text = "".join(block.text for block in response.content
                   if getattr(block, "type", None) == "text")
    usage = response.usage
    return base.Completion(text, prompt_tokens=getattr(usage, "input_tokens", 0) or 0,
                           completion_tokens=getattr(usage, "output_tokens", 0) or 0)

  def score_options(self, binding, prompt, options, ctx):
    raise NotImplementedError(_NO_LOGPROBS.format(binding=binding))

  def embed(self, binding, text, ctx):
    raise NotImplementedError(_NO_EMBEDDINGS.format(binding=binding))

  def embedding_dim(self, binding) -> int:
    raise NotImplementedError(_NO_EMBEDDINGS.format(binding=binding))


base.register_provider("anthropic", AnthropicProvider)
