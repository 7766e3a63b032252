"""Masks over a parameter pytree: rank and compute them, check them, apply them.

A *mask tree* has the structure of `params`. A selected leaf holds a bool array of
the leaf's shape (`True` = kept); an unselected leaf, and a `None` leaf of params,
holds `None`, so no memory is spent on it (see `jaxprune.tree`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._src.engine.magnitude_rank import smallest_magnitudes, smallest_magnitudes_each
from jaxprune._src.engine.row_rank import smallest_in_rows_along, smallest_in_rows_each
from jaxprune._src.engine.stacked_layers import (
  check_stacked,
  check_used,
  restack,
  stacked_axes,
  unstack,
)
from jaxprune._src.methods.distributions import Distribution, prune_count, uniform
from jaxprune._src.methods.scores import Score, magnitude_score, ranks_by
from jaxprune._src.methods.units import is_granularity, unit_count
from jaxprune._src.oneshot.layouts import input_axes_of
from jaxprune._src.tree.leaf_selection import Where
from jaxprune._src.tree.mask_tree import (
  check_masks,
  map_masked,
  masks_from,
  selected_leaves,
  slots,
  unflatten,
)
from jaxprune._src.tree.packed_masks import zero_unkept
from jaxprune._src.types import PyTree

Scope = Literal["layer", "global"]

__all__ = [
    "apply_masks", "check_masks", "map_masked", "ranked_masks",
    "threshold_masks",
]


def _is_traced(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
  """Zeroes the pruned weights: `where(mask, w, 0)` per selected leaf.

  Args:
    params: the parameter pytree.
    masks: a mask tree of `params` (`None` leaves are passed through).

  Returns:
    `params` with pruned entries set to exactly 0, dtypes and shapes unchanged.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxprune
    >>> params = {"fc1": {"kernel": jnp.arange(-8.0, 8.0).reshape(4, 4), "bias": jnp.ones(4)}}
    >>> masks = jaxprune.ranked_masks(params, 0.5, jaxprune.select(params))
    >>> pruned = jaxprune.apply_masks(params, masks)
  """
  return zero_unkept(check_masks(masks, params), params)


def _check_number(name: str, value: Any) -> Any:
  """A concrete real scalar as a Python float, or a traced scalar as given."""
  if _is_traced(value):
    if np.shape(value) != ():
      raise ValueError(f"{name} must be a scalar, got a traced array of shape {value.shape}")
    return value
  if isinstance(value, (np.ndarray, jax.Array)) and value.shape == () and value.dtype != bool:
    value = value.item()
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
  return float(value)


def check_fraction(name: str, value: Any) -> Any:
  """A concrete fraction in [0, 1) as a float; a traced one as given (read totally
  by `distributions.prune_count`)."""
  value = _check_number(name, value)
  if not _is_traced(value) and not 0.0 <= value < 1.0:
    raise ValueError(f"{name} must be in [0, 1), got {value!r}")
  return value


def is_count(value: Any) -> bool:
  """An integer (Python or NumPy), not a bool."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_count(name: str, value: Any, minimum: int = 1) -> int:
  """`value` as an int if it is an integer >= `minimum`; else a ValueError naming it."""
  if not (is_count(value) and value >= minimum):
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
  return int(value)


def check_seed(value: Any, name: str = "seed") -> int:
  """`value` as an int if it is an integer >= 0 (Python or NumPy); else a ValueError
  naming `name`: a float seed would be truncated, or traced into the key."""
  if not (is_count(value) and value >= 0):
    raise ValueError(f"{name} must be an integer >= 0 (it seeds jax.random.key), got {value!r}")
  return int(value)


def check_finite(w: jax.Array, path: str) -> None:
  """Raises, naming `path`, if a concrete `w` holds NaN or inf; no-op under a trace."""
  finite = jnp.isfinite(w).all()
  if _is_traced(finite):
    return  # Under jit (traced or closed-over params): NaN and inf rank as the largest.
  if not bool(finite):
    raise ValueError(
        f"parameter {path} contains NaN or inf; magnitudes cannot be ranked. "
        "Check the training run that produced it."
    )


