"""Reductions over large arrays read a chunk at a time, so their scratch is bounded.

XLA's CPU backend writes out the operand of every reduction and scatter before
reducing it: counting `w == t` over a 2048 x 2048 leaf writes 16 MB of int32, a
radix-histogram pass 24 MB (a uint16 bucket index and an int32 count per entry).
In a gradual `pruned` step that scratch is allocated on every call, and above
glibc's 32 MB mmap threshold every call page-faults it afresh (1.43x a plain
AdamW step on a 7.3M-weight MLP). Read in chunks of `CHUNK_ENTRIES`, a leaf costs
a chunk's worth.

`sum_chunks(source, fn)` is `fn(source, None)` computed as a sum over chunks of
the source's arrays (sliced alike along one axis, in a `fori_loop`). Arrays are
read whole when small, and when the process has several devices: a dynamic slice
along a sharded axis would gather the leaf onto one device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Entries per chunk: 1.5 MB of scatter operands, a quarter of a 1024 x 1024 leaf.
CHUNK_ENTRIES = 2**18


def chunking(source: tuple) -> tuple[int, int] | None:
  """(axis, length) of the chunks a source's arrays are read in, or None to read
  them whole: axis 0 unless it has too few rows, then the last axis if every array
  of the source has the same extent there (a packed mask does not)."""
  shape = source[0].shape
  size = int(np.prod(shape))
  if not shape or size <= 2 * CHUNK_ENTRIES or jax.device_count() > 1:
    return None
  length = CHUNK_ENTRIES // (size // shape[0])
  if length >= 1 and shape[0] >= 2 * length:
    return 0, length
  if any(a is not None and a.shape[-1:] != shape[-1:] for a in source):
    return None
  return len(shape) - 1, max(1, CHUNK_ENTRIES // (size // shape[-1]))


Window = tuple[int, Any, int] | None  # (axis, start, size) of a chunk; None: whole


def sum_chunks(source: tuple, fn: Callable[[tuple, Window], jax.Array]) -> jax.Array:
  """`fn(source, None)`, computed as the sum of `fn(piece, window)` over chunks of the
  source's arrays (sliced alike) when they are large; see `CHUNK_ENTRIES`.

  The source is sliced, not its keys: slicing a key array inside the loop would
  let XLA hoist the keys out of it and hold all of them (4 bytes per entry).
  """
  chunks = chunking(source)
  if chunks is None:
    return fn(source, None)
  axis, length = chunks
  extent = source[0].shape[axis]
  full = extent // length

  def piece(start, size):
    window = (axis, start, size)
    return fn(tuple(None if a is None else sliced(a, window) for a in source), window)

  total = lax.fori_loop(1, full, lambda c, acc: acc + piece(c * length, length), piece(0, length))
  if extent % length:
    total = total + piece(full * length, extent - full * length)
  return total


def sliced(a: jax.Array, window: Window) -> jax.Array:
  """`a`'s chunk `window`; `a` unchanged if it has no such axis."""
  if window is None or window[0] >= a.ndim:
    return a
  axis, start, size = window
  return lax.dynamic_slice_in_dim(a, start, size, axis)


def placed(partial: jax.Array, window: Window, axis: int, shape: tuple[int, ...]) -> jax.Array:
  """A chunk's `partial` result, zero-padded to `shape` if it covers only the
  window's entries along `axis` of the result (chunks are then summed)."""
  if window is None or partial.shape == shape:
    return partial
  return lax.dynamic_update_slice_in_dim(jnp.zeros(shape, partial.dtype), partial, window[1], axis)
