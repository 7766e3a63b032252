"""`pruned`: an optax wrapper that holds pruned weights at exactly zero, and the core
that every masked transform shares (`held_masks`, `PrunedState`, the mask accessors).

Masking only the gradients is not enough: momentum, Adam moments and decoupled
weight decay all move a weight whose gradient is zero. `pruned` rewrites the
*final* update of every pruned weight to `-w`, so `optax.apply_updates` lands it
on exactly `0.0`, whatever `inner` computed; kept weights get `inner`'s update
unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxprune._src.training.run_settings import note_settings
from jaxprune._src.tree.mask_tree import (
  check_masks,
  map_masked,
  owned_copy,
  slots,
)
from jaxprune._src.tree.packed_masks import (
  mask_shapes,
  pack_like,
  pack_masks,
  unpack_masks,
  zero_unkept,
)
from jaxprune._src.types import PyTree


class PrunedState(NamedTuple):
  """State of `pruned`.

  Attributes:
    inner_state: state of the wrapped transformation.
    packed_masks: the mask tree of the params packed to 1 bit per weight (uint8
      `(..., C // 8)` per selected leaf, see `packed_masks`; `None` elsewhere);
      `get_masks` unpacks it.
    count: number of updates done (int32), drives a gradual schedule.
  """

  inner_state: Any
  packed_masks: Any
  count: jax.Array


def check_holds_a_mask(masks: PyTree) -> None:
  if all(m is None for m in slots(masks).leaves):
    raise ValueError("`masks` holds no mask (every leaf is None): nothing would be pruned")


def final_update(m: jax.Array | None, u: jax.Array, w: jax.Array) -> jax.Array:
  """`where(m, u, -w)` in a dtype holding both exactly (bf16 updates of f32 weights
  would round `-w` and leave pruned weights slightly off zero)."""
  if m is None:
    return u
  dtype = jnp.promote_types(u.dtype, w.dtype)
  return jnp.where(m, u.astype(dtype), -w.astype(dtype))


class Recompute(NamedTuple):
  """How a transform over the shared core moves its masks, every `every` updates.

  `masks(params, packed, count, grads)` returns the packed masks to hold; with
  `revives`, `masks(params, packed, count, grads, inner_state)` returns (masks to
  hold, masks of this update, inner state): drop and grow resets grown weights'
  moments. `reads_gradients`: the step's gradients go in (else None).
  """

  every: int
  masks: Callable[..., Any]
  reads_gradients: bool = False
  revives: bool = False


def _recomputed(recompute: Recompute, params, state: PrunedState, grads):
  """(masks to hold, masks of this update, inner state) after the recompute due."""
  due = state.count % recompute.every == 0
  # The gradients only where a score reads them, the inner state only where grown
  # weights reset it: an unused operand of a cond would still be held for it.
  grads = grads if recompute.reads_gradients else None
  if recompute.revives:
    return lax.cond(due, recompute.masks, lambda p, prev, count, g, inner: (prev, prev, inner),
                    params, state.packed_masks, state.count, grads, state.inner_state)
  held = lax.cond(due, recompute.masks, lambda p, prev, count, g: prev, params,
                  state.packed_masks, state.count, grads)
  return held, held, state.inner_state


def held_masks(inner: optax.GradientTransformation, start: Callable[[PyTree], PyTree], *,
               name: str, settings: dict, recompute: Recompute | None = None,
               ) -> optax.GradientTransformationExtraArgs:
  """The core every masked transform shares: `inner` with the masks `start(params)`
  held packed in a `PrunedState`, pruned gradients zeroed before `inner`, and the
  final update of a pruned weight `-w`; with `recompute`, the masks move in-graph
  every `recompute.every` updates. `settings` are noted for the run's fingerprint."""
  inner = optax.with_extra_args_support(inner)

  def init_fn(params: PyTree) -> PrunedState:
    note_settings(name, **settings)
    return PrunedState(inner.init(params), pack_masks(start(params)), jnp.zeros((), jnp.int32))

  def update_fn(updates, state: PrunedState, params=None, **extra_args):
    if params is None:
      raise ValueError(f"jaxprune.{name} needs the current params to hold pruned weights at "
                       "zero: call tx.update(grads, state, params)")
    held, step_masks, inner_state = state.packed_masks, state.packed_masks, state.inner_state
    if recompute is not None:
      held, step_masks, inner_state = _recomputed(recompute, params, state, updates)
    # Unpacked once per leaf here, the mask is fused into each op that reads it.
    current = unpack_masks(step_masks)
    inner_updates, inner_state = inner.update(
        zero_unkept(step_masks, updates), inner_state, params, **extra_args
    )
    out = map_masked(final_update, current, inner_updates, params)
    return out, PrunedState(inner_state, held, optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def pruned(
    inner: optax.GradientTransformation,
    masks: PyTree,
) -> optax.GradientTransformationExtraArgs:
  """Wraps `inner` so the weights `masks` prunes stay at exactly zero.

  For every selected leaf, with `u = inner.update(g * m, ...)`:

      out = where(m, u, -w)        # so w + out == 0 where m is False

  Gradients of pruned weights are zeroed before `inner` sees them (moments and
  global norms count only kept weights). Unselected leaves (mask `None`) pass
  through untouched. Masks are held packed, 1 bit per targeted weight (bool
  where a leaf's last axis is not a multiple of 8), and unpacked inside the fused
  update; replace them with `set_masks(state, new_masks)` and the next update
  drives newly pruned weights to zero. Masks that move in-graph are other
  transforms over the same core: `gradually_pruned` (gradual pruning),
  `jaxprune.sparse_training.drop_and_grow` (SET, RigL) and `straight_through`.

  **Placement**: `pruned` must produce the final updates, and it zeroes pruned
  gradients only for what it wraps, so wrap the whole chain:
  `pruned(optax.chain(clip_by_global_norm(1.0), adamw(...)), masks)` clips by the
  norm of the kept weights' gradients. `optax.chain(clip, pruned(adamw(...)))`
  also holds pruned weights at zero, but its norm counts pruned gradients too.
  `optax.MultiSteps` may wrap it. A transformation *after* it (e.g.
  `chain(pruned(adam), scale(0.5))`) rescales `-w` and pruned weights drift away
  from zero.

  Args:
    inner: the optimizer to wrap.
    masks: a mask tree of the params (`True` = kept, `None` = not targeted).

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is `PrunedState`;
    `update` requires `params` and passes extra keyword arguments to `inner`.

  Raises:
    ValueError: `masks` holds no mask; (at `init`) masks that do not fit the params.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import jaxprune
    >>> k1, k2 = jax.random.split(jax.random.key(0))
    >>> params = {"fc1": {"kernel": 0.3 * jax.random.normal(k1, (8, 8)), "bias": jnp.ones(8)},
    ...           "fc2": {"kernel": 0.3 * jax.random.normal(k2, (8, 4))}}
    >>> grads = jax.tree.map(jnp.ones_like, params)   # a gradient of ones
    >>> masks = jaxprune.ranked_masks(params, 0.8, jaxprune.select(params))
    >>> tx = jaxprune.pruned(optax.chain(optax.clip_by_global_norm(1.0),
    ...                                  optax.adamw(1e-3)), masks)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> held = jax.tree.map(lambda a, b: bool((a == b).all()),
    ...                     jaxprune.apply_masks(params, masks), params)
    >>> all(jax.tree.leaves(held))                       # pruned weights are exactly 0
    True
  """
  # A bare function (a `where` callable, a schedule) is not masks; an Equinox mask tree
  # is callable too, but holds its masks as leaves.
  if masks is None or (callable(masks) and jax.tree.leaves(masks) == [masks]):
    raise TypeError("pruned(inner, masks) holds fixed masks; for masks that move use "
                    "jaxprune.gradually_pruned(inner, schedule=..., update_every=..., "
                    "where=...) or jaxprune.sparse_training.drop_and_grow")
  check_holds_a_mask(masks)
  return held_masks(inner, lambda params: check_masks(owned_copy(masks), params),
                    name="pruned", settings={})


def pruned_states(opt_state: PyTree) -> list[PrunedState]:
  """Every `PrunedState` inside `opt_state`, in tree order, nested ones included (a
  `pruned` wrapping a `pruned` has two, and `get_masks` refuses it)."""
  is_pruned = lambda s: isinstance(s, PrunedState)
  found = []
  for s in jax.tree.leaves(opt_state, is_leaf=is_pruned):
    if is_pruned(s):
      found += [s, *pruned_states(s.inner_state)]
  return found


def _exactly_one(opt_state: PyTree) -> PrunedState:
  found = pruned_states(opt_state)
  if len(found) != 1:
    raise ValueError(
        f"expected exactly one jaxprune.pruned state inside the optimizer state, found "
        f"{len(found)}; masks are read from and written to that one"
    )
  return found[0]


def get_masks(opt_state: PyTree) -> PyTree:
  """The masks held by the `pruned` state found anywhere inside `opt_state`.

  Works through `optax.chain`, `named_chain`, `inject_hyperparams`, `MultiSteps`
  and `nnx.Optimizer`'s `opt_state`.

  Raises:
    ValueError: `opt_state` holds no `PrunedState`, or several.
  """
  return unpack_masks(_exactly_one(opt_state).packed_masks)


def set_masks(opt_state: PyTree, masks: PyTree) -> PyTree:
  """A copy of `opt_state` whose `pruned` state holds `masks` (functional).

  The next update zeroes the weights `masks` prunes. Masks must have the
  structure and shapes of the masks already held.

  Raises:
    ValueError: no or several `PrunedState`s, or `masks` not fitting.
  """
  held = mask_shapes(_exactly_one(opt_state).packed_masks)
  return replace_masks(opt_state, check_masks(owned_copy(masks), held, ref_is_masks=True))


def map_pruned_states(fn: Callable[[PrunedState], PrunedState], opt_state: PyTree) -> PyTree:
  """`opt_state` with every `PrunedState` inside it replaced by `fn(state)`, outer ones
  first (the order of `pruned_states`), nested ones inside `fn`'s result."""
  def visit(s):
    if not isinstance(s, PrunedState):
      return s
    new = fn(s)
    if not pruned_states(new.inner_state):  # keep the inner state itself, not a copy
      return new
    return new._replace(inner_state=map_pruned_states(fn, new.inner_state))

  return jax.tree.map(visit, opt_state, is_leaf=lambda s: isinstance(s, PrunedState))


def replace_masks(opt_state: PyTree, masks: PyTree) -> PyTree:
  """`opt_state` with every `PrunedState`'s masks replaced by `masks` (a bool mask
  tree, packed as the held one is, or `None`), unchecked (see `set_masks`)."""
  def replace(s: PrunedState) -> PrunedState:
    if masks is None or s.packed_masks is None:
      return s._replace(packed_masks=None if masks is None else pack_masks(masks))
    return s._replace(packed_masks=pack_like(masks, s.packed_masks))

  return map_pruned_states(replace, opt_state)
