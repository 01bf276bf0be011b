"""Gradient estimators and optimization steps.

(a) Accuracy of `host_op(..., grad=...)` against analytic gradients, eagerly
    (no compile per estimator): `central` relative error on `sum(sin(x))`
    (d = 8) and a quadratic form `x^T A x + b.x` (d = 6) in float32 and
    float64; `spsa` cosine similarity to the true gradient of `sum(sin(x))`
    (d = 8) over 20 seeds at n in {16, 64, 128}, with its mean, standard
    deviation, minimum and the predicted mean `(1 + (d - 1) / n) ** -0.5`.
    Bars: central float64 relative error <= 1e-3; spsa at n = 128 (d = 8):
    every seed's cosine >= 0.9.
(b) One training step (value_and_grad + optax.adam) of a hybrid loss under
    `xcs_jax.jit` beside the same step under plain `jax.jit`, on `fake`
    bindings with 100 ms latency:
    - "ensemble": K = 4 member call sites (`score_options`, each vmapped over
      a batch of 8 prompts: one batched host call per site), pooled by a
      host-side evaluator with `grad='central'` (50 ms per evaluation; its
      2 (K + 1) + 1 evaluations are one concurrent batched call). Plain jax.jit
      runs the 4 sites one after another (~4 x 100 ms + 50 ms); xcs_jax.jit
      runs them at once (critical path ~100 + 50 ms). Bar: xcs_jax.jit wall
      <= 1.3 x that critical path.
    - "reinforce": the prompt-optimization step (4 sampled instructions x 8
      prompts, ONE call site, vmapped): a single batched call either way, so no
      speedup is expected; shown for honesty.
    Median of 5 warm calls each.

Usage:
  python benchmarks/bench_optim.py [--out benchmarks/results/optim.json]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import xcs_jax
from xcs_jax import models, optim, text

import environment  # (timed without the response cache: see environment.py)

HERE = os.path.dirname(os.path.abspath(__file__))
LATENCY_S = 0.1
EVAL_LATENCY_S = 0.05
K, B, S = 4, 8, 4
LABELS = ("yes", "no")


def _x64():
  try:
    return jax.enable_x64(True)
  except (AttributeError, TypeError):  # older jax
    from jax.experimental import enable_x64
    return enable_x64()


def bench_accuracy() -> dict:
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(6, 6)), rng.normal(size=6)
  cases = {
      "sum(sin(x)), d=8": (lambda x: np.sum(np.sin(x)).astype(x.dtype),
                          lambda x: np.cos(x), np.linspace(-2.0, 3.0, 8)),
      "x^T A x + b.x, d=6": (lambda x: (x @ a @ x + b @ x).astype(x.dtype),
                             lambda x: (a + a.T) @ x + b, rng.normal(size=6) * 3),
  }
  spec = lambda x: jax.ShapeDtypeStruct((), x.dtype)
  central = []
  for name, (fn, grad_fn, x0) in cases.items():
    for dtype in ("float32", "float64"):
      with (_x64() if dtype == "float64" else contextlib.nullcontext()):
        x = jnp.asarray(x0, dtype)
        op = xcs_jax.host_op(fn, out_spec=spec, grad="central")
        g = np.asarray(jax.grad(op)(x), np.float64)
        want = grad_fn(np.asarray(x, np.float64))
        central.append(dict(case=name, dtype=dtype,
                            rel_error=float(np.linalg.norm(g - want) / np.linalg.norm(want))))
  fn, grad_fn, x0 = cases["sum(sin(x)), d=8"]
  x = jnp.asarray(x0, jnp.float32)
  want = grad_fn(np.asarray(x, np.float64))
  spsa = []
  for n in (16, 64, 128):
    cos, ests = [], []
    for seed in range(20):
      op = xcs_jax.host_op(fn, out_spec=spec, grad=xcs_jax.grad.spsa(n, seed=seed))
      g = np.asarray(jax.grad(op)(x), np.float64)
      ests.append(g)
      cos.append(float(g @ want / np.linalg.norm(g) / np.linalg.norm(want)))
    spsa.append(dict(n=n, d=8, cos_mean=float(np.mean(cos)), cos_std=float(np.std(cos)),
                     cos_min=float(np.min(cos)), predicted=(1 + 7 / n) ** -0.5,
                     variance=float(np.var(np.stack(ests), axis=0).sum()),
                     evaluations=2 * n + 1))
  return dict(central=central, spsa=spsa)


def _median_wall(fn, *args, repeats=5) -> float:
  jax.block_until_ready(fn(*args))  # compile / plan
  walls = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    walls.append(time.perf_counter() - start)
  return statistics.median(walls)


def ensemble_step():
  members = [models.bind("fake:echo", latency_s=LATENCY_S, option_bias=(0.5 * k,))
             for k in range(K)]

  def pooled_nll(theta, member_logp, labels):
    time.sleep(EVAL_LATENCY_S)
    w = np.exp(theta - theta.max()) / np.exp(theta - theta.max()).sum()
    z = np.einsum("k,bkc->bc", w, member_logp)
    z = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return np.float32(-np.take_along_axis(z, labels[:, None], 1).mean())

  evaluator = xcs_jax.host_op(pooled_nll, out_spec=jax.ShapeDtypeStruct((), jnp.float32),
                              grad="central", name="pooled_nll")

  def loss_fn(params, batch, key):
    logp = jnp.stack([m.score_options(batch["prompts"], LABELS) for m in members], axis=1)
    return evaluator(params, logp, batch["y"]), {}

  opt = optax.adam(0.1)
  params = jnp.zeros(K)
  batch = {"prompts": text.encode([f"question {i}: yes or no?" for i in range(B)], 64),
           "y": jnp.arange(B) % 2}
  return optim.make_step(loss_fn, opt), (params, opt.init(params), batch, jax.random.key(0))


def reinforce_step():
  llm = models.bind("fake:echo", latency_s=LATENCY_S)
  prompts = jnp.stack([text.encode([f"instruction {k}: item {i}" for i in range(B)], 64)
                       for k in range(K)])

  def loss_fn(logits, batch, key):
    def loss_of_choice(c):
      logp = jax.nn.log_softmax(llm.score_options(jnp.take(prompts, c, axis=0), LABELS))
      return -jnp.take_along_axis(logp, batch["y"][:, None], 1).mean()
    out = optim.reinforce(loss_of_choice, logits, key, num_samples=S)
    return out.loss, {}

  opt = optax.adam(0.1)
  logits = jnp.zeros(K)
  return optim.make_step(loss_fn, opt), (logits, opt.init(logits), {"y": jnp.arange(B) % 2},
                                         jax.random.key(0))


def bench_steps() -> list[dict]:
  rows = []
  for name, make, critical in (
      ("ensemble (K=4 sites + central)", ensemble_step, LATENCY_S + EVAL_LATENCY_S),
      ("reinforce (1 site, S x B batched)", reinforce_step, LATENCY_S)):
    step, args = make()
    plain = _median_wall(jax.jit(step), *args)
    row = dict(step=name, jax_jit_s=plain, critical_path_s=critical)
    if hasattr(xcs_jax, "jit"):
      xla = jax.jit(step)(*args)
      xcs = xcs_jax.jit(step)(*args)
      np.testing.assert_allclose(np.asarray(xla.params), np.asarray(xcs.params), rtol=1e-5)
      row["xcs_jit_s"] = _median_wall(xcs_jax.jit(step), *args)
      row["speedup"] = plain / row["xcs_jit_s"]
    rows.append(row)
  return rows


def render(acc, steps, env) -> str:
  out = [f"jax {env['jax']}, Python {env['python']}, {env['cpus']} CPUs "
         f"({env['machine']}), {env['date'][:10]}, load average {env['load_before']:.1f}", "",
         "**(a) `central` relative error vs analytic gradient (eager)**", "",
         "| function | dtype | relative error |", "|---|---|---|"]
  out += [f"| {r['case']} | {r['dtype']} | {r['rel_error']:.1e} |" for r in acc["central"]]
  out += ["", "**(a) `spsa` cosine similarity to the true gradient of sum(sin(x)), d = 8, "
          "20 seeds**", "",
          "| n | host evaluations | mean | std | min | predicted mean | total variance |",
          "|---|---|---|---|---|---|---|"]
  out += [f"| {r['n']} | {r['evaluations']} | {r['cos_mean']:.3f} | {r['cos_std']:.3f} | "
          f"{r['cos_min']:.3f} | {r['predicted']:.3f} | {r['variance']:.3f} |"
          for r in acc["spsa"]]
  out += ["", f"**(b) one training step (value_and_grad + adam), fake latency "
          f"{LATENCY_S * 1e3:.0f} ms, evaluator {EVAL_LATENCY_S * 1e3:.0f} ms; median of 5**", "",
          "| step | jax.jit | xcs_jax.jit | speedup | critical path |", "|---|---|---|---|---|"]
  for r in steps:
    xcs = (f"{r['xcs_jit_s'] * 1e3:.0f} ms" if "xcs_jit_s" in r else "pending")
    sp = f"{r['speedup']:.2f}x" if "speedup" in r else "pending"
    out.append(f"| {r['step']} | {r['jax_jit_s'] * 1e3:.0f} ms | {xcs} | {sp} | "
               f"{r['critical_path_s'] * 1e3:.0f} ms |")
  return "\n".join(out)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=os.path.join(HERE, "results", "optim.json"))
  args = parser.parse_args(argv)
  env = environment.describe("bench_optim.py", argv)
  acc = bench_accuracy()
  steps = bench_steps()
  table = render(acc, steps, env)
  print(table)
  environment.save(args.out, env, dict(accuracy=acc, steps=steps), table)
  missed = []
  if max(r["rel_error"] for r in acc["central"] if r["dtype"] == "float64") > 1e-3:
    missed.append("central float64 relative error > 1e-3")
  if next(r for r in acc["spsa"] if r["n"] == 128)["cos_min"] < 0.9:
    missed.append("spsa n=128 cosine < 0.9")
  ens = steps[0]
  if "xcs_jit_s" in ens and ens["xcs_jit_s"] > 1.3 * ens["critical_path_s"]:
    missed.append("ensemble step under xcs_jax.jit > 1.3 x critical path")
  if missed:
    print("\nmissed:", "; ".join(missed))
  return 1 if missed else 0


if __name__ == "__main__":
  sys.exit(main())
