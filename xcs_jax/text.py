"""Text as fixed-capacity UTF-8 uint8 arrays."""
from xcs_jax._src.text import decode
from xcs_jax._src.text import encode

__all__ = ["decode", "encode"]
