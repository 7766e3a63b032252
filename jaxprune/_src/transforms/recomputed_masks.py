"""Masks recomputed in-graph every K updates: gradual pruning and drop and grow.

Both are transforms over `pruned`'s core (`held_masks`): the masks live packed in
the `PrunedState`, pruned weights are held at exactly zero, and every
`update_every` updates (when `count % update_every == 0`) the masks move inside the
jitted update (`lax.cond`): no host round-trip, no recompilation.

* `gradually_pruned`: the masks of `schedule(count)` (a sparsity, or a target)
  from the current params, never reviving a pruned weight (Zhu & Gupta 2017 with
  `optax.polynomial_schedule`).
* `drop_and_grow`: every leaf moves kept weights, its count unchanged
  (`DropAndGrow`: SET with `set_schedule`, RigL with `rigl_schedule`); the
  optimizer moments of grown weights are zeroed and that update trains only the
  weights kept before and after, so grown weights start at exactly 0.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune._src.methods.masks import check_count, magnitude_masks_held
from jaxprune._src.methods.targets import (
  Prune,
  Target,
  as_target,
  needs_step_gradients,
  ranks_plain_magnitude,
  with_gradients,
)
from jaxprune._src.transforms.drop_grow import DropAndGrow, grown, reset_grown
from jaxprune._src.transforms.optax_wrapper import Recompute, check_holds_a_mask, held_masks
from jaxprune._src.tree.leaf_selection import Where
from jaxprune._src.tree.mask_tree import (
  all_kept,
  check_masks,
  check_selection,
  map_masked,
  owned_copy,
  resolve_where,
)
from jaxprune._src.tree.packed_masks import pack_like, unpack_masks
from jaxprune._src.types import PyTree

Schedule = Callable[[jax.Array], Any]


def first_value(schedule: Any, update_every: Any, name: str) -> Any:
  """`schedule(0)`, after checking `schedule` is a function and `update_every` a count."""
  if not callable(schedule):
    raise TypeError(
        f"{name}'s schedule must be a function count -> sparsity (e.g. "
        f"optax.polynomial_schedule(...)), got {schedule!r}; for a fixed sparsity "
        f"use optax.constant_schedule({schedule!r})"
    )
  check_count("update_every", update_every)
  return schedule(jnp.zeros((), jnp.int32))


def target_at(schedule: Schedule, count: jax.Array) -> Target:
  """`schedule(count)` as a target: a sparsity becomes `Prune(sparsity)`,
  a string `"n:m"` becomes `NM(n, m)` (as `as_target` reads it; another string is
  refused, naming it)."""
  target = schedule(count)
  if isinstance(target, str):
    return as_target(target, name="schedule(count)")
  if not isinstance(target, Target) or isinstance(target, numbers.Real):
    target = Prune(target)
  return target


def _check_first_target(first: Any) -> None:
  """`schedule(0)` must be a sparsity in [0, 1), `"n:m"` or a target (a string or
  target checked as `as_target` checks it), naming `schedule(0)` and the value."""
  if isinstance(first, DropAndGrow):
    raise ValueError("a drop-and-grow schedule (set_schedule, rigl_schedule) moves kept "
                     "weights: use jaxprune.sparse_training.drop_and_grow(inner, masks, "
                     "schedule=..., update_every=...)")
  if isinstance(first, (str, Target)) and not isinstance(first, numbers.Real):
    first = as_target(first, name="schedule(0)").sparsity
  if np.shape(first) != () or not 0.0 <= float(first) < 1.0:
    raise ValueError(
        f"schedule(0) must be a scalar sparsity in [0, 1) (or a target such as "
        f"jaxprune.Prune), got {first!r}; a schedule maps the update count to a sparsity"
    )


def _pruned_further(schedule: Schedule) -> Callable[..., PyTree]:
  """`(params, packed, count, grads) -> packed`: the masks of `schedule(count)` from
  the params, previous ones respected; a score waiting for the step's gradients gets
  `grads`."""
  def masks(params: PyTree, packed: PyTree, count: jax.Array, grads: PyTree) -> PyTree:
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

  return masks


def starting_masks(params: PyTree, where: Any, masks: PyTree | None) -> PyTree:
  """The masks before the first recompute: `masks` (checked, copied), or all kept."""
  if masks is not None:
    return check_masks(owned_copy(masks), params)
  return all_kept(params, resolve_where(where, params))


def _starting_masks(where: Where | None, masks: PyTree | None) -> Callable[[PyTree], PyTree]:
  def start(params: PyTree) -> PyTree:
    held = starting_masks(params, where, masks)
    if masks is not None and where is not None:  # exactly where `where` selects
      check_selection(held, resolve_where(where, params), params, "`masks`")
    return held

  return start


def gradually_pruned(
    inner: optax.GradientTransformation,
    *,
    schedule: Schedule,
    update_every: int,
    where: Where | None = None,
    masks: PyTree | None = None,
) -> optax.GradientTransformationExtraArgs:
  """`pruned` whose masks follow `schedule`: gradual pruning inside the jitted update.

  Every `update_every = K` updates (when `count % K == 0`) the masks are recomputed
  from the current params with `ranked_masks(params, schedule(count), where,
  previous=masks)` (or the masks of the target `schedule(count)` returns), inside
  the jitted update: no host round-trip, no recompilation, and a pruned weight is
  never revived. `schedule(0)` is evaluated once here, to catch a schedule that is
  not a function or not a sparsity; later values depend on the traced count and are
  read as `ranked_masks` reads a traced sparsity (NaN as no new pruning, clipped to
  [0, 1]).

  Args:
    inner: the optimizer to wrap (see `pruned` for where to put it).
    schedule: `count -> sparsity` (an `optax.schedules` function such as
      `optax.polynomial_schedule`), jittable; a float is ranked per leaf by `|w|`
      (`Prune(s)`). It may return a target instead, e.g. `lambda c:
      jaxprune.Prune(s(c), scope="global")`, a `Prune` with any score, scope or
      distribution (with `score=saliency_score()` it ranks `|w * g|` by this
      step's gradients `g`), or an `NM` pattern to recompute N:M masks in-graph.
    update_every: recompute the masks every this many updates.
    where: the targeted leaves (bool pytree from `select`, or a callable taking
      params); required without starting `masks`.
    masks: the masks to start from (default: every selected weight kept).

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is `PrunedState`.

  Raises:
    ValueError / TypeError: before any compute, for a schedule that is not a
      function or whose first value is not a sparsity in [0, 1) or a target, a
      drop-and-grow schedule, `update_every` not a count, neither `where` nor
      `masks`, or starting masks holding none.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import jaxprune
    >>> k1, k2 = jax.random.split(jax.random.key(0))
    >>> params = {"fc1": {"kernel": 0.3 * jax.random.normal(k1, (8, 8)), "bias": jnp.ones(8)},
    ...           "fc2": {"kernel": 0.3 * jax.random.normal(k2, (8, 4))}}
    >>> grads = jax.tree.map(jnp.ones_like, params)   # a gradient of ones
    >>> sparsity = optax.polynomial_schedule(init_value=0.0, end_value=0.75, power=3,
    ...                                      transition_steps=4)
    >>> tx = jaxprune.gradually_pruned(optax.sgd(0.1), schedule=sparsity, update_every=2,
    ...                                where=jaxprune.select(params))
    >>> state = tx.init(params)
    >>> for _ in range(5):
    ...   updates, state = tx.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> float((params["fc1"]["kernel"] == 0).mean())          # 0.75 from update 4 on
    0.75
  """
  if where is None and masks is None:
    raise ValueError("gradually_pruned needs `where` (or starting `masks`)")
  if masks is not None:
    check_holds_a_mask(masks)
  first = first_value(schedule, update_every, "gradually_pruned")
  _check_first_target(first)
  recompute = Recompute(int(update_every), _pruned_further(schedule),
                        reads_gradients=needs_step_gradients(first))
  return held_masks(inner, _starting_masks(where, masks), name="gradually_pruned",
                    settings={"schedule": schedule, "update_every": update_every},
                    recompute=recompute)


def _moved(inner: optax.GradientTransformation, schedule: Schedule) -> Callable[..., Any]:
  """`(params, packed, count, grads, inner_state) -> (masks to hold, masks of this update,
  inner state)` after drop and grow."""
  further = _pruned_further(schedule)

  def masks(params, packed, count, grads, inner_state):
    new = further(params, packed, count, grads)
    before, after = unpack_masks(packed), unpack_masks(new)
    # Grown weights are 0 (held so) and restart with zero moments; they take no
    # update on this step, which trains the weights kept before and after.
    inner_state = reset_grown(inner, inner_state, grown(before, after), params)
    both = map_masked(lambda a, b: None if a is None else a & b, before, after)
    return new, pack_like(both, packed), inner_state

  return masks


def drop_and_grow(
    inner: optax.GradientTransformation,
    masks: PyTree,
    *,
    schedule: Callable[[jax.Array], DropAndGrow],
    update_every: int,
) -> optax.GradientTransformationExtraArgs:
  """`pruned` whose masks move every `update_every` updates, each leaf's count unchanged:
  dynamic sparse training (SET: `schedule=set_schedule(0.3)`; RigL:
  `schedule=rigl_schedule(0.3, end=...)`).

  On an update that moves them, the optimizer moments of grown weights are zeroed
  and only the weights kept before and after train, so grown weights start at
  exactly 0 (`jaxprune.sparse_training.DropAndGrow` has the math).

  Args:
    inner: the optimizer to wrap.
    masks: the starting masks (random or ERK masks: their counts are kept).
    schedule: `count -> DropAndGrow` (`set_schedule`, `rigl_schedule`, your own).
    update_every: move the masks every this many updates.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is `PrunedState`.

  Raises:
    ValueError / TypeError: before any compute, for a schedule whose first value is
      not a `DropAndGrow`, `update_every` not a count, or masks holding none.

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
    >>> start = jaxprune.ranked_masks(params, 0.5, where,
    ...                               score=jaxprune.scores.random_score(0))
    >>> tx = jaxprune.sparse_training.drop_and_grow(
    ...     optax.adam(1e-2), start, schedule=jaxprune.sparse_training.rigl_schedule(0.3),
    ...     update_every=2)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params)
    >>> kept = jaxprune.get_masks(state)["fc1"]["kernel"]
    >>> int(kept.sum()) == int(start["fc1"]["kernel"].sum())    # moved, not removed
    True
  """
  if masks is None:
    raise ValueError("drop_and_grow moves kept weights: pass the starting `masks` (e.g. "
                     "random or ERK masks)")
  check_holds_a_mask(masks)
  first = first_value(schedule, update_every, "drop_and_grow")
  if not isinstance(first, DropAndGrow):
    raise ValueError(f"drop_and_grow's schedule(0) must be a DropAndGrow (set_schedule, "
                     f"rigl_schedule), got {first!r}; to prune further use "
                     f"jaxprune.gradually_pruned")
  recompute = Recompute(int(update_every), _moved(optax.with_extra_args_support(inner),
                                                  schedule),
                        reads_gradients=needs_step_gradients(first), revives=True)
  return held_masks(inner, _starting_masks(None, masks), name="drop_and_grow",
                    settings={"schedule": schedule, "update_every": update_every},
                    recompute=recompute)
