"""Exact selection within rows: every row of a leaf loses the same number of weights.

A *row* is the set of weights that share every index but one, along the ranking
`axis`: for a Flax kernel `(in, out)` and `axis=-2`, the inputs of one output
neuron (the comparison group Wanda uses); for a stacked kernel `(L, in, out)`,
one neuron of one layer. Each row loses exactly `k` weights: its `k` smallest
keys, ties broken by position along the axis.

The k-th smallest key of every row is found at once by bisection on the uint32
keys (as `magnitude_rank`'s counting engine): 32 passes, each a compare-and-sum
along the axis against one candidate per row. No sort, no scatter; a pass holds
one int32 count per row (and, on CPU, the compare operand XLA writes out before
reducing: 4 bytes per weight, reused pass after pass). Ties are broken by a
cumsum along the axis.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprune._src.engine.explicit_sharding import local_along
from jaxprune._src.engine.leaf_groups import group_by_shape, map_over
from jaxprune._src.engine.magnitude_rank import KEYS


def _row_thresholds(keys: jax.Array, axis: int, k: jax.Array) -> jax.Array:
  """Per row, the largest uint32 `t` with `#{keys < t} < k` (the k-th smallest)."""
  # Of the keys' type with `axis` removed: under Explicit axes, its sharding too.
  rows = jnp.zeros_like(lax.index_in_dim(keys, 0, axis, keepdims=False))

  def one_pass(p, t):
    candidate = t | (jnp.uint32(1) << (jnp.uint32(31) - p.astype(jnp.uint32)))
    below = jnp.sum(keys < jnp.expand_dims(candidate, axis), axis=axis, dtype=jnp.int32)
    return jnp.where(below < k, candidate, t)

  return lax.fori_loop(0, 32, one_pass, rows)


def _smallest_in_rows(keys: jax.Array, axis: int, k: jax.Array) -> jax.Array:
  """Marks the `k` smallest keys of every row along `axis` (ties by position)."""
  # The tie-break scans along the rows: a sharded row axis moves its shards to
  # another axis first (Explicit mesh axes refuse a scan along a sharded one).
  keys, restore = local_along(keys, axis)
  t = jnp.expand_dims(_row_thresholds(keys, axis, k), axis)
  below = keys < t
  take = k - jnp.sum(below, axis=axis, keepdims=True, dtype=jnp.int32)
  ties = keys == t
  return restore(below | (ties & (jnp.cumsum(ties, axis=axis, dtype=jnp.int32) <= take)))


@functools.partial(jax.jit, static_argnames=("axis", "by"))
def smallest_in_rows_each(
    weights: Sequence[jax.Array], kept: Sequence[jax.Array | None],
    counts: Sequence[jax.Array | int], *, axis: int = -2, by: str = "magnitude",
) -> list[jax.Array]:
  """For every leaf, marks the `counts[i]` smallest keys of each row along `axis`.

  Args:
    weights: float arrays (at least 1-d), each ranked within its rows.
    kept: per weight, a bool mask of its shape (or packed, `jaxprune.tree.pack_mask`),
      or None: pruned entries rank first.
    counts: per weight, how many each of its rows loses, `0 <= k <= rows' length`.
    axis: the ranking axis (negative counts from the end).
    by: `"magnitude"` (`|w|`) or `"value"` (`w` itself, negative first).

  Returns:
    One bool array per weight, `True` for the marked (pruned) entries.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxprune._src.engine.row_rank import smallest_in_rows_each
    >>> w = jnp.array([[0.3, -2.0], [0.1, 0.5], [-0.2, 1.0]])   # rows: the columns
    >>> smallest_in_rows_each([w], [None], [1], axis=0)[0].astype(int)
    Array([[0, 0],
           [1, 1],
           [0, 0]], dtype=int32)
  """
  key_of = KEYS[by]
  sources = [(w, m, jnp.asarray(k, jnp.int32)) for w, m, k in zip(weights, kept, counts)]
  return map_over(group_by_shape(sources), lambda s, j: _smallest_in_rows(
      key_of(s[0], s[1]), s[0].ndim + axis if axis < 0 else axis, s[2]))


def _inputs_last(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """`x` with `axes` moved to the end and flattened into one: `(..., prod(sizes))`."""
  rest = [d for d in range(x.ndim) if d not in axes]
  moved = jnp.transpose(x, (*rest, *axes))
  return moved.reshape(*moved.shape[:len(rest)], -1)


def _inputs_back(y: jax.Array, shape: tuple[int, ...], axes: tuple[int, ...]) -> jax.Array:
  """The inverse of `_inputs_last` for an array of `shape`."""
  rest = [d for d in range(len(shape)) if d not in axes]
  moved = y.reshape(*(shape[d] for d in rest), *(shape[d] for d in axes))
  return jnp.transpose(moved, tuple(int(i) for i in np.argsort([*rest, *axes])))


def smallest_in_rows_along(
    weights: Sequence[jax.Array], kept: Sequence[jax.Array | None],
    counts: Sequence[jax.Array | int], axes: Sequence[tuple[int, ...]], *,
    by: str = "magnitude",
) -> list[jax.Array]:
  """`smallest_in_rows_each` with rows along several axes, per weight: a row of
  weight `i` is the weights sharing every index outside `axes[i]` (one output
  neuron of a `(heads, head_dim, d)` attention output, `axes=(0, 1)`), ranked
  over the flattened `axes[i]` (row-major: ties by that position). `kept` are
  bool masks (or None), not packed ones.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxprune._src.engine.row_rank import smallest_in_rows_along
    >>> w = jnp.arange(8.0).reshape(2, 2, 2)             # rows: the last axis's 2 entries
    >>> smallest_in_rows_along([w], [None], [2], [(0, 1)])[0][..., 0].astype(int)
    Array([[1, 1],
           [0, 0]], dtype=int32)
  """
  flat = [_inputs_last(w, a) for w, a in zip(weights, axes)]
  held = [None if m is None else _inputs_last(m, a) for m, a in zip(kept, axes)]
  marks = smallest_in_rows_each(flat, held, counts, axis=-1, by=by)
  return [_inputs_back(m, w.shape, a) for m, w, a in zip(marks, weights, axes)]