def threshold_masks(params: PyTree, threshold: float | jax.Array, where: Where) -> PyTree:
  """Keeps a weight iff `|w| >= threshold`: "prune weights with |w| < threshold".

  Weights are checked as in `ranked_masks`: outside jit a selected leaf holding
  NaN or inf is an error; under jit NaN and inf count as the largest magnitudes
  (kept), in both functions.

  Args:
    params: the parameter pytree.
    threshold: a real scalar (may be traced); NaN is an error.
    where: bool pytree from `select` (or a callable building one from params).

  Returns:
    A mask tree: bool arrays of each selected leaf's shape, `None` elsewhere.

  Raises:
    TypeError / ValueError: a non-number or NaN threshold; `where` not matching
      params or selecting nothing; NaN/inf in a selected leaf (outside jit).

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxprune
    >>> params = {"fc1": {"kernel": jnp.arange(-8.0, 8.0).reshape(4, 4), "bias": jnp.ones(4)}}
    >>> masks = jaxprune.threshold_masks(params, 1e-2, jaxprune.select(params))
  """
  threshold = _check_number("threshold", threshold)
  if not _is_traced(threshold) and math.isnan(threshold):
    raise ValueError(f"threshold must be a number, got {threshold!r}")
  computed = {}
  for i, path, w, _ in selected_leaves(params, where):
    check_finite(w, path)
    computed[i] = _at_least(w, threshold)
  return masks_from(params, computed)


def _at_least(w: jax.Array, threshold: Any) -> jax.Array:
  """`|w| >= threshold` exactly, without rounding the threshold to the leaf's dtype.

  Compared in float32 (exact for bfloat16/float16/float32 leaves; float64 stays
  float64) as `not |w| < t`, so NaN is kept. A concrete threshold is rounded *up*
  to that dtype, so a weight just below it is never kept.
  """
  dtype = jnp.promote_types(w.dtype, jnp.float32)
  if _is_traced(threshold):
    t = jnp.asarray(threshold)
    dtype = jnp.promote_types(dtype, t.dtype)
    return ~(jnp.abs(w).astype(dtype) < t.astype(dtype))
  t = float(threshold)
  with np.errstate(over="ignore"):
    t_rounded = np.asarray(t, dtype)
  if float(t_rounded) < t:
    t_rounded = np.nextafter(t_rounded, np.asarray(np.inf, dtype))
  if dtype == jnp.float32 and t > 0:
    # Compare bit patterns (ordered like non-negative floats, NaN above inf): XLA:CPU
    # flushes subnormals to zero in float comparisons, which would keep |w| < t.
    bits = jax.lax.bitcast_convert_type(jnp.abs(w).astype(jnp.float32), jnp.uint32)
    return bits >= np.asarray(t_rounded, np.float32).view(np.uint32)
  return ~(jnp.abs(w).astype(dtype) < t_rounded)


