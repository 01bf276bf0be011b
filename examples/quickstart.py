"""Quickstart: a hybrid tensor + LLM program on the embedded local model.

Questions become uint8 text arrays; one `jax.jit`-compiled function answers a
batch of them with SmolLM2-135M-Instruct (llama.cpp, on this machine) through
`jax.vmap` (ONE batched host call, answered by a small pool of model
instances) and computes something about the answers in ordinary tensor code.
The first call includes loading the model and compiling. At temperature 0
the answers are a function of the questions, so the response cache keeps
them: the second call is answered from it without running the model. A
binding with `cache=None` runs the model again (the model stays loaded).

On a 2-core machine the model is compute-bound, so its two instances share
the cores: batching pays most where calls wait on latency (remote APIs).

Run: make demo   (or .venv/bin/python examples/quickstart.py)
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from xcs_jax import models, text

QUESTIONS = [
    "What is the capital of France?",
    "What do bees make?",
    "What is the opposite of hot?",
    "What color is the sky on a clear day?",
]


def answer_with(llm):
  @jax.jit
  def answer(questions):
    answers = jax.vmap(llm)(questions)                  # one batched model call
    n_bytes = jnp.sum(answers != 0, axis=-1)            # tensor code on the answers
    return answers, n_bytes
  return answer


def timed(fn, *args):
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - start


def main() -> None:
  llm = models.bind("local:smollm2", system_prompt="Answer in one short sentence.",
                    temperature=0.0, max_tokens=32, output_bytes=256)
  fresh = llm.replace(cache=None)                       # never answered from the cache

  questions = text.encode(QUESTIONS, 64)
  answer = answer_with(llm)
  (answers, n_bytes), first_s = timed(answer, questions)
  _, cached_s = timed(answer, questions)
  (again, _), fresh_s = timed(answer_with(fresh), questions)

  print(f"{llm}: {len(QUESTIONS)} questions, one jax.jit(jax.vmap(...)) call\n")
  for q, a, n in zip(QUESTIONS, text.decode(answers), n_bytes.tolist()):
    print(f"Q: {q}\nA: {a}   ({n} bytes)\n")
  print(f"first call (load model + compile + answer):        {first_s:.2f} s")
  print(f"same questions again (answered by the cache):      {cached_s:.2f} s")
  print(f"same questions, cache=None (compile + answer):     {fresh_s:.2f} s "
        f"(wall / {len(QUESTIONS)} = {fresh_s / len(QUESTIONS):.2f} s per answer)")
  print(f"the model's answers the second time are the same:  "
        f"{text.decode(again) == text.decode(answers)}")
  for b in (llm, fresh):
    u = b.usage()
    print(f"usage of {'cache=None' if b is fresh else 'the binding'}: {u.calls} model calls, "
          f"{u.cache_hits} cache hits, {u.prompt_tokens} prompt + {u.completion_tokens} "
          f"completion tokens, {u.errors} errors, {u.seconds:.2f} s in calls")


if __name__ == "__main__":
  main()
