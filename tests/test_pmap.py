"""`jax.pmap` over 4 forced host devices.

`XLA_FLAGS=--xla_force_host_platform_device_count=4` only takes effect before
jax is imported, so the checks run in a fresh subprocess and report back as
JSON. The 4 per-device calls must overlap: each waits at a 4-party barrier,
which only opens when all 4 are in flight together.
"""
import json
import os
import subprocess
import sys
import textwrap

_SCRIPT = textwrap.dedent(r"""
    import json, threading
    import jax, jax.numpy as jnp, numpy as np
    import xcs_jax
    from xcs_jax import models, text

    assert jax.device_count() == 4, jax.devices()
    report = {}

    # A host op whose 4 calls (one per device) must be in flight together.
    barrier = threading.Barrier(4, timeout=30)
    lock = threading.Lock()
    state = {"now": 0, "peak": 0, "calls": 0}

    @xcs_jax.host_op(out_spec=jax.ShapeDtypeStruct((), jnp.float32), name="meet")
    def meet(x):
      with lock:
        state["now"] += 1; state["calls"] += 1
        state["peak"] = max(state["peak"], state["now"])
      try:
        barrier.wait()
        return np.float32(x.sum())
      finally:
        with lock:
          state["now"] -= 1

    x = jnp.arange(12.0, dtype=jnp.float32).reshape(4, 3)
    report["host_op"] = jax.pmap(meet)(x).tolist()
    report["host_op_want"] = np.asarray(x).sum(-1).tolist()
    report["host_op_state"] = dict(state)

    # A binding under pmap, and pmap of vmap: same values as eager and vmap.
    upper = models.bind("fake:upper", output_bytes=16)
    prompts = [[f"d{d} q{i}" for i in range(3)] for d in range(4)]
    enc = jnp.asarray(text.encode(prompts, 16))
    report["pmap_vmap"] = text.decode(jax.pmap(jax.vmap(upper))(enc))
    # Under xcs_jax.jit the pmap stays one XLA executable whose calls run
    # inside it: the stats say so rather than 'tensor' (no host calls).
    jf = xcs_jax.jit(lambda e: jax.pmap(jax.vmap(upper))(e))
    report["jit_pmap"] = text.decode(jf(enc))
    stats = xcs_jax.get_jit_stats(jf)
    report["jit_pmap_stats"] = [stats[k] for k in (
        "execution_strategy", "orchestration_ops", "xla_call_ops")]
    report["pmap_rows"] = text.decode(jax.pmap(upper)(enc[:, 0]))
    report["eager"] = text.decode(upper(enc))

    # Keys split per device give per-device samples, as under vmap.
    choose = models.bind("fake:choice", choices=tuple("abcdefgh"), output_bytes=4)
    keys = jax.random.split(jax.random.key(0), 4)
    one = enc[0, 0]
    report["pmap_keys"] = text.decode(jax.pmap(lambda k: choose(one, key=k))(keys))
    report["vmap_keys"] = text.decode(jax.vmap(lambda k: choose(one, key=k))(keys))
    print("REPORT" + json.dumps(report))
""")


def test_pmap_over_four_host_devices():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      " --xla_force_host_platform_device_count=4").strip()
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True,
                        text=True, timeout=180)
  assert proc.returncode == 0, proc.stderr[-4000:]
  (line,) = [l for l in proc.stdout.splitlines() if l.startswith("REPORT")]
  r = json.loads(line[len("REPORT"):])

  assert r["host_op"] == r["host_op_want"]
  # The barrier opened: all 4 device calls were in flight at once.
  assert r["host_op_state"] == {"now": 0, "peak": 4, "calls": 4}

  want = [[f"D{d} Q{i}" for i in range(3)] for d in range(4)]
  assert r["pmap_vmap"] == want == r["eager"] == r["jit_pmap"]
  assert r["jit_pmap_stats"] == ["callbacks", 0, 1]
  assert r["pmap_rows"] == [row[0] for row in want]

  assert r["pmap_keys"] == r["vmap_keys"]
  assert set(r["pmap_keys"]) <= set("abcdefgh")
