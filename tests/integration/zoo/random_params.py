"""Deterministic NumPy values for a tree of abstract params (from `jax.eval_shape`):
the zoo's models get their shapes and paths from their framework's own init, traced
abstractly, and their values from here, with no compilation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.tree import path_string


def fill(abstract, seed: int, weight_std: float = 0.4):
  """Every array leaf of `abstract` drawn from a seeded normal: a leaf named
  `scale` around 1, `bias` (or a norm's mean) around 0 with std 0.1, `var` in
  [1, 2), anything else with std `weight_std`. Other leaves pass through."""
  rng = np.random.default_rng(seed)

  def one(path, leaf):
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
      return leaf
    name = path_string(path[-1:])  # the last key, whole ("" at the root)
    if name == "scale":
      value = 1 + 0.3 * rng.normal(size=leaf.shape)
    elif name in ("bias", "mean"):
      value = 0.1 * rng.normal(size=leaf.shape)
    elif name == "var":
      value = 1 + rng.random(size=leaf.shape)
    else:
      value = weight_std * rng.normal(size=leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(one, abstract)
