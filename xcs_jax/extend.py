"""For people who write providers, as `jax.extend` is for people who extend JAX.

A provider subclasses `Provider`, overrides the calls it can make
(`generate`, `score_options`, `embed`: plain methods run on the runtime's
worker threads, `async def` ones on its event loop), and is registered with
`register_provider(name, ProviderClass)`; each runtime makes its own
instance. Every call gets a `CallContext`: poll `ctx.check()` or sleep
through `ctx.sleep()` (`await ctx.asleep()` in an `async def` method) so a
failed sibling, an interrupt or `ctx.deadline` stops it; an async method is
also cancelled through its task. A `Clock` (`now()`, `wait(event, s)`, and
`sleep(s)` to await on the event loop) is what the runtime reads time from;
tests inject one that does not sleep. Users of providers never need this
module.
"""
from xcs_jax._src.executor import Clock
from xcs_jax._src.providers.base import COMMON_PARAMS
from xcs_jax._src.providers.base import Completion
from xcs_jax._src.providers.base import Provider
from xcs_jax._src.providers.base import TransientError
from xcs_jax._src.providers.base import provider_names
from xcs_jax._src.providers.base import register_provider
from xcs_jax._src.scope import CallContext

__all__ = [
    "COMMON_PARAMS",
    "CallContext",
    "Clock",
    "Completion",
    "Provider",
    "TransientError",
    "provider_names",
    "register_provider",
]
