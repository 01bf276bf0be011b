"""`xcs_jax.models.mesh`: one model served by several replicas, as one binding.

A `ModelMesh` is a `ModelBinding` (hashable, frozen: a valid primitive
param under `jax.jit`, `vmap`, `xcs_jax.jit` and streams) whose calls go to
its replicas: several llama.cpp servers, an OpenAI-compatible server and the
local model, regions of one API. It has the same calls (generate with
`key=`, `score_options`, `embed`, `usage()`, `concurrency()`) and `stats()`.

Replicas must be interchangeable, which is checked when the mesh is made:
the same model name; the same `SHARED_PARAMS` (what they return); replicas
of one provider the same parameters but their endpoint (`base_url`); the
same embedding width where they can embed. Each keeps its own endpoint's
concurrency limit and rate limiter, its `timeout_s` per attempt and its
usage row; the mesh has the call-level parameters (`deadline_s`, `retries`,
`cache`, `concurrency`) and its own usage row. Routing, failover and hedging:
`mesh_router.py`; each replica's load and health: `mesh_replica.py`.
"""
from __future__ import annotations

from typing import Any, Sequence

from xcs_jax._src import checks
from xcs_jax._src.binding_ops import provider_of
from xcs_jax._src.mesh_replica import ReplicaStats, replica_embedding_dim
from xcs_jax._src.mesh_router import MeshRouter
from xcs_jax._src.models import ModelBinding
from xcs_jax._src.runtime import Runtime, current_runtime

STRATEGIES = ("least_loaded", "round_robin", "weighted")
SHARED_PARAMS = ("temperature", "max_tokens", "system_prompt", "seed", "output_bytes",
                 "overflow")
"""What every replica must agree on: it decides what they return."""
CALL_PARAMS = ("deadline_s", "retries", "cache")
"""A mesh call's own; by default the replicas' value, where they agree."""
ENDPOINT_PARAMS = frozenset({"base_url"})
"""What replicas of one provider may differ in: where they are."""
DEFAULTS = {"strategy": "least_loaded", "weights": None, "hedge_after_s": None,
            "eject_after": 3, "cooldown_s": 10.0, "concurrency": None}
"""The mesh's own options and their defaults (beside `CALL_PARAMS`)."""


class _FromReplicas:
  def __repr__(self) -> str:
    return "FROM_REPLICAS"


FROM_REPLICAS = _FromReplicas()
"""The default of `CALL_PARAMS`: the value every replica has."""


class ModelMesh(ModelBinding):
  """A `ModelBinding` over several replicas of one model; see `mesh`.

  Its `provider` is ``"mesh"``, its `model` the replicas' model, and its
  params the mesh's options, the shared answer parameters and `replicas`.
  """

  @property
  def replicas(self) -> tuple[ModelBinding, ...]:
    return self.get("replicas")

  def router(self, runtime: Runtime) -> MeshRouter:
    """This mesh's router in `runtime` (its state there: health, load, latencies)."""
    return runtime.component(("mesh", self), lambda: MeshRouter(self, runtime))

  def stats(self) -> tuple[ReplicaStats, ...]:
    """Per replica, in order, what the current runtime knows of it: calls,
    failures, hedges, wins, outstanding, latency p50/p95, ejected."""
    return self.router(current_runtime()).stats()

  def replace(self, **params: Any) -> "ModelMesh":
    """A copy with some parameters changed: the mesh's own options on the
    mesh, every other parameter on each replica."""
    own = {k: v for k, v in params.items() if k in DEFAULTS or k in CALL_PARAMS}
    rest = {k: v for k, v in params.items() if k not in own}
    replicas = tuple(r.replace(**rest) for r in self.replicas) if rest else self.replicas
    options = {k: self.get(k) for k in (*DEFAULTS, *CALL_PARAMS)}
    return mesh(replicas, **{**options, **own})

  def __str__(self) -> str:
    changed = [f"{k}={self.get(k)!r}" for k, v in DEFAULTS.items() if self.get(k) != v]
    return (f"mesh({', '.join(map(str, self.replicas))}"
            + (f"; {', '.join(changed)}" if changed else "") + ")")

  def __repr__(self) -> str:
    return f"ModelMesh({str(self)!r})"


