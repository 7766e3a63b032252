"""`straight_through`: sparse forward passes, dense training (the straight-through
estimator).

The params the model runs on are sparse, `w = where(m, v, 0)`, while dense
weights `v` (held in the optimizer state) take every gradient, pruned positions
included: the gradient of the loss at the sparse `w` is the straight-through
estimate of the gradient at `v` (Bengio et al. 2013). Every `update_every`
updates the masks are recomputed from `v` afresh (no `previous`: a pruned weight
whose dense value grew back is kept again), by any target: a sparsity
(magnitude), `Prune(...)`, or an `NM` pattern (SR-STE-style N:M training).

The kept weights are their own dense values: the state's copy `d` is read only
where the held mask `m` prunes, `v = where(m, w, d)`. Per targeted leaf, with
`u = inner.update(g, ..., v)`, new masks `m'` and `d' = v + u`:

    out = where(m', where(m, u, d'), -w)

so a weight kept throughout moves by `u`, one that comes back lands on its dense
value, a pruned one on exactly 0 (`dense_weights` reads `v` back). Memory: one
dense copy of the targeted leaves in the state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxprune._src.methods.targets import as_target
from jaxprune._src.training.run_settings import note_settings
from jaxprune._src.transforms.drop_grow import DropAndGrow
from jaxprune._src.transforms.optax_wrapper import PrunedState, pruned_states
from jaxprune._src.transforms.recomputed_masks import first_value, starting_masks, target_at
from jaxprune._src.tree.leaf_selection import Where
from jaxprune._src.tree.mask_tree import (
  check_masks,
  map_masked,
  slots,
  unflatten,
)
from jaxprune._src.tree.packed_masks import pack_like, pack_masks, unpack_masks
from jaxprune._src.types import PyTree


class DenseWeights(NamedTuple):
  """The `inner_state` of `straight_through`'s `PrunedState`.

  Attributes:
    inner_state: state of the wrapped transformation (it sees the dense weights).
    dense: the dense weights `v` of the targeted leaves (None elsewhere).
  """

  inner_state: Any
  dense: Any


def _fresh_masks(dense: PyTree, packed: PyTree, count: jax.Array, schedule) -> PyTree:
  target = target_at(schedule, count)
  chosen = map_masked(lambda m, _: m is not None, unpack_masks(packed), dense)
  return pack_like(target.masks(dense, chosen), packed)


def _masks_after(dense: PyTree, state: PrunedState, update_every: int, schedule) -> PyTree:
  """The packed masks an update at `state.count` holds: recomputed afresh from the
  dense weights when `count % update_every == 0` (no `previous`), else the held ones."""
  return lax.cond(state.count % update_every == 0,
                  lambda v, prev, c: _fresh_masks(v, prev, c, schedule),
                  lambda v, prev, c: prev, dense, state.packed_masks, state.count)


def _out(m: jax.Array | None, u: jax.Array, w: jax.Array, held: jax.Array | None,
         moved: jax.Array | None) -> jax.Array:
  if m is None:
    return u
  dtype = jnp.promote_types(u.dtype, w.dtype)
  # A weight kept before moves by `u` from itself; XLA may fuse `v + u` into an FMA
  # differently in two places, so `moved` is only used where `w` is 0.
  back = jnp.where(held, u.astype(dtype), moved.astype(dtype))
  return jnp.where(m, back, -w.astype(dtype))


def _dense(masks: PyTree, params: PyTree, copy: PyTree) -> PyTree:
  """`v = where(m, w, d)` on the targeted leaves, `w` elsewhere."""
  return map_masked(lambda m, w, d: w if m is None else jnp.where(m, w, d), masks, params, copy)


def dense_weights(opt_state: PyTree, params: PyTree) -> PyTree:
  """The dense weights `v` of a `straight_through` run: `params` where kept, the
  state's dense copy where pruned.

  Raises:
    ValueError: `opt_state` holds no `straight_through` state, or several.
  """
  found = [s for s in pruned_states(opt_state) if isinstance(s.inner_state, DenseWeights)]
  if len(found) != 1:
    raise ValueError(f"expected exactly one jaxprune.sparse_training.straight_through state "
                     f"inside the optimizer state, found {len(found)}")
  # Laid out in `params`' structure (an nnx.Optimizer holds its state in its own).
  masks = check_masks(unpack_masks(found[0].packed_masks), params)
  copy = unflatten(params, slots(found[0].inner_state.dense).leaves)
  return _dense(masks, params, copy)


def _check_arguments(schedule: Any, update_every: Any, where: Any, masks: Any) -> None:
  """Refuses, before compute, what straight-through training does not take."""
  name = "straight_through"
  if where is None and masks is None:
    raise ValueError(f"{name} needs `where` (or starting `masks`)")
  first = first_value(schedule, update_every, name)
  if isinstance(first, DropAndGrow):
    raise ValueError(f"{name} recomputes masks from the dense weights; drop and grow "
                     "(set_schedule, rigl_schedule) belongs in "
                     "jaxprune.sparse_training.drop_and_grow")
  as_target(first, name="schedule(0)")


def straight_through(
    inner: optax.GradientTransformation,
    *,
    schedule: Callable[[jax.Array], Any],
    update_every: int,
    where: Where | None = None,
    masks: PyTree | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Wraps `inner` for straight-through sparse training (see the module docstring).

  Args:
    inner: the optimizer of the dense weights.
    schedule: `count -> sparsity` or a target (`optax.constant_schedule(0.9)`,
      `optax.polynomial_schedule(...)`, `lambda c: jaxprune.NM(2, 4)`,
      `lambda c: jaxprune.Prune(0.9, scope="global")`), read at every recompute.
    update_every: recompute the masks every this many updates (at `count % K == 0`).
    where: the targeted leaves (or give `masks`).
    masks: starting masks (default: all kept until the first recompute, at count 0).

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a `PrunedState`
    (`get_masks` reads it) holding `DenseWeights`.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import jaxprune
    >>> k1, k2 = jax.random.split(jax.random.key(0))
    >>> params = {"fc1": {"kernel": 0.3 * jax.random.normal(k1, (8, 8)), "bias": jnp.ones(8)},
    ...           "fc2": {"kernel": 0.3 * jax.random.normal(k2, (8, 4))}}
    >>> where = jaxprune.select(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)   # a gradient of ones
    >>> tx = jaxprune.sparse_training.straight_through(optax.adam(1e-3), where=where,
    ...                                schedule=optax.constant_schedule(0.5), update_every=1)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> float((params["fc1"]["kernel"] == 0).mean())
    0.5
  """
  _check_arguments(schedule, update_every, where, masks)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params: PyTree) -> PrunedState:
    note_settings("straight_through", schedule=schedule, update_every=update_every)
    start = starting_masks(params, where, masks)
    dense = map_masked(lambda m, w: None if m is None else jnp.array(w, copy=True), start,
                       params)
    return PrunedState(DenseWeights(inner.init(params), dense), pack_masks(start),
                       jnp.zeros((), jnp.int32))

  def update_fn(updates, state: PrunedState, params=None, **extra_args):
    if params is None:
      raise ValueError("jaxprune.sparse_training.straight_through needs the current params: "
                       "call tx.update(grads, state, params)")
    held = unpack_masks(state.packed_masks)
    dense = _dense(held, params, state.inner_state.dense)
    packed = _masks_after(dense, state, update_every, schedule)
    inner_updates, inner_state = inner.update(updates, state.inner_state.inner_state, dense,
                                              **extra_args)
    current = unpack_masks(packed)
    moved = map_masked(lambda m, v, u: None if m is None else optax.apply_updates(v, u),
                       current, dense, inner_updates)
    out = map_masked(_out, current, inner_updates, params, held, moved)
    return out, PrunedState(DenseWeights(inner_state, moved), packed,
                            optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
