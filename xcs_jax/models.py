"""Model bindings and providers."""
from xcs_jax._src.models import ModelBinding
from xcs_jax._src.models import bind
from xcs_jax._src.providers import anthropic as _anthropic  # noqa: F401  (registers "anthropic")
from xcs_jax._src.providers import fake as _fake  # noqa: F401  (registers "fake")
from xcs_jax._src.providers import local as _local  # noqa: F401  (registers "local")
from xcs_jax._src.providers import openai as _openai  # noqa: F401  (registers "openai")
from xcs_jax._src.providers.base import Completion
from xcs_jax._src.providers.base import Provider
from xcs_jax._src.providers.base import TransientError
from xcs_jax._src.providers.base import Usage
from xcs_jax._src.providers.base import provider_names
from xcs_jax._src.providers.base import register_provider

__all__ = [
    "Completion",
    "ModelBinding",
    "Provider",
    "TransientError",
    "Usage",
    "bind",
    "provider_names",
    "register_provider",
]
