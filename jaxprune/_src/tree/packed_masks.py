"""Masks packed to 1 bit per weight, the form `pruned` holds them in.

A bool mask costs a byte per weight, and an optimizer step reads it three times
(zeroing the gradient in each of Adam's two moment updates, and in the final
update), so on an optimizer-bound step bool masks add about 3 bytes to Adam's ~40
per weight. Packed, the same three reads cost 3/8 of a byte, and the state is 8×
smaller: 0.9 GB instead of 7 GB of masks for a 7B-parameter model.

A mask of shape `(..., C)` with `C` a multiple of 8 packs along its last axis, eight
weights to a byte, most significant bit first (the order of `np.packbits(mask,
axis=-1)`), to uint8 `(..., C // 8)`; unpacking needs nothing but the array (a uint8
leaf of a mask tree is packed, a bool one is not). It is a broadcast, a shift and a
bitcast reshape, which XLA fuses into the ops that read the mask, so no bool mask is
written to memory. Where a mask zeroes a float array (`kept_or_zero`: the gradients
`pruned` hands its inner optimizer), the unpacked bit becomes a word of all ones or
zeros ANDed with the array's bits rather than a `select` predicate, which XLA's CPU
fusions ran far slower. The leading axes keep their sharding, and so does the last one
when every shard holds a multiple of 8 weights along it.

Any other mask stays a bool array: a 0-d one, one whose last axis is not a
multiple of 8 (an output head over 65 characters), and one whose last axis is
sharded in pieces of another width (a byte would straddle two devices).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprune._src.tree.mask_tree import is_none, slots, unflatten
from jaxprune._src.types import PyTree


def _bit_shifts() -> jax.Array:
  """7, 6, ..., 0: most significant bit first. Built in-graph (an iota): as a constant
  array operand it kept XLA's CPU fusions from vectorizing (a 1.7x slower step)."""
  return jnp.arange(7, -1, -1, dtype=jnp.uint8)


def _last_axis_shards(mask: Any) -> int:
  """How many pieces the sharding of `mask` splits its last axis into (1 if none)."""
  if isinstance(mask, jax.core.Tracer):
    sharding = jax.typeof(mask).sharding  # Explicit mesh axes only; XLA places the rest.
  else:
    sharding = getattr(mask, "sharding", None)
  spec, last = getattr(sharding, "spec", None), np.ndim(mask) - 1
  if spec is None or len(spec) <= last or spec[last] is None:
    return 1
  axes = spec[last] if isinstance(spec[last], tuple) else (spec[last],)
  return int(np.prod([sharding.mesh.shape[a] for a in axes]))


