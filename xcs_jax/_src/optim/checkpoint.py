"""Saving and restoring learned state (params, optimizer state, ...) as .npz.

Format (version 1): one `.npz` file with the leaves as `leaf_00000`,
`leaf_00001`, ... in `jax.tree_util` order, and `__meta__`, a JSON string with
`format` (1), `treedef` (the `str` of the tree's treedef, for checking) and
`structure` (the tree rebuilt from plain dicts, lists, tuples and None, or
null when the tree holds other nodes such as optax's NamedTuple states).
A tree of plain containers restores without a template; any other tree
restores onto `like`, a tree of the same structure (e.g. a fresh
`optimizer.init(params)`). Files are written atomically (temp file + rename).
Typed PRNG keys are saved as their key data and restored as such.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import jax
import numpy as np

FORMAT_VERSION = 1


def _structure(tree: Any, counter: list) -> Any:
  """A JSON-able description of plain containers, or None if there are others."""
  if tree is None:
    return {"none": None}
  if type(tree) is dict and all(isinstance(k, str) for k in tree):
    items = {k: _structure(tree[k], counter) for k in sorted(tree)}
    return None if any(v is None for v in items.values()) else {"dict": items}
  if type(tree) in (list, tuple):
    items = [_structure(v, counter) for v in tree]
    return None if any(v is None for v in items) else {type(tree).__name__: items}
  if jax.tree_util.all_leaves([tree]):
    counter[0] += 1
    return {"leaf": counter[0] - 1}
  return None


def _build(structure: Any, leaves: list) -> Any:
  (kind, value), = structure.items()
  if kind == "none":
    return None
  if kind == "leaf":
    return leaves[value]
  if kind == "dict":
    return {k: _build(v, leaves) for k, v in value.items()}
  items = [_build(v, leaves) for v in value]
  return tuple(items) if kind == "tuple" else items


def _to_numpy(leaf: Any) -> np.ndarray:
  if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    leaf = jax.random.key_data(leaf)
  return np.asarray(leaf)


def save(path: str | os.PathLike, tree: Any) -> None:
  """Saves a pytree of arrays to `path` (an `.npz` file), atomically.

  Args:
    path: the file to write (its folder must exist).
    tree: any pytree of arrays and scalars: params, `(params, opt_state)`, a
      dict with a step count, ...
  """
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  structure = _structure(tree, [0])
  meta = {"format": FORMAT_VERSION, "treedef": str(treedef), "structure": structure}
  arrays = {f"leaf_{i:05d}": _to_numpy(leaf) for i, leaf in enumerate(leaves)}
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(suffix=".npz", dir=folder)
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, __meta__=np.array(json.dumps(meta)), **arrays)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def restore(path: str | os.PathLike, like: Any = None) -> Any:
  """Restores a pytree saved by `save`.

  Args:
    path: the `.npz` file.
    like: a pytree of the same structure, shapes and dtypes as the saved one
      (values ignored); needed when the tree holds nodes other than dicts,
      lists, tuples and None (optax states, custom classes).

  Returns:
    The tree, with numpy leaves (jax arrays where `like` has jax arrays, typed
    PRNG keys where `like` has them).

  Raises:
    ValueError: not a file made by `save`, or it does not match `like`.
  """
  path = os.fspath(path)
  with np.load(path, allow_pickle=False) as f:
    if "__meta__" not in f.files:
      raise ValueError(f"`restore(path)`: {path} was not written by `xcs_jax.optim.save` "
                       "(no `__meta__`).")
    meta = json.loads(str(f["__meta__"]))
    if meta.get("format") != FORMAT_VERSION:
      raise ValueError(f"`restore(path)`: {path} has checkpoint format "
                       f"{meta.get('format')!r}; this "
                       f"version of xcs_jax reads format {FORMAT_VERSION}.")
    leaves = [f[f"leaf_{i:05d}"] for i in range(len(f.files) - 1)]
  if like is None:
    if meta["structure"] is None:
      raise ValueError(
          f"{path} holds a tree with nodes other than dicts, lists and tuples "
          f"({meta['treedef']}): pass `like=`, a tree of the same structure, "
          "e.g. `restore(path, like=(params, optimizer.init(params)))`.")
    return _build(meta["structure"], leaves)
  like_leaves, like_def = jax.tree_util.tree_flatten(like)
  if str(like_def) != meta["treedef"] or len(like_leaves) != len(leaves):
    raise ValueError(f"{path} holds a tree of structure {meta['treedef']}, but `like` "
                     f"has structure {like_def}: restore onto the tree that was saved.")
  out = []
  for i, (saved, ref) in enumerate(zip(leaves, like_leaves)):
    ref_np = _to_numpy(ref)
    if saved.shape != ref_np.shape or saved.dtype != ref_np.dtype:
      raise ValueError(f"{path}: leaf {i} was saved with shape {saved.shape} and dtype "
                       f"{saved.dtype}; `like` has shape {ref_np.shape} and dtype "
                       f"{ref_np.dtype}.")
    if isinstance(ref, jax.Array):
      if jax.dtypes.issubdtype(ref.dtype, jax.dtypes.prng_key):
        saved = jax.random.wrap_key_data(saved, impl=jax.random.key_impl(ref))
      else:
        saved = jax.numpy.asarray(saved)
    out.append(saved)
  return jax.tree_util.tree_unflatten(like_def, out)
