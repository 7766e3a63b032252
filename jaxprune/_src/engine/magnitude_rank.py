"""Exact selection of the k smallest magnitudes, without sorting.

`jnp.sort`, `lax.top_k` and `argsort` cost O(n log n) and several times the memory
of the tensor. Pruning only needs the k-th smallest magnitude `t`:

* The bit pattern of a non-negative float32, read as a uint32, orders the same way
  as the float, so magnitudes are ranked as uint32 *keys*.
* `t` is found by one of two engines, chosen per platform when lowering:
  - comparison counts (TPU, GPU, and arrays on an Explicit-axis mesh): a
    bisection that fixes the bits of `t` from the top, one bit per pass, each pass
    a compare-and-sum over the keys (`#{keys < candidate}`): 32 reductions, no
    scatter, no sort, nothing gathered;
  - a radix histogram (CPU, where it is measured 2.5x faster; `radix_histogram`):
    pass 1 histograms the high digit of the keys with a scatter-add, each later
    pass the next digit of the keys in the bucket chosen so far.
  Both give the same `t`, the count below it and the count equal to it.
* Keys below `t` are pruned. Keys equal to `t` (ties: all-equal weights, zeros) are
  pruned in flat index order (leaf order, then row-major) until exactly `k` are,
  so the count is always exact and the choice deterministic. The tie pass only
  runs when there is a tie at `t` to break; it gives each array a *cut*, the flat
  position below which its ties go. Each array's marks are then one elementwise
  pass, `keys < t | (keys == t & position < cut)`, from scalars alone.

Several arrays are ranked together by summing their counts, never by
concatenating them (global scope stays O(1) extra memory per leaf and works on
sharded leaves). On one device, large arrays are counted a chunk at a time
(`chunked_reads`): XLA's CPU backend writes out every reduction's operand.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprune._src.engine.chunked_reads import placed, sliced, sum_chunks
from jaxprune._src.engine.leaf_groups import (
  Group,
  group_arrays,
  group_by_shape,
  map_groups,
  map_scalars,
  sum_over,
  with_arrays,
)
from jaxprune._src.engine.radix_histogram import digits_for, threshold_by_histogram
from jaxprune._src.tree.packed_masks import pack_like_mask, unpack_mask_sliced

# Bits fixed per counting pass of the bisection: 2**_PASS_BITS - 1 pivots a pass.
# 1 (32 passes of one compare-and-sum) measured fastest on CPU: 405 ms on a 4096²
# leaf against 658 ms at 2 bits and 2,640 ms at 4 (the pivot broadcast is not
# fused into one read there). Accelerators are not measured yet.
_PASS_BITS = 1


def magnitude_keys(w: jax.Array, kept: jax.Array | None = None) -> jax.Array:
  """uint32 keys whose order is the order of `|w|`, shape of `w`.

  `kept=False` entries (already pruned) get key 0, below every kept weight (kept
  keys are `bits(|w|) + 1`), so they are chosen first; `kept` is a bool mask of
  `w`'s shape or the same packed (`jaxprune.tree.pack_mask`), unpacked where it is
  read. Any float dtype is ranked through float32 (exact for bfloat16/float16;
  float64 is ranked at float32 precision, ties then broken by index). NaN ranks
  above +inf.
  """
  bits = lax.bitcast_convert_type(jnp.abs(w).astype(jnp.float32), jnp.uint32)
  # |w| has a zero sign bit, so bits + 1 cannot overflow.
  return _pruned_first(bits + jnp.uint32(1), kept)


def _pruned_first(keys: jax.Array, kept: jax.Array | None) -> jax.Array:
  """`keys` with key 0 (below every kept entry's) where `kept` is False."""
  if kept is None:
    return keys
  return jnp.where(unpack_mask_sliced(kept), keys, jnp.uint32(0))


def value_keys(s: jax.Array, kept: jax.Array | None = None) -> jax.Array:
  """uint32 keys whose order is the order of the values `s` (signed), shape of `s`.

  A float's bits, read as uint32, order non-negative values; negative ones order
  backwards, so their bits are flipped and the sign bit set for the rest. -0.0
  ranks as 0.0 and every NaN as +NaN, above +inf. The smallest key (of -inf) is
  0x007FFFFF, so `kept=False` entries get key 0, below all (as `magnitude_keys`).
  """
  s = s.astype(jnp.float32)
  s = jnp.where(s == 0, jnp.float32(0), jnp.where(jnp.isnan(s), jnp.float32(jnp.nan), s))
  bits = lax.bitcast_convert_type(s, jnp.uint32)
  return _pruned_first(jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000)), kept)


