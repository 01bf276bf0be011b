"""Pass 2, classify: each equation is orchestration or tensor, by primitive type.

- ``HOST``: a host-call primitive (model call, host op): runs on a pool.
- ``CONTROL``: `cond`, `while` or `scan` whose body makes host calls: the
  scheduler runs it (only the taken branch; iterations in order, the calls
  inside one iteration concurrently).
- ``STREAM``: a chain of batched calls run item by item (streams.py).
- ``TENSOR``: everything else, compiled by XLA in a segment. A higher-order
  primitive the scheduler does not know still runs correctly as a tensor op
  (its host calls then run inside XLA, one after another).
"""
from __future__ import annotations

import enum

from xcs_jax._src.jit.expose import eqn_contains_host_call
from xcs_jax._src.jit.ir import Eqn
from xcs_jax._src.jit.pseudo import STREAM
from xcs_jax._src.primitives import HOST_PRIMITIVES

CONTROL_PRIMITIVES = frozenset({"cond", "while", "scan"})


class Kind(enum.Enum):
  HOST = "host"
  CONTROL = "control"
  STREAM = "stream"
  TENSOR = "tensor"


def classify(eqn: Eqn) -> Kind:
  if eqn.primitive in HOST_PRIMITIVES:
    return Kind.HOST
  if eqn.primitive is STREAM:
    return Kind.STREAM
  if eqn.name in CONTROL_PRIMITIVES and eqn_contains_host_call(eqn):
    return Kind.CONTROL
  return Kind.TENSOR
