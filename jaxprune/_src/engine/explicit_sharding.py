"""Arrays whose type carries a sharding (Explicit mesh axes): moving it out of the way.

Under Explicit axes JAX refuses, at trace time, a scan (cumsum) along a sharded
axis and a reshape that splits one without an output sharding; under Auto axes
(and on one device) the type carries no sharding and XLA places the collectives.
These helpers are no-ops unless the type is sharded.

* `local_along(x, axis)`: `x` with `axis` unsharded, the mesh axes moved to
  another axis they divide (an all-to-all, not a gather), and a function putting
  a result of `x`'s shape back on `x`'s sharding;
* `split_last_two(x, b0, b1)`: `(..., r, c) -> (..., r/b0, b0, c/b1, b1)` keeping
  the shards on the outer halves (replicated first where a shard is not a whole
  number of blocks), and `merge_last_two`, its inverse.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
from jax.sharding import PartitionSpec


def spec_of(x: jax.Array) -> tuple:
  """The sharding in `x`'s type, one entry per axis (all None when it carries none)."""
  spec = tuple(jax.typeof(x).sharding.spec)
  return spec + (None,) * (x.ndim - len(spec))


def _mesh_size(entry, mesh) -> int:
  names = entry if isinstance(entry, tuple) else (entry,)
  return math.prod(mesh.shape[n] for n in names)


def local_along(x: jax.Array, axis: int) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
  """`x` with `axis` unsharded, and a function restoring `x`'s sharding on a result
  of its shape (see the module docstring)."""
  spec = spec_of(x)
  if spec[axis] is None:
    return x, lambda y: y
  mesh = jax.typeof(x).sharding.mesh
  moved = list(spec)
  entry, moved[axis] = moved[axis], None
  size = _mesh_size(entry, mesh)
  other = next((d for d in range(x.ndim) if d != axis % x.ndim and moved[d] is None
                and x.shape[d] % size == 0), None)
  if other is not None:
    moved[other] = entry
  local = jax.sharding.reshard(x, PartitionSpec(*moved))
  return local, lambda y: jax.sharding.reshard(y, PartitionSpec(*spec))


def split_last_two(x: jax.Array, b0: int, b1: int) -> jax.Array:
  """`x.reshape(*lead, r // b0, b0, c // b1, b1)`, the shards on the outer factors."""
  *lead, r, c = x.shape
  shape = (*lead, r // b0, b0, c // b1, b1)
  spec = spec_of(x)
  if all(s is None for s in spec):
    return x.reshape(shape)
  mesh = jax.typeof(x).sharding.mesh
  row, col = spec[-2:]
  if row is not None and (r // b0) % _mesh_size(row, mesh):
    row = None
  if col is not None and (c // b1) % _mesh_size(col, mesh):
    col = None
  if (row, col) != tuple(spec[-2:]):
    x = jax.sharding.reshard(x, PartitionSpec(*spec[:-2], row, col))
  out = PartitionSpec(*spec[:-2], row, None, col, None)
  return jax.lax.reshape(x, shape, out_sharding=out)


def merge_last_two(tiles: jax.Array) -> jax.Array:
  """`split_last_two`'s inverse: `(..., R, b0, C, b1) -> (..., R*b0, C*b1)`, the shards
  of `R` and `C` kept on the merged axes."""
  *lead, r, b0, c, b1 = tiles.shape
  shape = (*lead, r * b0, c * b1)
  spec = spec_of(tiles)
  if all(s is None for s in spec):
    return tiles.reshape(shape)
  return jax.lax.reshape(tiles, shape, out_sharding=PartitionSpec(*spec[:-4], spec[-4], spec[-2]))