def ranked_masks(
    params: PyTree,
    sparsity: float | jax.Array,
    where: Where,
    *,
    score: Score | None = None,
    scope: str = "layer",
    distribution: Distribution | None = None,
    previous: PyTree | None = None,
    axis: int | Mapping[str, Any] | None = None,
    stacked: Mapping[str, int] | None = None,
) -> PyTree:
  """Prunes exactly the `round(sparsity * n)` lowest-`score` weights (`|w|` by default).

  With `scope="layer"`, leaf i loses exactly `distribution.prune_counts(...)[i]`
  weights (`uniform()`: `round(sparsity * n_i)`; `erk()`: Erdős–Rényi-kernel
  shares summing to `round(sparsity * N)`); with `scope="global"`, exactly
  `round(sparsity * N)` lowest scores over all selected leaves, ranked together
  (so layers end with different sparsities); with `scope="row"`, every row along
  `axis` (the weights sharing all other indices: one output neuron's inputs for
  `axis=-2` on a Flax `(in, out)` kernel, `-1` on an Equinox `(out, in)` weight,
  each leaf's input axes for a `Layouts`) loses exactly `round(s_i * L)` of its
  `L`, `s_i` the leaf's sparsity from the distribution; with `scope=blocks(...)`
  or `channels(...)`, each leaf loses exactly `round(s_i * units)` whole units.

  Ties (equal scores, many zeros) are broken by position (leaf order, then
  row-major index), so the count is exact and the result deterministic. Weights
  pruned in `previous` stay pruned and are counted first; if `previous` already
  prunes more than the target, the result equals `previous`. Masks never revive
  a weight.

  Selection counts over the float bit patterns: a radix histogram on CPU, a
  bisection of comparison counts on TPU/GPU; no sort, a few extra bytes per
  weight, leaves of equal shape sharing one compiled loop, and in global scope no
  concatenation of leaves.

  Args:
    params: the parameter pytree.
    sparsity: target fraction in [0, 1), a real number (not a string). A Python
      float gives an exact count; a traced scalar (under `jax.jit`) gives
      `round(sparsity * n)` computed exactly in integers from its float32 value,
      which may differ by one from Python's round-half-even at exact halves only.
      A traced value cannot raise, so it is read totally, for every leaf alike:
      NaN as 0 (nothing newly pruned: `previous`, or all kept), values below 0 as
      0, and values from 1 up as 1 (every targeted weight pruned). A Python
      float passed through `jit` becomes float32 first (0.3 -> 0.30000001),
      which can move the count by one on leaves of tens of millions of weights.
    where: bool pytree from `select` (or a callable building one from params).
    score: what a weight is worth (`jaxprune.scores`): `magnitude_score()` (the
      default, `|w|`), `saliency_score(grads)`, `random_score(seed)`,
      `given_score(tree)`.
    scope: `"layer"`, `"global"`, `"row"`, or a structured granularity:
      `jaxprune.blocks((b0, b1))`, `jaxprune.channels(axis)` (whole units).
    distribution: per-leaf counts in layer and row scope (`uniform()` by default,
      `erk()`); global scope ranks all leaves together and takes none.
    previous: an earlier mask tree of the same `where`, or None.
    axis: what a row of row scope runs along: an int (the same axis of every leaf,
      within a layer: see `stacked`), a `jaxprune.tree.Layouts` (each leaf's own
      input axes, read from the program: one output neuron per row whatever the
      layout, e.g. `(heads, head_dim, d)`), or None (the default: the input axes
      the score knows, as `wanda_score(stats)` does from its statistics, else -2).
    stacked: `{path pattern: k}`: the first `k` axes of matching leaves index
      stacked layers (`nnx.scan`'d blocks, MoE experts), each slice ranked as a
      layer of its own (see `ranked_masks`'s `stacked`).

  Returns:
    A mask tree: bool arrays (`True` = kept) for selected leaves, `None` elsewhere.

  Raises:
    TypeError / ValueError: a concrete sparsity that is not a number or outside
      [0, 1); an unknown scope (the message lists the valid ones); `where` not
      matching params, selecting a non-float or `None` leaf, or selecting
      nothing; `previous` not matching params or `where`; a score or distribution
      that is not one; a distribution other than a plain `uniform()` in global scope; in
      row scope, a selected leaf without `axis`; a `stacked` pattern matching no
      selected leaf, or leaving a leaf no layer axes; (outside jit) NaN/inf in a
      selected leaf's score, naming its path.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import jaxprune
    >>> k1, k2 = jax.random.split(jax.random.key(0))
    >>> params = {"fc1": {"kernel": 0.3 * jax.random.normal(k1, (8, 8)), "bias": jnp.ones(8)},
    ...           "fc2": {"kernel": 0.3 * jax.random.normal(k2, (8, 4))}}
    >>> where = jaxprune.select(params)
    >>> m1 = jaxprune.ranked_masks(params, 0.5, where)                 # |w|, per leaf
    >>> m2 = jaxprune.ranked_masks(params, 0.8, where, previous=m1)   # never revives
    >>> masks = jaxprune.ranked_masks(params, 0.5, where, scope="global")
    >>> masks = jaxprune.ranked_masks(params, 0.5, where, distribution=jaxprune.distributions.erk())
    >>> masks = jaxprune.ranked_masks(params, 0.5, where, score=jaxprune.scores.random_score(0))
    >>> masks = jaxprune.ranked_masks(params, 0.5, where, scope="row")   # per output neuron
    >>> int((~masks["fc2"]["kernel"]).sum(axis=0)[0])                     # 4 of its 8 inputs
    4
  """
  check_scope(scope, structured=True)
  sparsity = check_fraction("sparsity", sparsity)
  score, distribution = _checked_method(score, distribution, scope)
  stacked = check_stacked(stacked)
  chosen = selected_leaves(params, where, previous)
  paths = [path for _, path, _, _ in chosen]
  check_used(stacked, paths)
  layer_shapes = [_layer_shape(path, w, stacked) for _, path, w, _ in chosen]
  # A stacked leaf is named by its layers' shape in the checks: axes count within a layer.
  named = [p if s == tuple(np.shape(w)) else f"{p} (stacked layers of)"
           for p, s, (_, _, w, _) in zip(paths, layer_shapes, chosen)]
  row_axes = None
  if scope == "row":
    row_axes = [input_axes_of(axis, path, tuple(np.shape(w)), score=score, layer_shape=shape,
                              what="scope='row'")
                for (_, path, w, _), shape in zip(chosen, layer_shapes)]
  if is_granularity(scope):
    for path, shape in zip(named, layer_shapes):
      scope.check(path, shape)
  values = [w if v is None else v for (_, _, w, _), v in
            zip(chosen, score.scores(params, [i for i, *_ in chosen]))]
  for (_, path, w, _), v in zip(chosen, values):
    check_finite(v, path if v is w else f"the score of {path}")
  layers = unstack(paths, values, [p for *_, p in chosen], stacked)
  if row_axes is not None:
    row_axes = _layer_axes(paths, [tuple(np.shape(w)) for *_, w, _ in chosen], row_axes, layers,
                           stacked)
  kept = _kept_by_rank(layers.values, layers.previous, layers.leaf_paths, sparsity, scope,
                       distribution, ranks_by(score), row_axes=row_axes)
  return masks_from(params, {i: m for (i, *_), m in zip(chosen, restack(kept, layers))})


