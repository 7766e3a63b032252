"""Magnitude masks over a parameter pytree: compute them, check them, apply them.

A *mask tree* has the structure of `params`. A selected leaf holds a bool array of
the leaf's shape (`True` = kept); an unselected leaf holds `None`, so no memory is
spent on it. With `jax.tree.map`, pass the mask tree first and
`is_leaf=lambda m: m is None` (as `map_masked` does).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.leaf_selection import Where, path_string, resolve_where
from jaxprune.magnitude_rank import round_fraction_of, smallest_magnitudes

PyTree = Any
Scope = Literal["layer", "global"]


def _is_none(x: Any) -> bool:
  return x is None


def _is_traced(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


def map_masked(fn: Callable[..., Any], masks: PyTree, params: PyTree, *rest: PyTree) -> PyTree:
  """`fn(mask, param, *rest)` on every leaf; `mask` is None for unselected leaves."""
  return jax.tree.map(fn, masks, params, *rest, is_leaf=_is_none)


def _leaf_name(path: str) -> str:
  # nnx.State paths end in the Variable's `value`; a plain-dict mask tree of the same
  # model (`nnx.to_pure_dict`) names the same leaf without it.
  return path.removesuffix("/value")


def check_masks(masks: PyTree, params: PyTree, name: str = "masks") -> PyTree:
  """Validates a mask tree against `params` and returns it in `params`' structure.

  Leaves are matched by path string, so masks whose container types differ but whose
  paths agree (an `nnx.Optimizer`'s `OptVariable`-wrapped masks against
  `Param`-wrapped params) are accepted and re-laid in `params`' structure. Every mask
  must be a bool array of its parameter's shape, or `None`. If `params` is itself a
  mask tree, its `None` leaves must stay `None` and its arrays must get arrays.

  Raises:
    ValueError: naming the first offending path.
  """
  mask_leaves = jax.tree_util.tree_flatten_with_path(masks, is_leaf=_is_none)[0]
  ref_leaves, ref_def = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_none)
  if len(mask_leaves) != len(ref_leaves):
    raise ValueError(
        f"`{name}` has {len(mask_leaves)} leaves but params have {len(ref_leaves)}; "
        "compute masks from the same params tree"
    )
  for (m_path, mask), (r_path, ref) in zip(mask_leaves, ref_leaves):
    where = path_string(r_path)
    if _leaf_name(path_string(m_path)) != _leaf_name(where):
      raise ValueError(f"`{name}` has a leaf at {path_string(m_path)} where params have {where}")
    if mask is None:
      if ref is not None and getattr(ref, "dtype", None) == jnp.bool_:
        raise ValueError(f"`{name}` at {where}: None where a mask is held")
      continue
    if ref is None:
      raise ValueError(f"`{name}` at {where}: a mask for a leaf that is not targeted")
    if getattr(mask, "dtype", None) != jnp.bool_:
      got = getattr(mask, "dtype", type(mask))
      raise ValueError(f"`{name}` at {where}: expected a bool array, got {got}")
    if tuple(mask.shape) != tuple(ref.shape):
      raise ValueError(
          f"`{name}` at {where}: mask shape {tuple(mask.shape)} "
          f"!= parameter shape {tuple(ref.shape)}"
      )
  return jax.tree.unflatten(ref_def, [m for _, m in mask_leaves])


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
  """Zeroes the pruned weights: `where(mask, w, 0)` per selected leaf.

  Args:
    params: the parameter pytree.
    masks: a mask tree of `params` (`None` leaves are passed through).

  Returns:
    `params` with pruned entries set to exactly 0, dtypes and shapes unchanged.

  Example::

    >>> masks = jaxprune.magnitude_masks(params, 0.5, jaxprune.select(params))
    >>> pruned = jaxprune.apply_masks(params, masks)
  """
  masks = check_masks(masks, params)
  return map_masked(
      lambda m, w: w if m is None else jnp.where(m, w, jnp.zeros((), w.dtype)), masks, params
  )


def _check_fraction(name: str, value: Any, upper_open: bool = True) -> Any:
  """Validates a concrete fraction in [0, 1); a traced one is used as given."""
  if _is_traced(value):
    return value
  v = float(value)
  if not (0.0 <= v < 1.0):
    raise ValueError(f"{name} must be in [0, 1), got {value!r}")
  return v


def _check_finite(w: jax.Array, where: str) -> None:
  if _is_traced(w):
    return  # Under jit non-finite weights rank above every finite one (kept).
  if not bool(jnp.isfinite(w).all()):
    raise ValueError(
        f"parameter {where} contains NaN or inf; magnitudes cannot be ranked. "
        "Check the training run that produced it."
    )


def _selected(params: PyTree, where: PyTree, previous: PyTree | None):
  """(index, path, param, previous mask or None) of every selected leaf."""
  leaves_with_path = jax.tree_util.tree_flatten_with_path(params)[0]
  chosen = jax.tree.leaves(where)
  prev = [None] * len(chosen)
  if previous is not None:
    previous = check_masks(previous, params, name="previous")
    prev = jax.tree.leaves(previous, is_leaf=_is_none)
  out = []
  for i, ((path, w), sel) in enumerate(zip(leaves_with_path, chosen)):
    if not sel:
      continue
    if prev[i] is None and previous is not None:
      raise ValueError(
          f"`previous` has no mask for selected leaf {path_string(path)}; "
          "compute it with the same `where`"
      )
    out.append((i, path_string(path), w, prev[i]))
  return out


def _mask_tree(params: PyTree, computed: dict[int, jax.Array]) -> PyTree:
  leaves, treedef = jax.tree.flatten(params)
  return jax.tree.unflatten(treedef, [computed.get(i) for i in range(len(leaves))])


def _prune_count(sparsity: Any, n: int) -> Any:
  if _is_traced(sparsity):
    return round_fraction_of(sparsity, n)
  return int(round(float(sparsity) * n))


def threshold_masks(params: PyTree, threshold: float | jax.Array, where: Where) -> PyTree:
  """Keeps a weight iff `|w| >= threshold`: "prune weights with |w| < threshold".

  Args:
    params: the parameter pytree.
    threshold: a scalar (may be traced); NaN is an error.
    where: bool pytree from `select` (or a callable building one from params).

  Returns:
    A mask tree: bool arrays of each selected leaf's shape, `None` elsewhere.

  Example::

    >>> masks = jaxprune.threshold_masks(params, 1e-2, jaxprune.select(params))
  """
  if not _is_traced(threshold) and math.isnan(float(threshold)):
    raise ValueError(f"threshold must be a number, got {threshold!r}")
  where = resolve_where(where, params)
  return jax.tree.map(
      lambda w, sel: _at_least(w, threshold) if sel else None,
      params,
      where,
  )


def _at_least(w: jax.Array, threshold: Any) -> jax.Array:
  """`|w| >= threshold` exactly, without rounding the threshold to the leaf's dtype.

  Compared in float32 (exact for bfloat16/float16/float32 leaves; float64 stays
  float64). A concrete threshold is rounded *up* to that dtype, so a weight just
  below it is never kept.
  """
  dtype = jnp.promote_types(w.dtype, jnp.float32)
  if _is_traced(threshold):
    t = jnp.asarray(threshold)
    dtype = jnp.promote_types(dtype, t.dtype)
    return jnp.abs(w).astype(dtype) >= t.astype(dtype)
  t = float(threshold)
  with np.errstate(over="ignore"):
    t_rounded = np.asarray(t, dtype)
  if float(t_rounded) < t:
    t_rounded = np.nextafter(t_rounded, np.asarray(np.inf, dtype))
  if dtype == jnp.float32 and t > 0:
    # Compare bit patterns (ordered like non-negative floats): XLA:CPU flushes
    # subnormals to zero in float comparisons, which would keep |w| < t.
    bits = jax.lax.bitcast_convert_type(jnp.abs(w).astype(jnp.float32), jnp.uint32)
    return bits >= np.asarray(t_rounded, np.float32).view(np.uint32)
  return jnp.abs(w).astype(dtype) >= t_rounded


def magnitude_masks(
    params: PyTree,
    sparsity: float | jax.Array,
    where: Where,
    *,
    scope: Scope = "layer",
    previous: PyTree | None = None,
) -> PyTree:
  """Prunes exactly `round(sparsity * n)` smallest-magnitude weights.

  With `scope="layer"`, `n` is the size of each selected leaf and each leaf is
  ranked alone; with `scope="global"`, `n` is the total size of the selected
  leaves and they are ranked together (so layers end with different sparsities).

  Ties (equal magnitudes, many zeros) are broken by position (leaf order, then
  row-major index), so the count is exact and the result deterministic. Weights
  pruned in `previous` stay pruned and are counted first; if `previous` already
  prunes more than the target, the result equals `previous`. Masks never revive
  a weight.

  Selection is a two-pass radix select over the float bit patterns
  (`jaxprune.magnitude_rank`): no sort, about 6 extra bytes per weight, and in
  global scope no concatenation of leaves.

  Args:
    params: the parameter pytree.
    sparsity: target fraction in [0, 1). A Python float gives an exact count; a
      traced scalar (under `jax.jit`) gives `round(sparsity * n)` computed exactly
      in integers from its float32 value, which may differ by one from Python's
      round-half-even at exact halves only. A Python float passed through `jit`
      becomes float32 first (0.3 -> 0.30000001), which can move the count by one
      on leaves of tens of millions of weights.
    where: bool pytree from `select` (or a callable building one from params).
    scope: `"layer"` or `"global"`.
    previous: an earlier mask tree of the same `where`, or None.

  Returns:
    A mask tree: bool arrays (`True` = kept) for selected leaves, `None` elsewhere.

  Raises:
    ValueError: sparsity outside [0, 1), unknown scope, `previous` not matching
      params, or (outside jit) NaN/inf in a selected leaf, naming its path.

  Example::

    >>> where = jaxprune.select(params)                   # output_proj, fc*
    >>> m1 = jaxprune.magnitude_masks(params, 0.5, where)
    >>> m2 = jaxprune.magnitude_masks(params, 0.8, where, previous=m1)
  """
  if scope not in ("layer", "global"):
    raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
  sparsity = _check_fraction("sparsity", sparsity)
  where = resolve_where(where, params)
  chosen = _selected(params, where, previous)
  for _, path, w, _ in chosen:
    _check_finite(w, path)

  computed: dict[int, jax.Array] = {}
  if scope == "layer":
    for i, _, w, prev in chosen:
      pruned = smallest_magnitudes([w], [prev], _prune_count(sparsity, w.size))[0]
      computed[i] = ~pruned if prev is None else prev & ~pruned
  else:
    total = sum(w.size for _, _, w, _ in chosen)
    pruned_all = smallest_magnitudes(
        [w for _, _, w, _ in chosen], [p for *_, p in chosen], _prune_count(sparsity, total)
    )
    for (i, _, _, prev), pruned in zip(chosen, pruned_all):
      computed[i] = ~pruned if prev is None else prev & ~pruned
  return _mask_tree(params, computed)