def mesh(bindings: Sequence[ModelBinding], *, strategy: str = "least_loaded",
         weights: Sequence[float] | None = None, hedge_after_s: float | str | None = None,
         eject_after: int = 3, cooldown_s: float = 10.0, concurrency: int | None = None,
         deadline_s: Any = FROM_REPLICAS, retries: Any = FROM_REPLICAS,
         cache: Any = FROM_REPLICAS) -> ModelMesh:
  """One model served by several replicas, as one binding.

  Args:
    bindings: the replicas, bindings of one model (`xcs_jax.models.bind`)
      that give the same answers (see the module doc); each keeps its own
      endpoint's concurrency limit, rate limits and `timeout_s`.
    strategy: how calls are spread: ``"least_loaded"`` (fewest attempts in
      flight relative to each replica's concurrency), ``"round_robin"`` or
      ``"weighted"`` (in proportion to `weights`).
    weights: with ``strategy="weighted"``, one positive number per binding.
    hedge_after_s: a number of seconds, or ``"p95"`` (the 95th percentile of
      the mesh's measured latencies): an attempt still running then is also
      sent to a second replica; the first answer wins, the other is
      cancelled. None: no hedging.
    eject_after: transient failures in a row that eject a replica.
    cooldown_s: how long an ejected replica rests before a call probes it.
    concurrency: calls of the mesh in flight at once (default: the sum of
      the replicas').
    deadline_s, retries, cache: as for `bind`, for the mesh's calls
      (failover and hedging happen within them). Default: the replicas'
      value; where they disagree, pass one.

  Returns:
    A hashable `ModelMesh`: call it, `score_options` and `embed` with it as
    with a binding; `stats()` per replica.

  Raises:
    TypeError / ValueError: bad arguments, or replicas that cannot be
      interchanged (another model, other answer parameters, other embedding
      widths).

  Examples:
    >>> servers = [models.bind("openai:smollm2", base_url=url, api_key_env=None)
    ...            for url in ("http://10.0.0.1:8000/v1", "http://10.0.0.2:8000/v1")]
    >>> m = models.mesh(servers, hedge_after_s="p95")
    >>> answers = jax.vmap(m)(prompts)
  """
  replicas = _checked_replicas(bindings)
  runtime = current_runtime()
  _check_interchangeable(replicas, runtime)
  widths = [replica_embedding_dim(provider_of(b, runtime), b) for b in replicas]
  known = sorted({w for w in widths if w is not None})
  if len(known) > 1:
    i, j = widths.index(known[0]), widths.index(known[1])
    raise ValueError(
        f"`mesh(bindings)`: replicas that can embed must give vectors of one width; "
        f"replica {i} ({replicas[i]}) gives {known[0]} and replica {j} ({replicas[j]}) "
        f"gives {known[1]}. Mesh replicas of one embedding model.")
  options = _checked_options(replicas, strategy=strategy, weights=weights,
                             hedge_after_s=hedge_after_s, eject_after=eject_after,
                             cooldown_s=cooldown_s, concurrency=concurrency)
  for name, given in (("deadline_s", deadline_s), ("retries", retries), ("cache", cache)):
    options[name] = _call_param(replicas, name, given)
  checks.check_retries_end(options["retries"], options["deadline_s"], "mesh(bindings)")
  params = {**{name: replicas[0].get(name) for name in SHARED_PARAMS}, **options,
            "replicas": replicas, "embedding_dim": known[0] if known else None}
  return ModelMesh("mesh", replicas[0].model, tuple(sorted(params.items())))


def _checked_replicas(bindings: Any) -> tuple[ModelBinding, ...]:
  if not isinstance(bindings, (list, tuple)):
    checks.fail(TypeError, "mesh(bindings)",
                "a list or tuple of bindings from `xcs_jax.models.bind`", bindings)
  replicas = tuple(bindings)
  if not replicas:
    raise ValueError("`mesh(bindings)` needs at least one binding; got none.")
  for i, b in enumerate(replicas):
    if isinstance(b, ModelMesh):
      raise TypeError(f"`mesh(bindings)`: replica {i} is itself a mesh ({b}); list its "
                      "replicas in this mesh instead.")
    if not isinstance(b, ModelBinding):
      checks.fail(TypeError, f"mesh(bindings[{i}])", "a binding from `xcs_jax.models.bind`",
                  b)
    if replicas.index(b) != i:
      raise ValueError(f"`mesh(bindings)`: replicas {replicas.index(b)} and {i} are the "
                       f"same binding ({b}); list each endpoint once (use `weights` to "
                       "send one more calls).")
  return replicas


