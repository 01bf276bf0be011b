"""Model bindings: `bind("provider:model", **params)`, and `mesh([...])` of replicas.

Writing a provider? Its API lives in `xcs_jax.extend` (`Provider`,
`register_provider`, `CallContext`, `Completion`, `TransientError`).
"""
import warnings as _warnings

from xcs_jax._src.mesh import ModelMesh
from xcs_jax._src.mesh import mesh
from xcs_jax._src.mesh_replica import ReplicaStats
from xcs_jax._src.models import ModelBinding
from xcs_jax._src.models import bind
from xcs_jax._src.providers import anthropic as _anthropic  # noqa: F401  (registers "anthropic")
from xcs_jax._src.providers import fake as _fake  # noqa: F401  (registers "fake")
from xcs_jax._src.providers import local as _local  # noqa: F401  (registers "local")
from xcs_jax._src.providers import openai as _openai  # noqa: F401  (registers "openai")
from xcs_jax._src.providers.base import provider_names
from xcs_jax._src.providers.openai import CHATML
from xcs_jax._src.usage import Usage

__all__ = [
    "CHATML",
    "ModelBinding",
    "ModelMesh",
    "ReplicaStats",
    "Usage",
    "bind",
    "mesh",
    "provider_names",
]

# Names that moved to `xcs_jax.extend` (the provider extension API).
_MOVED = {"Provider", "register_provider", "Completion", "TransientError"}


def __getattr__(name: str):
  if name in _MOVED:
    _warnings.warn(f"`xcs_jax.models.{name}` moved to `xcs_jax.extend.{name}`; the old "
                   "name will be removed.", DeprecationWarning, stacklevel=2)
    from xcs_jax import extend
    return getattr(extend, name)
  raise AttributeError(f"module 'xcs_jax.models' has no attribute {name!r}")
