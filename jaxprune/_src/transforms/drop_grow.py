"""Drop and grow: the mask update of dynamic sparse training (SET, RigL).

A `DropAndGrow` target moves kept weights instead of removing them. For every
selected leaf with `k` kept weights (its mask `previous`) and drop fraction `d`:

    n      = round(d * k)
    drop:  the n kept weights of smallest |w| leave  ->  D, |D| = k - n
    grow:  the n positions outside D of largest grow score join
    new    = D | grown,  |new| = k exactly

Ties by position, as every selection here. A weight just dropped may be grown
again (its grow score competes like any other). The grow score is random
(`random_score`: SET, Mocanu et al. 2018) or the magnitude of the dense gradient
(`gradient_score()`: RigL, Evci et al. 2020), which `drop_and_grow` binds to the step's
gradients; the count per leaf never changes, so the distribution of the starting
masks (uniform, ERK) is kept.

`set_schedule` and `rigl_schedule` are schedules for `drop_and_grow`: `count ->
DropAndGrow`. `drop_and_grow` runs them every `update_every` updates; on such a step it
zeroes the optimizer moments of the grown weights (`reset_grown`: they start as
fresh weights, at exactly 0) and trains only the weights kept before and after.

Examples:
  >>> import jax
  >>> import jax.numpy as jnp
  >>> import jaxprune
  >>> k1, k2 = jax.random.split(jax.random.key(0))
  >>> params = {"fc1": {"kernel": 0.3 * jax.random.normal(k1, (8, 8)), "bias": jnp.ones(8)},
  ...           "fc2": {"kernel": 0.3 * jax.random.normal(k2, (8, 4))}}
  >>> where = jaxprune.select(params)
  >>> start = jaxprune.ranked_masks(params, 0.75, where, score=jaxprune.scores.random_score(0))
  >>> target = jaxprune.sparse_training.DropAndGrow(0.5, jaxprune.scores.random_score(1))
  >>> moved = target.masks(params, where, previous=start)
  >>> int(moved["fc1"]["kernel"].sum()) == int(start["fc1"]["kernel"].sum())
  True
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune._src.engine.magnitude_rank import count_dtype, smallest_magnitudes_each
from jaxprune._src.methods.scores import (
  Score,
  gradient_score,
  magnitude_score,
  random_score,
  ranks_by,
  score_name,
)
from jaxprune._src.tree.mask_tree import masks_from, selected_leaves, slots, unflatten
from jaxprune._src.types import PyTree


def _check_drop_fraction(value: Any) -> Any:
  """A concrete drop fraction (a Python or NumPy number, a concrete JAX scalar)
  checked in [0, 1], NaN refused; a traced one as given."""
  if isinstance(value, jax.core.Tracer):
    return value  # cannot raise: clipped to [0, 1] where it is read
  number = value
  if isinstance(value, (jax.Array, np.ndarray)) and np.shape(value) == () and (
      jnp.issubdtype(value.dtype, jnp.integer) or jnp.issubdtype(value.dtype, jnp.floating)):
    number = value.item()
  if isinstance(number, bool) or not isinstance(number, numbers.Real) or not 0 <= number <= 1:
    raise ValueError(f"drop_fraction = {value!r}: a fraction of the kept weights in [0, 1]")
  # A JAX array stays one, as a traced value would: the target's leaf keeps its type.
  return value if isinstance(value, jax.Array) else float(number)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DropAndGrow:
  """Move `round(drop_fraction * k)` of each leaf's `k` kept weights: drop the
  smallest `|w|`, grow the largest `grow` scores (see the module docstring).

  `drop_fraction` (may be traced), `grow` and `drop` (the score the drop ranks by,
  `|w|` by default) are pytree leaves. `sparsity` is None: the count of each leaf
  is the starting masks'.

  Raises:
    ValueError: a concrete `drop_fraction` (a Python or NumPy number, a concrete
      JAX scalar) that is not a real number in [0, 1], NaN included; a traced
      one is clipped to [0, 1] where it is read.
    TypeError: `grow` or `drop` not a score.
  """

  drop_fraction: Any
  grow: Any
  drop: Any = dataclasses.field(default_factory=magnitude_score)

  def __post_init__(self):
    object.__setattr__(self, "drop_fraction", _check_drop_fraction(self.drop_fraction))
    for name in ("grow", "drop"):
      if not isinstance(getattr(self, name), Score):
        raise TypeError(f"{name} must be a score (jaxprune.scores.random_score(seed), "
                        f"jaxprune.scores.gradient_score(), ...), got {getattr(self, name)!r}")

  @property
  def sparsity(self) -> None:
    return None

  def masks(self, params: PyTree, where: Any, previous: PyTree | None = None) -> PyTree:
    if previous is None:
      raise ValueError("DropAndGrow moves kept weights: pass the masks to start from as "
                       "`previous` (in `pruned`, the masks it holds)")
    chosen = selected_leaves(params, where, previous)
    slots_chosen = [i for i, *_ in chosen]
    grow = self.grow.scores(params, slots_chosen)
    weights = [w if v is None else v for (_, _, w, _), v in
               zip(chosen, self.drop.scores(params, slots_chosen))]
    kept = [m for *_, m in chosen]
    moved = [_moved_counts(m, self.drop_fraction) for m in kept]
    dropped = smallest_magnitudes_each(weights, kept, [c for c, _ in moved], as_kept=True,
                                       by=ranks_by(self.drop))
    # Positions still kept rank above every candidate, so only candidates are marked.
    finite = jnp.finfo(jnp.float32).max
    ranked = [jnp.where(d, jnp.inf, jnp.nan_to_num(g.astype(jnp.float32), nan=0.0,
                                                   posinf=finite, neginf=-finite))
              for d, g in zip(dropped, grow)]
    pruned = smallest_magnitudes_each(ranked, [None] * len(ranked), [p for _, p in moved],
                                      by="value")
    return masks_from(params, {i: ~p for (i, *_), p in zip(chosen, pruned)})

  def __str__(self) -> str:
    d = self.drop_fraction
    shown = f"{d:.0%}" if isinstance(d, float) else "traced"
    return f"drop and grow {shown}, regrown by {score_name(self.grow)}"


def _moved_counts(kept: jax.Array, drop_fraction: Any) -> tuple[jax.Array, jax.Array]:
  """(marks for the drop: the pruned plus the dropped; pruned after regrowth)."""
  n = kept.size
  dtype = count_dtype(n)
  k = jnp.sum(kept, dtype=dtype)
  d = jnp.clip(jnp.asarray(drop_fraction, jnp.float32), 0.0, 1.0)
  dropped = jnp.clip(jnp.round(d * k.astype(jnp.float32)).astype(dtype), 0, k)
  return n - k + dropped, n - k


def grown(previous: PyTree, new: PyTree) -> PyTree:
  """Per mask slot, `new & ~previous` (the weights that came back), None elsewhere."""
  return jax.tree.map(lambda p, q: None if p is None else q & ~p, previous, new,
                      is_leaf=lambda x: x is None)


def reset_grown(inner: optax.GradientTransformation, inner_state: PyTree, grown_masks: PyTree,
                params: PyTree) -> PyTree:
  """`inner_state` with every params-shaped entry (momentum, Adam's `mu` and `nu`, ...)
  set to 0 where `grown_masks` is True: a regrown weight starts as a fresh one.

  The entries are found as `optax.tree_utils.tree_map_params` finds them (by
  `inner.init` on the structure of `params`); scalars such as step counts are
  left alone.
  """
  # `False` (a leaf, unlike None) stands for a param no mask covers; None params
  # (Equinox's non-array fields) stay None, as in the state `inner.init` built.
  marks = [None if w is None else False if m is None else m
           for w, m in zip(slots(params).leaves, slots(grown_masks).leaves)]
  full = unflatten(params, marks)

  def reset(x, mark):
    if mark is False or jnp.shape(x) != jnp.shape(mark):
      return x
    return jnp.where(mark, jnp.zeros((), x.dtype), x)

  return optax.tree_utils.tree_map_params(inner, reset, inner_state, full)


def _at(value: float | Callable[[Any], Any], count: Any) -> Any:
  return value(count) if callable(value) else value


def set_schedule(drop_fraction: float | Callable[[Any], Any] = 0.3,
                 seed: int | jax.Array = 0) -> Callable[[Any], DropAndGrow]:
  """SET's mask update for `drop_and_grow`: drop the smallest `|w|`, regrow at random.

  `drop_fraction` is a fraction or a schedule `count -> fraction` (SET: a constant
  0.3); the random draw of update `count` is `fold_in(key(seed), count)`, so a
  resumed run draws the same.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import jaxprune
    >>> params = {"fc1": {"kernel": jnp.arange(-8.0, 8.0).reshape(4, 4), "bias": jnp.ones(4)}}
    >>> masks = jaxprune.ranked_masks(params, 0.5, jaxprune.select(params))
    >>> tx = jaxprune.sparse_training.drop_and_grow(
    ...     optax.sgd(0.1), masks, schedule=jaxprune.sparse_training.set_schedule(0.3),
    ...     update_every=100)
  """
  key = random_score(seed).key
  _check_drop_fraction(_at(drop_fraction, 0))
  return lambda count: DropAndGrow(_at(drop_fraction, count),
                                   random_score(jax.random.fold_in(key, count)))


def rigl_schedule(drop_fraction: float = 0.3, end: int | None = None) -> Callable[[Any], Any]:
  """RigL's mask update for `drop_and_grow`: drop the smallest `|w|`, regrow where the
  step's dense gradient `|g|` is largest.

  The drop fraction decays as `d(t) = drop_fraction / 2 * (1 + cos(pi * t / end))`
  for `t < end` and is 0 after (Evci et al. 2020: 0.3, `end` at 75% of training);
  `end=None` keeps it constant.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import jaxprune
    >>> params = {"fc1": {"kernel": jnp.arange(-8.0, 8.0).reshape(4, 4), "bias": jnp.ones(4)}}
    >>> masks = jaxprune.ranked_masks(params, 0.5, jaxprune.select(params))
    >>> tx = jaxprune.sparse_training.drop_and_grow(
    ...     optax.adam(1e-3), masks, update_every=100,
    ...     schedule=jaxprune.sparse_training.rigl_schedule(0.3, end=7500))
  """
  _check_drop_fraction(drop_fraction)
  if end is not None and (isinstance(end, bool) or not isinstance(end, int) or end < 1):
    raise ValueError(f"end = {end!r}: the update count at which regrowth stops, an int >= 1")

  def fraction(count):
    if end is None:
      return drop_fraction
    t = jnp.minimum(jnp.asarray(count, jnp.float32), float(end))
    return drop_fraction / 2 * (1 + jnp.cos(math.pi * t / end))

  return lambda count: DropAndGrow(fraction(count), gradient_score())