def _layer_shape(path: str, w: Any, stacked: tuple) -> tuple[int, ...]:
  shape = tuple(np.shape(w))
  return shape[stacked_axes(path, shape, stacked):]


def _layer_axes(paths: list[str], shapes: list[tuple[int, ...]], axes: list[tuple[int, ...]],
                layers: Any, stacked: tuple) -> list[tuple[int, ...]]:
  """Each leaf's row axes, per value `unstack` made of it (its layers: the axes
  shifted past the stacked ones, which must not be among them)."""
  out = []
  for path, shape, leaf_axes, n in zip(paths, shapes, axes, layers.counts):
    k = stacked_axes(path, shape, stacked)
    if any(a < k for a in leaf_axes):
      raise ValueError(f"scope='row' would rank {path} along axes {leaf_axes}, but its first "
                       f"{k} axes index stacked layers (`stacked`)")
    out += [tuple(a - k for a in leaf_axes)] * max(n, 1)
  return out


def _unit_marks(granularity: Any, values: list, previous: list, paths: list[str],
                sparsity: Any, distribution: Distribution, by: str) -> list:
  """Per leaf, the weights of its `round(s_i * units)` lowest-scoring units."""
  if by == "magnitude":  # units pool the magnitudes, not the signed weights
    values = [jnp.abs(v) for v in values]
  shapes = [v.shape for v in values]
  shares = distribution.sparsities(paths, shapes, sparsity)
  counts = [prune_count(s, unit_count(granularity, shape)) for s, shape in zip(shares, shapes)]
  marks = smallest_magnitudes_each([granularity.unit_scores(v) for v in values],
                                   [granularity.unit_kept(p) for p in previous], counts, by=by)
  return [granularity.expand(m, shape) for m, shape in zip(marks, shapes)]


