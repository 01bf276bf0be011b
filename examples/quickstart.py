"""Quickstart: a hybrid tensor + LLM program on the embedded local model.

Questions become uint8 text arrays; one `jax.jit`-compiled function answers a
batch of them with SmolLM2-135M-Instruct (llama.cpp, on this machine) through
`jax.vmap` (ONE batched host call, answered by a small pool of model
instances) and computes something about the answers in ordinary tensor code.
The first call includes loading the model and compiling; the second reuses
both and, at temperature 0, gives the same answers.

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


def main() -> None:
  llm = models.bind("local:smollm2", system_prompt="Answer in one short sentence.",
                    temperature=0.0, max_tokens=32, output_bytes=256)

  @jax.jit
  def answer(questions):
    answers = jax.vmap(llm)(questions)                  # one batched model call
    n_bytes = jnp.sum(answers != 0, axis=-1)            # tensor code on the answers
    return answers, n_bytes

  questions = text.encode(QUESTIONS, 64)
  timings = []
  for _ in range(2):
    start = time.perf_counter()
    answers, n_bytes = jax.block_until_ready(answer(questions))
    timings.append(time.perf_counter() - start)

  print(f"{llm}: {len(QUESTIONS)} questions, one jax.jit(jax.vmap(...)) call\n")
  for q, a, n in zip(QUESTIONS, text.decode(answers), n_bytes.tolist()):
    print(f"Q: {q}\nA: {a}   ({n} bytes)\n")
  print(f"first call (load model + compile + answer): {timings[0]:.2f} s")
  print(f"second call (answer only):                  {timings[1]:.2f} s "
        f"(wall / {len(QUESTIONS)} = {timings[1] / len(QUESTIONS):.2f} s per answer)")
  u = llm.usage()
  print(f"usage: {u.calls} calls, {u.prompt_tokens} prompt + {u.completion_tokens} "
        f"completion tokens, {u.errors} errors, {u.seconds:.2f} s in calls")


if __name__ == "__main__":
  main()