def _check_interchangeable(replicas: tuple[ModelBinding, ...], runtime: Runtime) -> None:
  """Raises unless every replica gives the answers the first one gives."""
  first = replicas[0]
  seen: dict[str, tuple[int, dict]] = {}
  for i, b in enumerate(replicas):
    if b.model != first.model:
      raise ValueError(
          f"`mesh(bindings)`: replicas must serve one model; replica 0 ({first}) is "
          f"{first.model!r} but replica {i} ({b}) is {b.model!r}. Serve it under one "
          "name (e.g. the server's model alias).")
    for name in SHARED_PARAMS:
      if b.get(name) != first.get(name):
        raise ValueError(
            f"`mesh(bindings)`: replicas must return the same answers, but replica 0 "
            f"has `{name}={first.get(name)!r}` and replica {i} ({b}) has "
            f"`{name}={b.get(name)!r}`. Bind them with the same `{name}`.")
    # Within one provider, every answer-changing parameter but the endpoint.
    own = {x[0]: x for x in provider_of(b, runtime).cache_identity(b)[2:]
           if x[0] not in ENDPOINT_PARAMS}
    if b.provider not in seen:
      seen[b.provider] = (i, own)
      continue
    j, other = seen[b.provider]
    differ = sorted(k for k in own.keys() | other.keys() if own.get(k) != other.get(k))
    if differ:
      raise ValueError(
          f"`mesh(bindings)`: replicas {j} ({replicas[j]}) and {i} ({b}) of provider "
          f"`{b.provider}` differ in `{differ[0]}`, which changes their answers: bind "
          "them alike but for their endpoint (`base_url`).")


def _checked_options(replicas, **options) -> dict[str, Any]:
  def arg(name):
    return f"mesh(..., {name}=...)"

  checks.check_one_of(options["strategy"], arg("strategy"), STRATEGIES)
  weights = options["weights"]
  if options["strategy"] == "weighted":
    expected = f"one positive number per binding ({len(replicas)})"
    if not isinstance(weights, (list, tuple)) or len(weights) != len(replicas):
      checks.fail(TypeError if not isinstance(weights, (list, tuple)) else ValueError,
                  arg("weights"), expected, weights, "Pass weights beside the bindings.")
    options["weights"] = tuple(
        checks.check_number(w, checks.item_of(arg("weights"), i), min_value=0,
                            min_open=True) for i, w in enumerate(weights))
  elif weights is not None:
    checks.fail(ValueError, arg("weights"), f"None with strategy={options['strategy']!r}",
                weights, "Weights need strategy='weighted'.")
  hedge = options["hedge_after_s"]
  if hedge is not None and hedge != "p95":
    expected = 'a number of seconds in (0, 1e9], "p95" or None'
    if not checks.is_real(hedge):
      checks.fail(TypeError, arg("hedge_after_s"), expected, hedge, "None: no hedging.")
    if not 0 < float(hedge) <= checks.MAX_SECONDS:   # NaN fails too
      checks.fail(ValueError, arg("hedge_after_s"), expected, hedge, "None: no hedging.")
    options["hedge_after_s"] = float(hedge)
  options["eject_after"] = checks.check_int(
      options["eject_after"], arg("eject_after"), min_value=1,
      fix="It counts transient failures in a row.")
  options["cooldown_s"] = checks.check_seconds(options["cooldown_s"], arg("cooldown_s"),
                                               none_ok=False)
  options["concurrency"] = checks.check_int(
      options["concurrency"], arg("concurrency"), min_value=1, none_ok=True,
      fix="None: the sum of the replicas'.")
  return options


def _call_param(replicas, name: str, given: Any) -> Any:
  if given is FROM_REPLICAS:
    values = list(dict.fromkeys(b.get(name) for b in replicas))
    if len(values) > 1:
      raise ValueError(
          f"`mesh(bindings)`: the replicas disagree on `{name}` "
          f"({', '.join(map(repr, values))}), and a mesh call has one: pass "
          f"`mesh(..., {name}=...)`.")
    return values[0]
  what = f"mesh(..., {name}=...)"
  if name == "deadline_s":
    return checks.check_seconds(given, what)
  if name == "retries":
    return checks.check_int(given, what, min_value=0, none_ok=True,
                            fix="None: retry until `deadline_s`.")
  return checks.check_one_of(given, what, ("auto", "memory", "disk", None))
