"""N:M structured sparsity: at most `n` kept weights in every group of `m`.

A 2:4 pattern (2 kept of every 4 consecutive weights along the input axis) is what
GPU sparse tensor cores execute at up to twice the dense throughput. Groups run
along the *input* (contraction) axis: for a Flax kernel `(in, out)` that is axis
-2, and it stays -2 for stacked expert kernels `(E, in, out)`.

Within a group the `n` largest magnitudes are kept; equal magnitudes are broken by
position (the earlier weight is kept), so the result is deterministic. The rank
of each weight comes from `m` elementwise comparison passes over the leaf (no
sort, no transpose, one int32 per weight of scratch), which suits the small `m`
of hardware patterns (4, 8, 16).
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxprune._src.engine.magnitude_rank import KEYS
from jaxprune._src.methods.masks import check_finite
from jaxprune._src.methods.scores import ranks_by
from jaxprune._src.oneshot.layouts import input_axes_of
from jaxprune._src.tree.leaf_selection import Where, select
from jaxprune._src.tree.mask_tree import masks_from, resolve_where, selected_leaves, slots
from jaxprune._src.types import PyTree


def check_nm(n: Any, m: Any) -> tuple[int, int]:
  """Validates a static N:M pattern, `0 < n < m`, both integers (not traced)."""
  for name, v in (("n", n), ("m", m)):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
      raise ValueError(f"{name} must be an int (static under jit), got {v!r}")
  n, m = int(n), int(m)
  if not 0 < n < m:
    raise ValueError(f"an N:M pattern needs 0 < n < m, got n={n}, m={m}")
  return n, m


def _last_input_axis(axis: Any, path: str, w: Any, score: Any) -> int:
  """The axis N:M groups of leaf `path` run along: `axis` if an int, else the last
  of its input axes (from a `Layouts`, or the score's statistics; else -2)."""
  if axis is None and getattr(score, "input_axes", None) is None:
    axis = -2
  if isinstance(axis, int) and not isinstance(axis, bool):
    return axis  # checked against the leaf's shape by _group_axis
  return input_axes_of(axis, path, tuple(w.shape), score=score, what="N:M")[-1]


def _group_axis(shape: tuple[int, ...], axis: int, m: int, where: str) -> int:
  """`axis` made non-negative for `shape`, after checking it splits into groups of `m`."""
  ndim = len(shape)
  if not -ndim <= axis < ndim:
    raise ValueError(
        f"leaf {where} of shape {shape} has no axis {axis} to form N:M groups along; "
        "exclude it from `where` or pass another `axis`"
    )
  axis %= ndim
  if shape[axis] % m:
    raise ValueError(
        f"leaf {where} of shape {shape}: axis {axis} has length {shape[axis]}, "
        f"not a multiple of m={m}, so it cannot be split into groups of {m}; "
        "exclude it from `where` or pass another `axis`"
    )
  return axis


def _grouped(x: jax.Array, axis: int, m: int) -> jax.Array:
  """`x` with `axis` split into `(length // m, m)`: group members on `axis + 1`.

  A reshape of adjacent dimensions, so no transpose and no data movement.
  """
  shape = x.shape
  return x.reshape(shape[:axis] + (shape[axis] // m, m) + shape[axis + 1 :])


def _group_keep(keys: jax.Array, n: int, m: int, axis: int) -> jax.Array:
  """Keeps the `n` largest keys of every group of `m` along `axis`, shape of `keys`.

  For member `i` of a group, `rank_i = #{j : key_j > key_i or (key_j == key_i and
  j < i)}`, the number of members that beat it; it is kept iff `rank_i < n`.
  The ranks of a group are a permutation of `0..m-1`, so exactly `n` are kept.
  """
  g = _grouped(keys, axis, m)
  member = axis + 1
  position = lax.broadcasted_iota(jnp.int32, g.shape, member)
  rank = jnp.zeros(g.shape, jnp.int32)
  for j in range(m):  # m passes over the leaf instead of an (m, m) comparison tensor.
    kj = lax.slice_in_dim(g, j, j + 1, axis=member)
    beats = (kj > g) | ((kj == g) & (position > j))
    rank = rank + beats.astype(jnp.int32)
  return (rank < n).reshape(keys.shape)


# Jitted so that eager calls compile once per shape instead of dispatching m passes op by op.
@functools.partial(jax.jit, static_argnames=("n", "m", "axis", "by"))
def _nm_leaf(w: jax.Array, kept: jax.Array | None, n: int, m: int, axis: int,
             by: str = "magnitude") -> jax.Array:
  keep = _group_keep(KEYS[by](w, kept), n, m, axis)
  # Previously pruned weights have key 0 and rank last, so they only enter the top
  # `n` of a group that has fewer than `n` survivors; `& kept` prunes them again.
  return keep if kept is None else keep & kept


def nm_masks(
    params: PyTree,
    n: int = 2,
    m: int = 4,
    where: Where | None = None,
    *,
    axis: int | Mapping[str, Any] | None = None,
    previous: PyTree | None = None,
    score: Any = None,
) -> PyTree:
  """N:M structured masks: the `n` largest `|w|` of every `m` consecutive weights kept.

  Each selected leaf `w` is split along `axis` into groups of `m` consecutive
  entries (every other index fixed). Writing `G = w.shape[axis] // m`, a kernel
  `(in, out)` with `axis=-2` is viewed as `(G, m, out)` and, for every `(g, o)`,
  `mask[g*m:(g+1)*m, o]` keeps the `n` members with the largest `|w|`. The
  sparsity is exactly `1 - n/m` per group.

  Ties are broken by position: of equal magnitudes the earlier member (lower index
  along `axis`) is kept. Magnitudes are ranked as in `ranked_masks` (through
  float32; NaN ranks above +inf).

  With `previous`, a weight pruned there stays pruned: each group keeps the `n`
  largest of its surviving weights, so a group with fewer than `n` survivors keeps
  only those. Every group then prunes *at least* `m - n` weights (the pattern is
  still valid N:M; `nm_violations` is zero).

  Jittable: `n`, `m`, `axis` and `where` are static (close over them).

  Args:
    params: the parameter pytree.
    n: weights kept per group, `0 < n < m` (Python int).
    m: group size (Python int); `w.shape[axis]` must be a multiple of `m`.
    where: bool pytree from `select` (or a callable building one from params);
      None means `select(params)` with its defaults (every float leaf of rank >= 2
      but embeddings).
    axis: the axis groups run along: the input (contraction) axis. A
      `jaxprune.tree.Layouts` (`weight_layouts(apply_fn, params, x)`) gives each
      leaf its own, read from the program (the last of several: `head_dim` of a
      `(heads, head_dim, d)` attention output); None (the default) takes them from
      `score` where it knows them (`wanda_score(stats)`), else -2; an int is the
      same axis of every leaf: -2 for Flax kernels `(in, out)`, conv kernels
      `(h, w, in, out)` and stacked `(E, in, out)`; -1 for Equinox `(out, in)`; 1
      for Equinox conv weights `(out, in, h, w)`.
    previous: an earlier mask tree of the same `where`, or None.
    score: rank by a score instead of `|w|` (`jaxprune.scores`: e.g.
      `wanda_score(stats)` for Wanda's N:M, `saliency_score(grads)`).

  Returns:
    A mask tree: bool arrays (`True` = kept) for selected leaves, `None` elsewhere.

  Raises:
    ValueError: bad `n`/`m`; a selected leaf without `axis`, or whose length along
      it is not a multiple of `m` (naming the leaf's path and shape); `previous`
      not matching params; (outside jit) NaN/inf in a selected leaf.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxprune
    >>> params = {"fc1": {"kernel": jnp.array([[4., -1.], [1., 2.], [-3., 3.], [2., 0.]])}}
    >>> jaxprune.nm_masks(params, 2, 4)["fc1"]["kernel"]
    Array([[ True, False],
           [False,  True],
           [ True,  True],
           [False, False]], dtype=bool)
  """
  n, m = check_nm(n, m)
  chosen = selected_leaves(params, select(params) if where is None else where, previous)
  axes = [_group_axis(tuple(w.shape), _last_input_axis(axis, path, w, score), m, path)
          for _, path, w, _ in chosen]
  values = [w for _, _, w, _ in chosen]
  if score is not None:
    values = [w if v is None else v
              for w, v in zip(values, score.scores(params, [i for i, *_ in chosen]))]
  for (_, path, w, _), v in zip(chosen, values):
    check_finite(v, path if v is w else f"the score of {path}")
  by = "magnitude" if score is None else ranks_by(score)
  return masks_from(params, {i: _nm_leaf(v, prev, n, m, ax, by)
                             for (i, _, _, prev), v, ax in zip(chosen, values, axes)})


@functools.partial(jax.jit, static_argnames=("n", "m", "axis"))
def _count_violations(x: jax.Array, n: int, m: int, axis: int) -> jax.Array:
  nonzero = _grouped(x != 0, axis, m)  # bool masks: `True != 0` counts kept entries.
  return jnp.sum(jnp.sum(nonzero, axis=axis + 1, dtype=jnp.int32) > n, dtype=jnp.int32)


def _checked_leaves(tree: PyTree, where: Where | None) -> list[tuple[str, Any]]:
  """(path, leaf) of the leaves `nm_violations` inspects; mask trees keep their Nones."""
  theirs = slots(tree)
  arrays = [x for x in theirs.leaves if x is not None]
  if where is not None:
    flags = resolve_where(where, tree, floats_only=False)
  elif arrays and all(getattr(x, "dtype", None) == jnp.bool_ for x in arrays):
    flags = [x is not None for x in theirs.leaves]  # A mask tree: check every mask.
  else:
    flags = resolve_where(select(tree), tree)
  return [(path, x) for path, x, flag in zip(theirs.paths, theirs.leaves, flags) if flag]


def nm_violations(
    tree: PyTree,
    n: int = 2,
    m: int = 4,
    where: Where | None = None,
    *,
    axis: int = -2,
) -> dict[str, int]:
  """Per checked leaf, how many groups of `m` along `axis` have more than `n` nonzeros.

  Works on params (counting entries `!= 0`) and on mask trees (counting `True`),
  with the grouping of `nm_masks`: a leaf of shape `(in, out)`, `axis=-2`, has
  `in // m * out` groups. A leaf satisfies the N:M pattern iff its count is 0.

  Args:
    tree: params (e.g. `apply_masks(params, masks)`) or a mask tree.
    n: at most this many kept per group of `m`, `0 < n < m`.
    m: the group size.
    where: the leaves to check (bool pytree or callable, structure of `tree` with
      a mask tree's `None`s counted as leaves). None means every mask of a mask
      tree (all non-None leaves bool), else `select(tree)`.
    axis: the axis groups run along.

  Returns:
    `{path: count}` for every checked leaf, in leaf order.

  Raises:
    ValueError: bad `n`/`m`, or a checked leaf whose length along `axis` is not a
      multiple of `m` (naming its path and shape).

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import jaxprune
    >>> k1, k2 = jax.random.split(jax.random.key(0))
    >>> params = {"fc1": {"kernel": 0.3 * jax.random.normal(k1, (8, 8)), "bias": jnp.ones(8)},
    ...           "fc2": {"kernel": 0.3 * jax.random.normal(k2, (8, 4))}}
    >>> masks = jaxprune.nm_masks(params, 2, 4)
    >>> jaxprune.nm_violations(masks, 2, 4)
    {'fc1/kernel': 0, 'fc2/kernel': 0}
  """
  n, m = check_nm(n, m)
  counts = {}
  for path, x in _checked_leaves(tree, where):
    ax = _group_axis(tuple(x.shape), axis, m, path)
    counts[path] = int(_count_violations(x, n, m, ax))
  return counts


def is_nm_sparse(
    tree: PyTree, n: int = 2, m: int = 4, where: Where | None = None, *, axis: int = -2
) -> bool:
  """True iff every checked leaf has at most `n` nonzeros per group (see `nm_violations`)."""
  return not any(nm_violations(tree, n, m, where, axis=axis).values())
