"""Learn ensemble weights over several model calls with optax, through an estimator.

K ensemble members score the labels ("sports", "cooking") of a sentence, each
a model call with its own instruction (`binding.score_options`). Their label
log-probabilities are pooled log-linearly,

    pooled = softmax(scale * sum_k w_k * log p_k(label)),   w = softmax(theta),

and the loss is the pooled negative log-likelihood of the true label. The
loss is computed by a host function (numpy), standing in for an evaluator you
cannot write in JAX (a metric service, a legacy scorer): `host_op(...,
grad='central')` gives it a gradient, from one batched host call of
2 (K + 1) + 1 evaluations per step. `optax.adam` then learns `theta` and
`log(scale)`. The script checks the estimate against JAX's exact gradient of
the same formula, and prints held-out accuracy and NLL of each member, of
uniform weights and of the learned weights.

The member calls do not depend on the weights, so they are made once, for
all sentences and members in one jitted program (under `xcs_jax.jit` the K
call sites run concurrently; on 2 CPU cores the local model is compute-bound,
so that gains little here). Training then costs only host evaluations.

Data: examples/data/prompt_opt.jsonl (100 train, 40 held-out sentences).

Run (seeded, reproducible; ~1 min on 2 CPU cores with the local model):
  .venv/bin/python examples/ensemble_weights.py                   # local:smollm2
  .venv/bin/python examples/ensemble_weights.py --model fake:echo  # no model, seconds
  .venv/bin/python examples/ensemble_weights.py --estimator spsa
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import xcs_jax
from xcs_jax import optim, text

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "prompt_opt.jsonl")
LABELS = ("sports", "cooking")
MEMBERS = (
    "Is this sentence about sports or cooking? Answer with one word.",
    "Name the topic of this sentence in one word.",
    "Translate the sentence into French.",
)
MAX_LEN = 256


def load(split):
  rows = [json.loads(line) for line in open(DATA, encoding="utf-8")]
  rows = [r for r in rows if r["split"] == split]
  return [r["text"] for r in rows], np.array([LABELS.index(r["label"]) for r in rows],
                                             np.int32)


def pooled_nll(theta, log_scale, member_logp, labels):
  """Host-side evaluator (numpy): mean pooled NLL. Leading batch axes allowed."""
  w = np.exp(theta - theta.max(-1, keepdims=True))
  w = w / w.sum(-1, keepdims=True)                                 # [..., K]
  z = np.exp(log_scale)[..., None, None] * np.einsum("...k,...bkc->...bc", w, member_logp)
  z = z - z.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))              # [..., B, C]
  nll = -np.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
  return nll.mean(-1).astype(np.float32)


def pooled_nll_jax(theta, log_scale, member_logp, labels):
  """The same formula in JAX, only to check the estimator's gradient."""
  z = jnp.exp(log_scale) * jnp.einsum("k,bkc->bc", jax.nn.softmax(theta), member_logp)
  logp = jax.nn.log_softmax(z, axis=-1)
  return -jnp.take_along_axis(logp, labels[:, None], axis=1).mean()


def pooled_accuracy(params, member_logp, labels):
  z = jnp.einsum("k,bkc->bc", jax.nn.softmax(params["theta"]), member_logp)
  return float(jnp.mean(jnp.argmax(z, axis=1) == labels))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="local:smollm2")
  parser.add_argument("--estimator", default="central", choices=("central", "spsa"))
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--epochs", type=int, default=30)
  parser.add_argument("--batch-size", type=int, default=25)
  parser.add_argument("--lr", type=float, default=0.1)
  args = parser.parse_args()

  llm = xcs_jax.models.bind(args.model, max_tokens=4)
  jit = getattr(xcs_jax, "jit", jax.jit)

  @jit
  def members(prompts):  # [K, N, L] -> [N, K, 2]; K call sites, each one batched call
    logp = [jax.nn.log_softmax(llm.score_options(prompts[k], LABELS), axis=-1)
            for k in range(len(MEMBERS))]
    return jnp.stack(logp, axis=1)

  def member_scores(sentences):
    prompts = np.stack([text.encode([f"{m}\n\n{s}" for s in sentences], MAX_LEN)
                        for m in MEMBERS])
    return np.asarray(members(prompts))

  start = time.perf_counter()
  train_text, train_y = load("train")
  test_text, test_y = load("heldout")
  train_m, test_m = member_scores(train_text), member_scores(test_text)
  calls_s = time.perf_counter() - start

  estimator = (xcs_jax.grad.central() if args.estimator == "central"
               else xcs_jax.grad.spsa(n=16, seed=args.seed))
  evaluator = xcs_jax.host_op(pooled_nll, vectorized=True, name="pooled_nll",
                              out_spec=jax.ShapeDtypeStruct((), jnp.float32),
                              grad=estimator)

  def loss_fn(params, batch, key):
    return evaluator(params["theta"], params["log_scale"], batch["m"], batch["y"]), {}

  params = {"theta": jnp.zeros(len(MEMBERS)), "log_scale": jnp.zeros(())}
  # The estimate beside JAX's exact gradient of the same formula, at the start.
  est = jax.grad(lambda p: loss_fn(p, {"m": train_m, "y": train_y}, None)[0])(params)
  exact = jax.grad(lambda p: pooled_nll_jax(p["theta"], p["log_scale"], train_m,
                                            train_y))(params)
  flat = lambda g: np.concatenate([np.ravel(g["theta"]), np.ravel(g["log_scale"])])
  rel = np.linalg.norm(flat(est) - flat(exact)) / np.linalg.norm(flat(exact))

  optimizer = optax.adam(args.lr)
  start = time.perf_counter()
  result = optim.fit(optim.make_step(loss_fn, optimizer), params, optimizer.init(params),
                     {"m": train_m, "y": train_y}, key=jax.random.key(args.seed),
                     num_epochs=args.epochs, batch_size=args.batch_size, jit=jit,
                     desc="ensemble weights")
  train_s = time.perf_counter() - start

  def report(name, p):
    nll = float(pooled_nll(np.asarray(p["theta"]), np.asarray(p["log_scale"]), test_m, test_y))
    print(f"  {name:<28} accuracy {pooled_accuracy(p, test_m, test_y):.3f}  NLL {nll:.3f}")

  print(f"model {args.model}; {len(MEMBERS)} members; member calls {calls_s:.1f} s "
        f"({len(MEMBERS) * (len(train_y) + len(test_y))} calls)")
  print(f"gradient check at the start ({args.estimator}): relative error vs exact "
        f"{rel:.2e}")
  print("held-out:")
  for k, m in enumerate(MEMBERS):
    report(f"member [{k}] alone", {"theta": jnp.full(len(MEMBERS), -1e9).at[k].set(0.0),
                                   "log_scale": jnp.zeros(())})
  report("uniform weights", params)
  report("learned weights", result.params)
  w = np.asarray(jax.nn.softmax(result.params["theta"]))
  print(f"learned weights [{', '.join(f'{v:.3f}' for v in w)}], scale "
        f"{float(np.exp(result.params['log_scale'])):.3f}; training {train_s:.1f} s "
        f"({result.history[-1]['steps']} steps)")
  for k, m in enumerate(MEMBERS):
    print(f"  [{k}] {m}")


if __name__ == "__main__":
  main()