def _checked_method(score: Any, distribution: Any, scope: Scope) -> tuple[Score, Distribution]:
  score = magnitude_score() if score is None else score
  distribution = uniform() if distribution is None else distribution
  if not isinstance(score, Score):
    raise TypeError(f"score must be a score (jaxprune.scores.magnitude_score(), "
                    f"saliency_score(grads), "
                    f"...), got {score!r}")
  if not isinstance(distribution, Distribution):
    raise TypeError(f"distribution must be one (jaxprune.distributions.uniform(), "
                    f"jaxprune.distributions.erk()), "
                    f"got {distribution!r}")
  if scope == "global" and distribution != uniform():
    raise ValueError(f"scope='global' ranks all leaves together: it takes no distribution "
                     f"(got {distribution!r}); use scope='layer'")
  return score, distribution


def _kept_by_rank(values: list, previous: list, paths: list[str], sparsity: Any, scope: str,
                  distribution: Distribution, by: str, held: bool = False,
                  row_axes: list[tuple[int, ...]] | None = None) -> list:
  """Each leaf's kept mask once its lowest values (`by` "magnitude" or "value") are
  pruned.

  `held`: `previous` are masks as `pruned` holds them, and the new masks come back
  in their layout, computed inside the selection (no bool mask is written out).
  Otherwise the marks come back and are combined here, where the result's sharding
  follows `previous`' (and the params') under Auto mesh axes.
  """
  if scope == "layer":
    counts = distribution.prune_counts(paths, [v.shape for v in values], sparsity)
    out = smallest_magnitudes_each(values, previous, counts, as_kept=held, by=by)
  elif scope == "row":
    shares = distribution.sparsities(paths, [v.shape for v in values], sparsity)
    counts = [prune_count(s, math.prod(v.shape[a] for a in axes))
              for s, v, axes in zip(shares, values, row_axes)]
    if all(len(axes) == 1 and axes == row_axes[0] for axes in row_axes):
      out = smallest_in_rows_each(values, previous, counts, axis=row_axes[0][0], by=by)
    else:
      out = smallest_in_rows_along(values, previous, counts, row_axes, by=by)
  elif is_granularity(scope):
    out = _unit_marks(scope, values, previous, paths, sparsity, distribution, by)
  else:
    total = sum(v.size for v in values)
    out = smallest_magnitudes(values, previous, prune_count(sparsity, total), as_kept=held, by=by)
  if held:
    return out
  return [~m if p is None else p & ~m for m, p in zip(out, previous)]


def magnitude_masks_held(params: PyTree, sparsity: Any, held: PyTree,
                         scope: Scope = "layer") -> PyTree:
  """`ranked_masks(params, sparsity, where, scope=scope, previous=unpack_masks(held))`
  packed like `held` (masks as `pruned` holds them), without unpacking `held` or
  writing out a bool mask: the selection reads and writes the held layout.

  `held` comes from `pruned`'s state (already checked); it is matched to `params`
  slot by slot, as `pack_like` does.
  """
  sparsity = check_fraction("sparsity", sparsity)
  masks, weights = slots(held).leaves, slots(params).leaves
  chosen = [i for i, m in enumerate(masks) if m is not None]
  kept = _kept_by_rank([weights[i] for i in chosen], [masks[i] for i in chosen],
                       [slots(held).paths[i] for i in chosen], sparsity, scope, uniform(),
                       "magnitude", held=True)
  out = list(masks)
  for i, m in zip(chosen, kept):
    out[i] = m
  return unflatten(held, out)


def check_scope(scope: Any, structured: bool = False) -> Any:
  """`scope` if it is `"layer"` or `"global"` (with `structured`, as `ranked_masks`
  and `Prune` take: also `"row"` or a granularity), else a ValueError naming it and
  the values this entry point takes."""
  if isinstance(scope, str) and scope in ("layer", "global"):
    return scope
  if structured and (scope == "row" or is_granularity(scope)):
    return scope
  if structured:
    raise ValueError(f"scope must be 'layer', 'global', 'row', jaxprune.blocks((b0, b1)) or "
                     f"jaxprune.channels(axis), got {scope!r}")
  raise ValueError(f"scope must be 'layer' or 'global' here, got {scope!r} ('row', "
                   f"jaxprune.blocks(...) and jaxprune.channels(...) rank through a target: "
                   f"jaxprune.Prune(sparsity, scope=...))")
