"""Gradient estimators for host ops: `xcs_jax.host_op(fn, ..., grad=...)`.

`Central` (central differences, 2 calls per parameter) and `SPSA` (random
perturbations, 2 calls per sample) are the estimators; docs/optimization.md
gives their step sizes, sample counts and accuracy.
"""
from xcs_jax._src.grad import DEFAULT_SPSA_SAMPLES
from xcs_jax._src.grad import SPSA
from xcs_jax._src.grad import Central
from xcs_jax._src.grad import HostVJP
from xcs_jax._src.grad import central
from xcs_jax._src.grad import spsa

__all__ = [
    "DEFAULT_SPSA_SAMPLES",
    "SPSA",
    "Central",
    "HostVJP",
    "central",
    "spsa",
]