# The key functions by name: what `by=` selects.
KEYS = {"magnitude": magnitude_keys, "value": value_keys}


# `sum_keys(fn, init)`: `init + sum over every key array x (position j) of fn(x, j)`.
# Built over `leaf_groups`, so each distinct shape's code is compiled once however
# many arrays share it.
SumKeys = Callable[[Callable[[jax.Array, Any], jax.Array], jax.Array], jax.Array]

# Rankings of this many entries or more count in int64 (int32 would overflow).
_WIDE_FROM = 2**31


def count_dtype(n: int) -> jnp.dtype:
  """The integer type that counts `n` entries exactly: int32 below 2**31, int64 above
  (which needs `jax_enable_x64`).

  Raises:
    ValueError: `n >= 2**31` with 64-bit types disabled, naming `n` and the fix.
  """
  if n < _WIDE_FROM:
    return jnp.dtype(jnp.int32)
  if not jax.config.jax_enable_x64:
    raise ValueError(
        f"ranking {n:,} weights together needs 64-bit counts (int32 holds 2**31 - 1): "
        "enable them with jax.config.update('jax_enable_x64', True) at start-up, or "
        "rank per leaf (scope='layer')"
    )
  return jnp.dtype(jnp.int64)


def _count_less(sum_keys: SumKeys, pivots: jax.Array, dtype) -> jax.Array:
  """`counts[p] = #{keys < pivots[p]}` over all keys: compares and sums only.

  The pivot axis is a trailing broadcast, reduced away inside one fusion per key
  array (no scatter, no sort, no gather of a sharded leaf).
  """
  def one(x, position):
    return jnp.sum(x[..., None] < pivots, axis=tuple(range(x.ndim)), dtype=dtype)

  return sum_keys(one, jnp.zeros(pivots.shape, dtype))


