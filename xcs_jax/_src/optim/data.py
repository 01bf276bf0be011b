"""Minibatches of a dataset held as a pytree of arrays."""
from __future__ import annotations

from typing import Any, Iterator

import jax
import numpy as np

from xcs_jax._src import checks


def dataset_size(data: Any) -> int:
  """The shared leading dimension of every leaf of `data`."""
  leaves = jax.tree_util.tree_leaves(data)
  if not leaves:
    raise ValueError("`data` (the dataset) is empty: give a pytree of arrays with a "
                     "leading example axis, e.g. {'x': x, 'y': y}.")
  sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
  if len(sizes) != 1 or None in sizes:
    raise ValueError("every leaf of `data` (the dataset) must have the same leading "
                     f"(example) axis; got leading sizes {sorted(map(str, sizes))}.")
  return sizes.pop()


def minibatches(data: Any, batch_size: int, *, key: jax.Array | None = None,
                drop_remainder: bool = True) -> Iterator[Any]:
  """One epoch of minibatches of `data`, shuffled by `key`.

  Args:
    data: a pytree of arrays sharing a leading example axis.
    batch_size: examples per batch.
    key: a JAX PRNG key for the order (None: the dataset's order).
    drop_remainder: drop the last, smaller batch, so every batch has one shape
      and a jitted step compiles once. With False it is yielded too.

  Yields:
    pytrees like `data` with leading axis `batch_size`.
  """
  n = dataset_size(data)
  batch_size = checks.check_int(batch_size, "minibatches(data, batch_size=...)",
                                min_value=1)
  drop_remainder = checks.check_bool(drop_remainder,
                                     "minibatches(..., drop_remainder=...)")
  if key is not None:
    checks.check_prng_key(key, "minibatches(..., key=...)")
  if batch_size > n and drop_remainder:
    raise ValueError(f"`batch_size={batch_size}` is larger than the dataset ({n} "
                     "examples): lower it, or pass `drop_remainder=False`.")
  order = (np.arange(n) if key is None
           else np.asarray(jax.random.permutation(key, n)))
  stop = n - n % batch_size if drop_remainder else n
  for start in range(0, stop, batch_size):
    idx = order[start:start + batch_size]
    yield jax.tree_util.tree_map(lambda leaf: np.asarray(leaf)[idx], data)


def num_batches(n: int, batch_size: int, drop_remainder: bool = True) -> int:
  return n // batch_size if drop_remainder else -(-n // batch_size)
