"""`pruned`: an optax wrapper that holds pruned weights at exactly zero.

Masking only the gradients is not enough: momentum, Adam moments and decoupled
weight decay all move a weight whose gradient is zero. `pruned` rewrites the
*final* update of every pruned weight to `-w`, so `optax.apply_updates` lands it
on exactly `0.0`, whatever `inner` computed; kept weights get `inner`'s update
unchanged.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxprune._src.methods.masks import check_count, magnitude_masks_held
from jaxprune._src.methods.targets import (
  Prune,
  Target,
  as_target,
  needs_step_gradients,
  ranks_plain_magnitude,
  with_gradients,
)
from jaxprune._src.training.run_settings import note_settings
from jaxprune._src.transforms.drop_grow import DropAndGrow, grown, reset_grown
from jaxprune._src.tree.leaf_selection import Where
from jaxprune._src.tree.mask_tree import (
  all_kept,
  check_masks,
  check_selection,
  map_masked,
  owned_copy,
  resolve_where,
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


def _check_holds_a_mask(masks: PyTree) -> None:
  if all(m is None for m in slots(masks).leaves):
    raise ValueError("`masks` holds no mask (every leaf is None): nothing would be pruned")


class _Gradual(NamedTuple):
  """What `schedule(0)` says about a gradual run: does the recompute read the step's
  gradients, and may it bring weights back (drop and grow)?"""

  step_gradients: bool
  revives: bool


def _check_gradual(where: Any, schedule: Any, update_every: Any, masks: Any) -> _Gradual:
  """Checks the gradual arguments (before any compute): `schedule(0)` must be a
  sparsity in [0, 1), `"n:m"` or a target; a string or target is checked as
  `as_target` checks it (an N:M pattern needs `0 < n < m`, a scope must be one of
  the target's), naming `schedule(0)` and the value."""
  if update_every is None or schedule is None or (where is None and masks is None):
    raise ValueError("gradual pruning needs `schedule`, `update_every`, and `where` (or "
                     "starting `masks`)")
  if not callable(schedule):
    raise TypeError(
        f"schedule must be a function count -> sparsity (e.g. "
        f"optax.polynomial_schedule(...)), got {schedule!r}; for a fixed sparsity "
        f"use optax.constant_schedule({schedule!r})"
    )
  check_count("update_every", update_every)
  first = schedule(jnp.zeros((), jnp.int32))
  gradual = _Gradual(needs_step_gradients(first), isinstance(first, DropAndGrow))
  if gradual.revives:
    if masks is None:
      raise ValueError("a drop-and-grow schedule (set_schedule, rigl_schedule) moves kept "
                       "weights: pass the starting `masks` (e.g. random or ERK masks)")
    return gradual
  if isinstance(first, (str, Target)) and not isinstance(first, numbers.Real):
    first = as_target(first, name="schedule(0)").sparsity
  if np.shape(first) != () or not 0.0 <= float(first) < 1.0:
    raise ValueError(
        f"schedule(0) must be a scalar sparsity in [0, 1) (or a target such as "
        f"jaxprune.Prune), got {first!r}; a schedule maps the update count to a sparsity"
    )
  return gradual


def _check_pruned(masks: Any, where: Any, schedule: Any,
                  update_every: Any) -> tuple[bool, _Gradual]:
  """`pruned`'s arguments checked (before any compute): (gradual mode?, what its
  schedule does)."""
  gradual = schedule is not None or where is not None or update_every is not None
  mode = _Gradual(False, False)
  if gradual:
    mode = _check_gradual(where, schedule, update_every, masks)
  elif masks is None:
    raise ValueError("pass `masks`, or `where` + `schedule` + `update_every` for gradual pruning")
  if masks is not None:
    _check_holds_a_mask(masks)
  return gradual, mode


def target_at(schedule: Callable[[jax.Array], Any], count: jax.Array) -> Target:
  """`schedule(count)` as a target: a sparsity becomes `Prune(sparsity)`,
  a string `"n:m"` becomes `NM(n, m)` (as `as_target` reads it; another string is
  refused, naming it)."""
  target = schedule(count)
  if isinstance(target, str):
    return as_target(target, name="schedule(count)")
  if not isinstance(target, Target) or isinstance(target, numbers.Real):
    target = Prune(target)
  return target


def _recompute(params: PyTree, packed: PyTree, count: jax.Array, grads: PyTree,
               schedule) -> PyTree:
  """Gradual masks at `count`, packed like `packed` (the branches of a `cond` agree);
  a score waiting for the step's gradients gets `grads`."""
  # The selection is the one the masks were built with in `init`. `where` is not
  # re-resolved: an `nnx.Optimizer` calls `init` with `Param`-wrapped params but
  # `update` with pure arrays, so a `where` from `select(nnx.state(...))` would not
  # have the structure of `params` here.
  target = with_gradients(target_at(schedule, count), grads)
  if ranks_plain_magnitude(target):
    # Reads and writes the packed masks in place: unpacked, they would be written
    # out as operands of the selection (1 byte per weight in the step's scratch).
    return magnitude_masks_held(params, target.sparsity, packed, target.scope)
  previous = unpack_masks(packed)
  chosen = map_masked(lambda m, _: m is not None, previous, params)
  return pack_like(target.masks(params, chosen, previous=previous), packed)


def _final_update(m: jax.Array | None, u: jax.Array, w: jax.Array) -> jax.Array:
  """`where(m, u, -w)` in a dtype holding both exactly (bf16 updates of f32 weights
  would round `-w` and leave pruned weights slightly off zero)."""
  if m is None:
    return u
  dtype = jnp.promote_types(u.dtype, w.dtype)
  return jnp.where(m, u.astype(dtype), -w.astype(dtype))


def pruned(
    inner: optax.GradientTransformation,
    masks: PyTree | None = None,
    *,
    where: Where | None = None,
    schedule: Callable[[jax.Array], jax.Array] | None = None,
    update_every: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Wraps `inner` so pruned weights stay at exactly zero.

  For every selected leaf, with `u = inner.update(g * m, ...)`:

      out = where(m, u, -w)        # so w + out == 0 where m is False

  Gradients of pruned weights are zeroed before `inner` sees them (moments and
  global norms count only kept weights). Unselected leaves (mask `None`) pass
  through untouched. Masks are held packed, 1 bit per targeted weight (bool
  where a leaf's last axis is not a multiple of 8), and unpacked inside the fused
  update.

  **Fixed masks** (`masks` given): held for the whole run; replace them with
  `set_masks(state, new_masks)` and the next update drives newly pruned weights
  to zero.

  **Gradual pruning** (`where`, `schedule`, `update_every=K`): every K updates
  (when `count % K == 0`) the masks are recomputed from the current params with
  `ranked_masks(params, schedule(count), where, previous=masks)` (or the masks of
  the target `schedule(count)` returns)
  inside the jitted update: no host round-trip, no recompilation, and a pruned
  weight is never revived. `masks`, if given too, is the starting point.
  `schedule(0)` is evaluated once when `pruned` is called, to catch a schedule
  that is not a function or not a sparsity; later values depend on the traced
  count and are read as `ranked_masks` reads a traced sparsity (NaN as no new
  pruning, clipped to [0, 1]); a constant Python float must be in [0, 1).

  **Drop and grow** (sparse training: `schedule=set_schedule(...)` or
  `rigl_schedule(...)`, starting `masks` required): every K updates each leaf moves
  kept weights, its count unchanged (`jaxprune.drop_grow`); the optimizer moments of
  grown weights are zeroed and that step trains only the weights kept before and
  after, so grown weights start at exactly 0.

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
    where: the targeted leaves (bool pytree from `select`, or a callable taking
      params), required for gradual pruning without starting `masks`.
    schedule: `count -> sparsity` (an `optax.schedules` function such as
      `optax.polynomial_schedule`), jittable; a float is ranked per leaf by `|w|`
      (`Prune(s)`). It may return a target instead, e.g. `lambda c:
      jaxprune.Prune(s(c), scope="global")`, a `Prune` with any score, scope or
      distribution (with `score=saliency_score()` it ranks `|w * g|` by this
      step's gradients `g`), or an `NM` pattern to recompute N:M masks in-graph.
    update_every: recompute masks every this many updates (gradual mode).

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is `PrunedState`;
    `update` requires `params` and passes extra keyword arguments to `inner`.

  Example::

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
  gradual, mode = _check_pruned(masks, where, schedule, update_every)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params: PyTree) -> PrunedState:
    note_settings("pruned", schedule=schedule, update_every=update_every)
    if masks is not None:
      start = check_masks(owned_copy(masks), params)
      if where is not None:
        # Gradual mode with starting masks: a mask exactly where `where` selects.
        check_selection(start, resolve_where(where, params), params, "`masks`")
    else:
      start = all_kept(params, resolve_where(where, params))
    return PrunedState(inner.init(params), pack_masks(start), jnp.zeros((), jnp.int32))

  def drop_and_grow(params, packed, count, grads, inner_state):
    """(masks to hold, masks of this step's update, inner state) after drop and grow."""
    new = _recompute(params, packed, count, grads, schedule)
    before, after = unpack_masks(packed), unpack_masks(new)
    # Grown weights are 0 (held so) and restart with zero moments; they take no
    # update on this step, which trains the weights kept before and after.
    inner_state = reset_grown(inner, inner_state, grown(before, after), params)
    both = map_masked(lambda a, b: None if a is None else a & b, before, after)
    return new, pack_like(both, packed), inner_state

  def update_fn(updates, state: PrunedState, params=None, **extra_args):
    if params is None:
      raise ValueError(
          "jaxprune.pruned needs the current params to hold pruned weights at zero: "
          "call tx.update(grads, state, params)"
      )
    held, inner_state = state.packed_masks, state.inner_state
    due = state.count % update_every == 0 if gradual else None
    # The gradients only where a score reads them, the inner state only where grown
    # weights reset it: an unused operand of a cond would still be held for it.
    grads = updates if mode.step_gradients else None
    if mode.revives:
      held, step_masks, inner_state = lax.cond(
          due, drop_and_grow, lambda p, prev, count, g, inner: (prev, prev, inner),
          params, held, state.count, grads, inner_state)
    elif gradual:
      held = step_masks = lax.cond(
          due, lambda p, prev, count, g: _recompute(p, prev, count, g, schedule),
          lambda p, prev, count, g: prev, params, held, state.count, grads)
    else:
      step_masks = held
    # Unpacked once per leaf here, the mask is fused into each op that reads it.
    current = unpack_masks(step_masks)
    inner_updates, inner_state = inner.update(
        zero_unkept(step_masks, updates), inner_state, params, **extra_args
    )
    out = map_masked(_final_update, current, inner_updates, params)
    return out, PrunedState(inner_state, held, optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


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