def _kth_key_by_counts(sum_keys_at: Callable[[jax.Array], tuple[SumKeys, jax.Array]],
                       k: jax.Array) -> jax.Array:
  """The `k`-th smallest key (1-indexed; 0 for `k == 0`), by multi-pivot bisection.

  The answer `t` is the largest uint32 with `#{keys < t} < k`. It is fixed
  `_PASS_BITS` bits at a time from the top: with the bits above known, the
  `2**_PASS_BITS - 1` candidates for the next ones are counted in one pass and the
  largest whose count is still below `k` is kept. 32 / `_PASS_BITS` passes.
  `sum_keys_at(t)` gives a pass its `sum_keys` (see `_threshold_by_counts`).
  """
  digits = jnp.arange(1, 1 << _PASS_BITS, dtype=jnp.uint32)

  def one_pass(p, t):
    sum_keys, t = sum_keys_at(t)
    shift = jnp.uint32(32 - _PASS_BITS) - jnp.uint32(_PASS_BITS) * p.astype(jnp.uint32)
    counts = _count_less(sum_keys, t | (digits << shift), k.dtype)
    return t | (jnp.sum(counts < k, dtype=jnp.uint32) << shift)

  # The first pass outside the loop, so the carry has the counts' type (see sum_over).
  return lax.fori_loop(1, 32 // _PASS_BITS, one_pass, one_pass(jnp.int32(0), jnp.uint32(0)))


def _threshold_by_counts(groups: Sequence[Group], key_of, k: jax.Array) -> tuple[jax.Array, ...]:
  """`(t, #{keys < t}, #{keys == t})` for the `k`-th smallest key `t`, reductions only.

  Each pass reads the groups' arrays (stacks included, built once, outside the
  loop) through an optimization barrier tied to the carry: the keys are then not
  loop-invariant, so XLA recomputes them inside each pass's fused reduction
  instead of hoisting them out of the loop and holding them (on the gradual
  `pruned` step of a 5.8M-weight MLP this cut the compiled scratch from 83.9 to
  67.1 MB).
  """
  def sum_keys_at(t):
    arrays, t = lax.optimization_barrier((group_arrays(groups), t))
    return _over_groups(with_arrays(groups, arrays), key_of), t

  sum_keys = _over_groups(groups, key_of)
  t = _kth_key_by_counts(sum_keys_at, k)
  below = _count_less(sum_keys, t[None], k.dtype)[0]
  ties = sum_keys(lambda x, j: jnp.sum(x == t, dtype=k.dtype), jnp.zeros((), k.dtype))
  return t, below, ties


def _typed_sharded(x: jax.Array) -> bool:
  """Whether `x`'s type carries a sharding (an Explicit-axis mesh; Auto axes carry none)."""
  return any(axis is not None for axis in jax.typeof(x).sharding.spec)


def _explicitly_sharded(groups: Sequence[Group]) -> bool:
  return any(_typed_sharded(a) for g in groups for source in g.sources for a in source
             if a is not None)


def _first_arrays(group: Group) -> list[jax.Array]:
  """One array per member (its first source), whose size is the member's key count."""
  return [source[0] for source in group.sources]


def _threshold(groups: Sequence[Group], key_of, k: jax.Array) -> tuple[jax.Array, ...]:
  """The threshold engine, chosen when lowering: the radix histogram on CPU, where
  its scatter-add is measured 2.5x faster than the bisection, and comparison counts
  on every other platform (no scatter, no sort: TPU and GPU) and on arrays sharded
  over an Explicit-axis mesh (whose scatter would need an output sharding)."""
  if _explicitly_sharded(groups):
    return _threshold_by_counts(groups, key_of, k)
  digits = digits_for(sum(a.size for g in groups for a in _first_arrays(g)))
  return lax.platform_dependent(
      k, cpu=lambda k: threshold_by_histogram(groups, key_of, k, digits),
      default=lambda k: _threshold_by_counts(groups, key_of, k))



def _unsharded(x: jax.Array) -> jax.Array:
  """`x` replicated if its type says it is sharded (an Explicit-axis mesh), as a scan
  (cumsum) along a sharded axis requires; unchanged otherwise. Only applied to the
  small per-row count vectors of the tie-break, never to a leaf."""
  if not _typed_sharded(x):
    return x
  return jax.sharding.reshard(x, jax.sharding.PartitionSpec())


def _tie_cut(source: tuple, is_tie: Callable[[tuple], jax.Array], quota: jax.Array) -> jax.Array:
  """How many leading positions (row-major) of `source` hold its first `quota` True
  entries of `is_tie(source)`: an int32 scalar, 0 for `quota == 0`, the array's size
  when `quota` reaches its count. The entries marked are then those at positions
  below it: one compare per entry, fused into the final marks.

  Two reductions instead of a cumsum over the flattened array (which would gather
  a sharded leaf onto one device): count per row (all axes but the last), a cumsum
  over the small vector of row counts finds the row where the quota runs out, and
  a cumsum along that one row finds the column. Only runs to break ties. The
  reductions read the source in chunks (`chunked_reads`): XLA's CPU backend
  materializes a reduction's operand, 4 bytes per entry counted at once.
  """
  shape = source[0].shape
  size = int(np.prod(shape))
  if size == 0:
    return jnp.zeros_like(quota)
  if len(shape) <= 1:  # (a 0-d array is read as one entry)
    # A vector (a unit score per channel) is scanned whole, replicated under Explicit axes.
    scanned = jnp.cumsum(_unsharded(is_tie(source)).reshape(-1), dtype=jnp.int32)
    cut = jnp.argmax(scanned >= quota).astype(jnp.int32) + 1
    return jnp.where(quota <= 0, 0, jnp.where(scanned[-1] <= quota, size, cut))
  lead = tuple(range(len(shape) - 1))
  row_counts = _unsharded(sum_chunks(source, lambda piece, window: placed(
      jnp.sum(is_tie(piece), axis=-1, dtype=jnp.int32), window, 0, shape[:-1])))
  flat = row_counts.reshape(-1)
  scanned = jnp.cumsum(flat)
  row = jnp.argmax(scanned >= quota).astype(jnp.int32)  # the row of the quota-th
  need = quota - (scanned[row] - flat[row])
  boundary = (lax.iota(jnp.int32, flat.size) == row).reshape(row_counts.shape)
  boundary_row = _unsharded(sum_chunks(source, lambda piece, window: placed(jnp.sum(
      is_tie(piece) & sliced(boundary, window)[..., None], axis=lead, dtype=jnp.int32),
      window, 0, shape[-1:])))
  column = jnp.argmax(jnp.cumsum(boundary_row) >= need).astype(jnp.int32)
  cut = row * shape[-1] + column + 1
  return jnp.where(quota <= 0, 0, jnp.where(scanned[-1] <= quota, size, cut))


def _positions(x: jax.Array) -> jax.Array:
  """The row-major flat position of every entry of `x` (int32, `x`'s shape and, under
  Explicit axes, its sharding)."""
  sharding = jax.typeof(x).sharding if _typed_sharded(x) else None
  position = jnp.zeros((), jnp.int32)
  stride = 1
  for axis in reversed(range(x.ndim)):
    position = position + stride * lax.broadcasted_iota(
        jnp.int32, x.shape, axis, out_sharding=sharding)
    stride *= x.shape[axis]
  return position


def _over_groups(groups: Sequence[Group], key_of) -> SumKeys:
  """`sum_keys` over the keys `key_of(*source)` of grouped sources."""
  def sum_keys(fn, init):
    return sum_over(groups, lambda s, j: fn(key_of(*s), j), init)

  return sum_keys


def _threshold_and_cuts(sources: Sequence[tuple], key_of, k: jax.Array,
                        ) -> tuple[jax.Array, list[jax.Array]]:
  """`(t, cuts)`: the `k`-th smallest key `t` of all sources' keys `key_of(*source)`,
  and per source the cut of `_tie_cut`: exactly `k` keys are those below `t` and
  those equal to `t` at positions below their source's cut.

  Ties at `t` go in position order (source order, then row-major): source j's quota
  is what the sources before it left. The tie pass runs only when some keys equal
  to `t` must stay (`#{keys == t} != k - #{keys < t}`); otherwise every cut is the
  largest int32. The cuts are separate scalars (`map_scalars`), not slices of a
  stacked vector, so the final marks of equal-shape sources share one kernel.
  """
  groups = group_by_shape(sources)
  threshold, below, ties = _threshold(groups, key_of, k)
  take = k - below  # k == 0 gives threshold 0 with take == 0: nothing is marked

  def every_tie(arrays) -> list[jax.Array]:
    # Typed like the data (inside shard_map, varying over its axes), as the other branch.
    return [jnp.full_like(take, np.iinfo(np.int32).max, jnp.int32) for _ in sources]

  def first_ties(arrays) -> list[jax.Array]:
    held = with_arrays(groups, arrays)

    def is_tie(source):
      return key_of(*source) == threshold

    # Ties per source, in group order (`positions` says whose): each source's quota
    # sums those of the sources before it, with no per-source slice of the counts.
    equal = jnp.concatenate([jnp.atleast_1d(e) for e in map_groups(held, lambda s, j: sum_chunks(
        s, lambda piece, window: jnp.sum(is_tie(piece), dtype=k.dtype)))])
    positions = np.concatenate([g.positions for g in groups])

    def quota(position):
      left = take - jnp.sum(jnp.where(positions < position, equal, 0), dtype=k.dtype)
      return jnp.clip(left, 0, None)

    return map_scalars(held, lambda s, j: _tie_cut(
        s, is_tie, jnp.minimum(quota(j), s[0].size).astype(jnp.int32)))

  return threshold, lax.cond(ties == take, every_tie, first_ties, group_arrays(groups))


# Jitted so that it is traced and lowered once per source signature, not once per
# source: 256 leaves of one shape spent 0.64 s tracing it leaf by leaf.
@functools.partial(jax.jit, static_argnames=("key_of", "finish"))
def _marked(source: tuple, threshold: jax.Array, cut: jax.Array, *, key_of,
            finish: Callable[[jax.Array, tuple], jax.Array] | None) -> jax.Array:
  """The marks of `source` (keys below `threshold`, and equal to it at positions
  below `cut`), or `finish(marks, source)`: one elementwise pass."""
  keys = key_of(*source)
  marked = (keys < threshold) | ((keys == threshold) & (_positions(keys) < cut))
  return marked if finish is None else finish(marked, source)


def _select_smallest(sources: Sequence[tuple], key_of, k: jax.Array | int,
                     finish: Callable[[jax.Array, tuple], jax.Array] | None = None,
                     ) -> list[jax.Array]:
  """Core of `smallest_k`: `key_of(*source)` gives each source's uint32 keys;
  `finish(marked, source)`, if given, is returned instead of a source's marks,
  computed where they are (no bool array of the marks is written out for it).

  Keys are recomputed from their sources in every pass instead of being held: they
  are cheap elementwise functions that XLA fuses into each consumer, and holding
  them would cost 4 bytes per entry. Sources of equal shapes share one compiled
  loop body (`leaf_groups`), and their final marks one kernel.
  """
  sources = [tuple(s) for s in sources]
  sizes = [int(np.prod(s[0].shape)) for s in sources]
  if max(sizes, default=0) >= 2**31:  # counts within one array are int32
    raise ValueError(f"an array of {max(sizes):,} weights: at most 2**31 - 1 per leaf")
  threshold, cuts = _threshold_and_cuts(sources, key_of, jnp.asarray(k, count_dtype(sum(sizes))))
  return [_marked(s, threshold, cut, key_of=key_of, finish=finish) for s, cut in zip(sources, cuts)]


# Jitted so that eager calls compile once per shape: called op by op, the `lax.cond`
# inside closes over concrete arrays and would be recompiled on every call.
@jax.jit
def smallest_k(keys: Sequence[jax.Array], k: jax.Array | int) -> list[jax.Array]:
  """Marks exactly `k` smallest keys across all of `keys` (ties by position).

  Counting passes (see the module docstring) find the `k`-th smallest key `t`; keys
  below `t` are marked, and keys equal to `t` in flat position order (array order,
  then row-major) until exactly `k` are.

  Args:
    keys: uint32 arrays of any shapes (from `magnitude_keys`), ranked together.
    k: number of entries to mark, `0 <= k <= total size`; may be traced.

  Returns:
    One bool array per key array, its shape, `True` for the `k` smallest.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxprune._src.engine.magnitude_rank import smallest_k
    >>> smallest_k([jnp.array([3, 1, 2, 1], jnp.uint32)], 2)
    [Array([False,  True, False,  True], dtype=bool)]
  """
  return _select_smallest([(x,) for x in keys], lambda x: x, k)


def _kept_after(marked: jax.Array, source: tuple) -> jax.Array:
  """The kept mask of `source = (w, kept)` once `marked` is pruned too, in `kept`'s
  layout (packed or bool; bool if `kept` is None)."""
  _, kept = source
  still = ~marked if kept is None else unpack_mask_sliced(kept) & ~marked
  return pack_like_mask(still, kept)


@functools.partial(jax.jit, static_argnames=("as_kept", "by"))
def smallest_magnitudes(
    weights: Sequence[jax.Array], kept: Sequence[jax.Array | None], k: jax.Array | int,
    *, as_kept: bool = False, by: str = "magnitude",
) -> list[jax.Array]:
  """`smallest_k` of `magnitude_keys(w, kept)`, without materializing the keys.

  Marks exactly `k` entries across all `weights`: first the already-pruned ones
  (`kept=False`), then the smallest `|w|`, ties by position. Keys are recomputed
  in every pass, not held. Extra memory on the CPU histogram path is about 6
  bytes per weight counted at once (a uint16 bucket index and an int32 count),
  on one device a chunk of `chunked_reads.CHUNK_ENTRIES` at a time (0.32 B/param in all on a
  2048² leaf), plus one stacked copy of each group of equal-shape leaves up to
  `leaf_groups.STACK_LIMIT_BYTES` (5.0 B/param in all at 256 leaves of 64×64);
  the comparison counts materialize an int32 operand per compare-and-sum on CPU
  (8 B/param at peak on a 1024² leaf), and fuse it on accelerators.

  Args:
    weights: float arrays of any shapes, ranked together.
    kept: per weight, a bool mask of its shape, the same packed
      (`jaxprune.tree.pack_mask`), or None.
    k: number of entries to mark, `0 <= k <= total size`; may be traced.
    as_kept: return, instead of the marks, the kept masks once the marked are
      pruned (`kept & ~marked`, in `kept`'s layout: packed stays packed), computed
      where the marks are, so that no bool array of them is written out.
    by: `"magnitude"` ranks `|w|` (`magnitude_keys`), `"value"` ranks `w` itself,
      negative values first (`value_keys`: user scores).

  Returns:
    One array per weight: bool of its shape, `True` for the `k` marked (or the
    kept masks, with `as_kept`).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxprune._src.engine.magnitude_rank import smallest_magnitudes
    >>> smallest_magnitudes([jnp.array([0.3, -0.1, 0.2])], [None], 1)
    [Array([False,  True, False], dtype=bool)]
  """
  return _select_smallest(list(zip(weights, kept)), KEYS[by], k,
                          _kept_after if as_kept else None)


@functools.partial(jax.jit, static_argnames=("as_kept", "by"))
def smallest_magnitudes_each(
    weights: Sequence[jax.Array], kept: Sequence[jax.Array | None],
    counts: Sequence[jax.Array | int], *, as_kept: bool = False, by: str = "magnitude",
) -> list[jax.Array]:
  """`smallest_magnitudes([w], [kept], k)` for every leaf on its own (layer scope).

  Leaves of equal shape and dtype run as one loop (`leaf_groups`), so the program
  holds one selection per distinct shape, not per leaf: compile time follows the
  number of shapes, and one leaf's scratch is live at a time.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxprune._src.engine.magnitude_rank import smallest_magnitudes_each
    >>> smallest_magnitudes_each([jnp.array([0.3, -0.1]), jnp.array([1., 2.])], [None, None],
    ...                          [1, 1])
    [Array([False,  True], dtype=bool), Array([ True, False], dtype=bool)]
  """
  key_of = KEYS[by]
  sources = [(w, m, jnp.asarray(k, count_dtype(w.size))) for w, m, k in zip(weights, kept, counts)]
  # Each leaf's threshold and cut are scalars computed in its group's loop; its marks
  # are then one elementwise pass, shared by the leaves of its shape.
  cuts = map_scalars(group_by_shape(sources), lambda s, j: _threshold_and_cuts(
      [(s[0], s[1])], key_of, s[2]))
  finish = _kept_after if as_kept else None
  return [_marked((w, m), threshold, cut, key_of=key_of, finish=finish)
          for (w, m, _), (threshold, (cut,)) in zip(sources, cuts)]


def round_fraction_of(fraction: jax.Array, n: int) -> jax.Array:
  """`round(fraction * n)` exactly, for a traced float32 `fraction` in [0, 1): int32,
  or int64 for `n >= 2**31` (64-bit types enabled).

  float32 cannot hold `fraction * n` for large `n` (50M parameters leave an error
  of several units), so the product is formed exactly in 32-bit integer limbs
  from the float's mantissa and exponent. Exact halves round up (Python's `round`
  rounds them to even), the only case where the two may differ, by one.
  """
  if n >= _WIDE_FROM:
    return _round_fraction_of_wide(fraction, n)
  if n < 0:
    raise ValueError(f"cannot count {n} weights")
  fraction = jnp.clip(jnp.asarray(fraction, jnp.float32), 0.0, 1.0)
  bits = lax.bitcast_convert_type(fraction, jnp.uint32)
  exponent = (bits >> 23) & jnp.uint32(0xFF)
  mantissa = bits & jnp.uint32(0x7FFFFF)
  mantissa = jnp.where(exponent > 0, mantissa | jnp.uint32(0x800000), mantissa)
  # fraction = mantissa * 2**-shift
  shift = jnp.where(exponent > 0, 150 - exponent.astype(jnp.int32), 149)

  m_hi, m_lo = mantissa >> 16, mantissa & jnp.uint32(0xFFFF)
  n_hi, n_lo = jnp.uint32(n >> 16), jnp.uint32(n & 0xFFFF)
  # mantissa * n = hi * 2**32 + lo, every partial product below 2**32.
  mid = m_hi * n_lo + m_lo * n_hi
  lo_part = m_lo * n_lo
  mid_low = (mid & jnp.uint32(0xFFFF)) << 16
  lo = lo_part + mid_low
  carry = (lo < lo_part).astype(jnp.uint32)
  hi = m_hi * n_hi + (mid >> 16) + carry

  # Add half a unit of the result, 2**(shift-1), to round half up, then shift.
  # shift >= 24 because fraction < 1; halves at or above 2**64 exceed the product.
  half_bit = shift - 1
  in_lo = half_bit < 32
  in_hi = (half_bit >= 32) & (half_bit < 64)
  half_lo = jnp.where(in_lo, jnp.uint32(1) << jnp.clip(half_bit, 0, 31).astype(jnp.uint32), 0)
  half_hi = jnp.where(in_hi, jnp.uint32(1) << jnp.clip(half_bit - 32, 0, 31).astype(jnp.uint32), 0)
  lo2 = lo + half_lo.astype(jnp.uint32)
  hi2 = hi + (lo2 < lo).astype(jnp.uint32) + half_hi.astype(jnp.uint32)

  s = shift.astype(jnp.uint32)
  low_result = (lo2 >> jnp.clip(s, 0, 31)) | (hi2 << jnp.clip(32 - s, 0, 31))
  high_result = hi2 >> jnp.clip(s - 32, 0, 31)
  result = jnp.where(shift < 32, low_result, jnp.where(shift - 32 < 32, high_result, 0))
  result = jnp.where(fraction >= 1.0, jnp.uint32(n), result)
  return result.astype(jnp.int32)


def _round_fraction_of_wide(fraction: jax.Array, n: int) -> jax.Array:
  """`round_fraction_of` for `n >= 2**31`, in uint64 (64-bit types enabled): the
  24-bit mantissa times `n < 2**40` is exact below 2**64."""
  dtype = count_dtype(n)  # raises without 64-bit types
  if n >= 2**40:
    raise ValueError(f"cannot count {n:,} weights exactly (at most 2**40 per ranking)")
  fraction = jnp.clip(jnp.asarray(fraction, jnp.float32), 0.0, 1.0)
  bits = lax.bitcast_convert_type(fraction, jnp.uint32).astype(jnp.uint64)
  exponent = (bits >> 23) & jnp.uint64(0xFF)
  mantissa = bits & jnp.uint64(0x7FFFFF)
  mantissa = jnp.where(exponent > 0, mantissa | jnp.uint64(0x800000), mantissa)
  shift = jnp.where(exponent > 0, jnp.uint64(150) - exponent, jnp.uint64(149))
  product = mantissa * jnp.uint64(n)  # fraction * n = product * 2**-shift
  # Round half up without an addition that could overflow: floor plus the bit below it.
  whole = jnp.where(shift < 64, product >> jnp.clip(shift, 0, 63), 0)
  half_bit = jnp.where(shift <= 64, (product >> jnp.clip(shift - 1, 0, 63)) & 1, 0)
  rounded = whole + half_bit
  return jnp.where(fraction >= 1.0, jnp.uint64(n), rounded).astype(dtype)
