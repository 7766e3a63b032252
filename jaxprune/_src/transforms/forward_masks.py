"""Straight-through training with the masks applied in the forward pass.

`straight_through_masks(inner, ...)` trains the params *dense*: it passes `inner`'s
updates through untouched and only recomputes masks from the params every
`update_every` updates (by any target: a sparsity, `Prune(...)`, `NM(2, 4)`),
holding them packed in its state. The model runs on

    straight_through_view(params, opt_state) = where(m, w, 0)

whose gradient is the identity to `w` (the straight-through estimate, Bengio et
al. 2013): every weight, pruned or not, gets the gradient of the loss at the
sparse weights. `jaxprune.make_train_step` and `jaxprune.train` apply the view
themselves; for any other optimizer state the view is `params` unchanged.

Against `straight_through` (the same training: same masks, same dense weights),
this form holds no second copy of the weights and its step costs what a plain
optimizer's does (compiled bytes 1.0002x AdamW's on the example LM; the other
form reads and writes its copy: 1.06x), but the params are dense: the sparse
model is `apply_masks(params, get_masks(opt_state))`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxprune._src.training.run_settings import note_settings
from jaxprune._src.transforms.optax_wrapper import PrunedState, pruned_states
from jaxprune._src.transforms.recomputed_masks import starting_masks
from jaxprune._src.transforms.straight_through import check_arguments, masks_after
from jaxprune._src.tree.leaf_selection import Where
from jaxprune._src.tree.mask_tree import check_masks, map_masked, slots, unflatten
from jaxprune._src.tree.packed_masks import kept_or_zero, pack_masks, unpack_masks
from jaxprune._src.types import PyTree


class ForwardMasks(NamedTuple):
  """The `inner_state` of `straight_through_masks`' `PrunedState`: its masks apply in
  the forward pass (`straight_through_view`), not to the params.

  Attributes:
    inner_state: state of the wrapped transformation.
  """

  inner_state: Any


@jax.custom_vjp
def _masked(w: jax.Array, held: jax.Array) -> jax.Array:
  return kept_or_zero(held, w)


def _masked_fwd(w, m):
  return _masked(w, m), None


def _masked_bwd(_, g):
  return g, None  # straight through to every weight; the mask has no cotangent


_masked.defvjp(_masked_fwd, _masked_bwd)


def straight_through_view(params: PyTree, opt_state: PyTree) -> PyTree:
  """The weights the forward pass runs on: `where(m, w, 0)` on the leaves masked by a
  `straight_through_masks` state inside `opt_state`, with the identity gradient to
  `w`; `params` unchanged when `opt_state` holds no such state.

  Shapes: as `params`. Example::

    >>> tx = jaxprune.sparse_training.straight_through_masks(optax.adam(1e-3), where=where,
    ...                                      schedule=optax.constant_schedule(0.5),
    ...                                      update_every=1)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params)   # masks from params, count 0
    >>> params = optax.apply_updates(params, updates)      # still dense
    >>> view = jaxprune.sparse_training.straight_through_view(params, state)
    >>> float((view["fc1"]["kernel"] == 0).mean()), float((params["fc1"]["kernel"] == 0).mean())
    (0.5, 0.0)

  Raises:
    ValueError: `opt_state` holds more than one `straight_through_masks` state, or
      its masks do not fit `params`.
  """
  found = [s for s in pruned_states(opt_state) if isinstance(s.inner_state, ForwardMasks)]
  if not found:
    return params
  if len(found) > 1:
    raise ValueError(f"expected at most one jaxprune.sparse_training.straight_through_masks "
                     f"state inside "
                     f"the optimizer state, found {len(found)}")
  held = found[0].packed_masks
  check_masks(unpack_masks(held), params)  # the check only: XLA drops the unpacked masks
  held = unflatten(params, slots(held).leaves)  # in params' structure, slot by slot
  return map_masked(lambda h, w: w if h is None else _masked(w, h), held, params)


def straight_through_masks(
    inner: optax.GradientTransformation,
    *,
    schedule: Callable[[jax.Array], Any],
    update_every: int,
    where: Where | None = None,
    masks: PyTree | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Wraps `inner` for straight-through training on dense params (module docstring).

  At every update with `count % update_every == 0` the masks are recomputed from the
  params as they are before the update (no `previous`: a weight whose dense value
  grew back is kept again); `inner`'s updates pass through unchanged. Run the model
  on `straight_through_view(params, opt_state)`.

  Args:
    inner: the optimizer of the dense weights.
    schedule: `count -> sparsity` or a target, read at every recompute.
    update_every: recompute the masks every this many updates.
    where: the targeted leaves (or give `masks`).
    masks: starting masks (default: all kept until the first recompute, at count 0).

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a `PrunedState`
    (`get_masks` reads it) holding `ForwardMasks`.
  """
  check_arguments(schedule, update_every, where, masks, "straight_through_masks")
  inner = optax.with_extra_args_support(inner)

  def init_fn(params: PyTree) -> PrunedState:
    note_settings("straight_through_masks", schedule=schedule, update_every=update_every)
    return PrunedState(ForwardMasks(inner.init(params)),
                       pack_masks(starting_masks(params, where, masks)),
                       jnp.zeros((), jnp.int32))

  def update_fn(updates, state: PrunedState, params=None, **extra_args):
    if params is None:
      raise ValueError("jaxprune.sparse_training.straight_through_masks needs the current params: "
                       "call tx.update(grads, state, params)")
    packed = masks_after(params, state, update_every, schedule)
    inner_updates, inner_state = inner.update(updates, state.inner_state.inner_state, params,
                                              **extra_args)
    return inner_updates, PrunedState(ForwardMasks(inner_state), packed,
                                      optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