def packable(mask: Any) -> bool:
  """Whether `mask` packs: its last axis is a multiple of 8 weights on every shard."""
  if np.ndim(mask) == 0 or np.shape(mask)[-1] % 8:
    return False
  shards, width = _last_axis_shards(mask), np.shape(mask)[-1]
  return width % shards == 0 and (width // shards) % 8 == 0


def pack_mask(mask: Any) -> jax.Array:
  """`mask` packed to uint8 `(..., C // 8)` if `packable`, else as a bool array.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxprune
    >>> jaxprune.tree.pack_mask(jnp.array([[True, False, True, True, False, False, False, True]]))
    Array([[177]], dtype=uint8)
    >>> jaxprune.tree.unpack_mask(_).astype(int)
    Array([[1, 0, 1, 1, 0, 0, 0, 1]], dtype=int32)
  """
  mask = jnp.asarray(mask, jnp.bool_)
  return _bits(mask) if packable(mask) else mask


def _bits(mask: jax.Array) -> jax.Array:
  groups = mask.reshape(*mask.shape[:-1], mask.shape[-1] // 8, 8).astype(jnp.uint8)
  return jnp.sum(groups << _bit_shifts(), axis=-1, dtype=jnp.uint8)


def unpack_mask(held: jax.Array) -> jax.Array:
  """The bool mask `held` stands for: itself if bool, else its bits unpacked."""
  return held if held.dtype == jnp.bool_ else _bit_values(held).astype(jnp.bool_)


def _bit_values(held: jax.Array) -> jax.Array:
  """The bits of a packed mask as uint8 0s and 1s, in the mask's shape."""
  spread = (held[..., None] >> _bit_shifts()) & jnp.uint8(1)
  return spread.reshape(*held.shape[:-1], held.shape[-1] * 8)


def _keep_words(held: jax.Array, unsigned: Any) -> jax.Array:
  """Words of dtype `unsigned`, all ones where `held` keeps a weight and 0 where not."""
  bit = held if held.dtype == jnp.bool_ else _bit_values(held)
  return jnp.zeros((), unsigned) - bit.astype(unsigned)


@jax.custom_jvp
def _kept_bits(held: jax.Array, x: jax.Array) -> jax.Array:
  unsigned = jnp.dtype(f"uint{8 * x.dtype.itemsize}")
  bits = lax.bitcast_convert_type(x, unsigned) & _keep_words(held, unsigned)
  return lax.bitcast_convert_type(bits, x.dtype)


@_kept_bits.defjvp
def _kept_bits_jvp(primals, tangents):
  # A bitcast has no derivative (JAX would silently give 0): the tangent is the
  # same selection written as a `where`, which also transposes.
  held, x = primals
  zero = jnp.zeros((), x.dtype)
  return _kept_bits(held, x), jnp.where(unpack_mask(held), tangents[1], zero)


def kept_or_zero(held: jax.Array, x: jax.Array) -> jax.Array:
  """`where(unpack_mask(held), x, 0)`, bit for bit, read straight from the held mask.

  For a float `x` the result is `x`'s bits ANDed with a word that is all ones where
  the mask keeps the weight (a pruned NaN or -0.0 becomes +0.0, as with `where`).
  Fused into a streaming optimizer update on XLA's CPU backend, a `select` on a
  predicate unpacked from bytes ran that fusion 1.4-1.8x slower than without the
  mask; the AND of same-width words runs it 1.1-1.15x (a donated 2048x2048 Adam
  moment, `benchmarks/bench_mask_reads.py`). Other dtypes take the `where`.
  Differentiable in `x` (as the `where`).

  Shapes: `held` packed or bool for the mask of `x.shape`; out as `x`. Example:

    >>> import jax.numpy as jnp
    >>> import jaxprune
    >>> from jaxprune._src.tree.packed_masks import kept_or_zero
    >>> held = jaxprune.tree.pack_mask(jnp.array([[True, False] * 4]))
    >>> kept_or_zero(held, jnp.arange(1.0, 9.0)[None])
    Array([[1., 0., 3., 0., 5., 0., 7., 0.]], dtype=float32)
  """
  x = jnp.asarray(x)
  if mask_shape(held) != x.shape:
    raise ValueError(f"a mask of shape {mask_shape(held)} cannot select an array of "
                     f"shape {x.shape}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    return jnp.where(unpack_mask(held), x, jnp.zeros((), x.dtype))
  return _kept_bits(held, x)


def zero_unkept(held: PyTree, tree: PyTree) -> PyTree:
  """`tree` (gradients, params) with the entries its held masks prune set to +0
  (`kept_or_zero` per slot; a `None` mask leaves its leaf as it is)."""
  return jax.tree.map(lambda h, x: x if h is None else kept_or_zero(h, x), held, tree,
                      is_leaf=is_none)


def unpack_mask_sliced(held: jax.Array) -> jax.Array:
  """`unpack_mask(held)`, formulated for masks read through a dynamic slice (the
  selection's chunks of rows): each byte repeated 8 times, then shifted by its
  column. There it runs 1.8x faster on CPU than `unpack_mask`'s spread along a new
  axis; fused into an optimizer step it costs more FLOPs, so the step keeps that."""
  if held.dtype == jnp.bool_:
    return held
  shape = (*held.shape[:-1], held.shape[-1] * 8)
  column = lax.broadcasted_iota(jnp.int32, shape, len(shape) - 1)
  shift = (7 - column % 8).astype(jnp.uint8)
  return ((jnp.repeat(held, 8, axis=-1) >> shift) & jnp.uint8(1)).astype(jnp.bool_)


def mask_shape(held: Any) -> tuple[int, ...]:
  """The shape of the mask `held` (packed or not) stands for."""
  shape = tuple(np.shape(held))
  return shape if held.dtype == jnp.bool_ else (*shape[:-1], shape[-1] * 8)


def pack_masks(masks: PyTree) -> PyTree:
  """A mask tree with every mask packed where it can be (see `pack_mask`)."""
  return jax.tree.map(lambda m: None if m is None else pack_mask(m), masks, is_leaf=is_none)


def pack_like(masks: PyTree, held: PyTree) -> PyTree:
  """`masks` packed as the masks `held` are (the branches of a `cond`, or the next
  masks of a state, keep one layout however shardings read under tracing), in
  `held`'s structure (matched slot by slot)."""
  def pack(m: Any, h: Any) -> Any:
    return None if h is None else pack_like_mask(jnp.asarray(m), h)
  return unflatten(held, [pack(m, h) for m, h in
                          zip(slots(masks).leaves, slots(held).leaves, strict=True)])


def pack_like_mask(mask: jax.Array, held: jax.Array | None) -> jax.Array:
  """`mask` packed as `held` is (bool if `held` is bool or None)."""
  return mask if held is None or held.dtype == jnp.bool_ else _bits(mask)


def unpack_masks(held: PyTree) -> PyTree:
  """The bool mask tree a held (packed) mask tree stands for."""
  return jax.tree.map(lambda h: None if h is None else unpack_mask(h), held, is_leaf=is_none)


def mask_shapes(held: PyTree) -> PyTree:
  """The bool mask tree `held` stands for, as `jax.ShapeDtypeStruct`s (no compute)."""
  return jax.tree.map(
      lambda h: None if h is None else jax.ShapeDtypeStruct(mask_shape(h), jnp.bool_),
      held, is_leaf=is_none)
